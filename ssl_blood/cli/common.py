"""What several commands share: data flags (built from the source registry), list parsing,
JSON output, embeddings from --checkpoint or --baseline. Heavy libraries load inside functions."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from ssl_blood.errors import SslBloodError, UserError


def csv_list(text: str | None, kind: Callable[[str], Any] = str, flag: str = "list") -> list[Any]:
    if not text:
        return []
    try:
        return [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: give a comma-separated list of {kind.__name__}") from None



def _flag(param: str) -> str:
    return "--" + param.replace("_", "-")


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The data flags: one per registered source (mutually exclusive), then the options."""
    from ssl_blood.data import LAYOUTS, source_classes

    sources = source_classes()
    group = p.add_argument_group(f"data (one of {', '.join(_flag(c.param) for c in sources)})")
    exclusive = group.add_mutually_exclusive_group()
    for cls in sources:
        exclusive.add_argument(_flag(cls.param), dest=cls.param, metavar=cls.metavar, help=cls.help)
    group.add_argument("--size", type=int, help="image side in pixels, 16-256 (BloodMNIST: 28, 64, "
                                                "128, 224; folders: their own size, at most 64)")
    group.add_argument("--layout", choices=LAYOUTS, default="auto", help="folder layout (auto: detect)")
    group.add_argument("--split-fractions", default="0.7,0.1,0.2", metavar="TRAIN,VAL,TEST",
                       help="how an unsplit labelled folder or manifest is split (seeded, stratified)")
    group.add_argument("--split-seed", type=int, default=0, help="seed of that split")
    group.add_argument("--skip-missing", action="store_true",
                       help="go on without manifest rows whose file is missing")
    group.add_argument("--cache-dir", metavar="DIR",
                       help="where decoded images are cached (default ~/.cache/ssl-blood; 'none': "
                            "no cache)")
    group.add_argument("--limit", type=int, metavar="N", help="stratified subset of N images per split")


def _source_values(args: argparse.Namespace) -> dict:
    from ssl_blood.data import source_classes

    return {c.param: getattr(args, c.param, None) for c in source_classes()}


def source_from_args(args: argparse.Namespace):
    from ssl_blood.data import resolve_source

    cache = None if args.cache_dir is None else ("" if args.cache_dir.lower() == "none" else args.cache_dir)
    return resolve_source(size=args.size, layout=args.layout,
                          split_fractions=csv_list(args.split_fractions, float, "--split-fractions"),
                          split_seed=args.split_seed, skip_missing=args.skip_missing,
                          cache_dir=cache, **_source_values(args))


def source_given(args: argparse.Namespace) -> bool:
    return args.size is not None or any(v is not None for v in _source_values(args).values())


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON value (no progress bars)")


def print_json(value: Any) -> int:
    print(json.dumps(value))
    return 0


def print_classifier(card: dict, out: str, as_json: bool, hint: str = "") -> int:
    """A classifier just written to `out`: its card as JSON, or its card.md and where it is."""
    if as_json:
        return print_json(card)
    print((Path(out) / "card.md").read_text().rstrip())
    print(f"\nwrote {out}{hint}")
    return 0



def embeddings_from_args(args: argparse.Namespace, splits: Sequence[str] | None = None):
    """Embeddings of the requested splits, from --checkpoint or a --baseline."""
    from ssl_blood.features.embeddings import embed

    source = source_from_args(args) if (source_given(args) or not args.checkpoint) else None
    return embed(args.checkpoint, None if args.checkpoint else args.baseline, source,
                 list(splits or csv_list(getattr(args, "splits", None))) or None, args.limit,
                 getattr(args, "backbone", None), getattr(args, "seed", 0), args.device,
                 progress=None)


def read_json(path: str | None, what: str) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{what} {path}: cannot read it as JSON ({exc}); give the file ssl-blood "
                        f"wrote") from None


def as_flags(exc: SslBloodError, parser: argparse.ArgumentParser | None) -> str:
    """The library's message with each `parameter` it quotes written as this command's flag
    (`nlist` 5000 -> --nlist 5000, `augment.hue` -> --set augment.hue); a parameter this
    command has no flag for keeps its name. Without a parser (a note about another command's
    flag), every parameter is written as --its-name."""
    flags = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings} if parser else None

    def flag(match: re.Match) -> str:
        name = match.group(1)
        if "." in name:
            return f"--set {name}"
        return flags.get(name, name) if flags is not None else "--" + name.replace("_", "-")

    return re.sub(r"`([A-Za-z_][\w.]*)`", flag, str(exc))

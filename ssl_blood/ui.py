"""What a long step shows a person: tqdm progress bars and one-line notes on stderr.

Bars appear only on a terminal and never with `--json` (`set_quiet(True)`), so scripted output
stays clean; notes (a cache used, a file skipped, a setting chosen for you) always go to stderr.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Turn progress bars off for the rest of the process (the CLI does this for --json)."""
    global _quiet
    _quiet = quiet


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
        unit: str = "it", enabled: bool | None = None, **kwargs: Any):
    """A tqdm bar: shown when `enabled` is True, or when None and stderr is a terminal."""
    from tqdm.auto import tqdm

    disable = _quiet or enabled is False or (enabled is None and not sys.stderr.isatty())
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=False,
                dynamic_ncols=True, **kwargs)


def note(message: str) -> None:
    """One line on stderr, prefixed like every ssl-blood message."""
    print(f"ssl-blood: {message}", file=sys.stderr, flush=True)

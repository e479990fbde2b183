"""`ssl-blood` command line: parses arguments and calls the library, nothing more.

One `_add_<command>` (its arguments) and one `cmd_<command>` (the call) per subcommand; choice
lists come from the library's registries. User-facing problems (`SslBloodError`) become one
line on stderr and exit code 2 (bad input) or 1 (a run that stopped); the library names Python
parameters in its messages and `_as_flags` turns the one the message is about into its flag.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from ssl_blood import ui
from ssl_blood.errors import SslBloodError, UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}; see '{self.prog} --help'\n")
        raise SystemExit(2)


def _csv(text: str | None, kind: Callable[[str], Any] = str, flag: str = "list") -> list[Any]:
    if not text:
        return []
    try:
        return [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: give a comma-separated list of {kind.__name__}") from None


# ----------------------------------------------------------------------------- shared arguments


def _add_data_args(p: argparse.ArgumentParser) -> None:
    from ssl_blood.data import LAYOUTS

    group = p.add_argument_group("data (one of --data-root, --npz, --image-dir, --manifest)")
    source = group.add_mutually_exclusive_group()
    source.add_argument("--data-root", metavar="DIR",
                        help="medmnist root holding bloodmnist.npz (default: $SSL_BLOOD_DATA_ROOT, "
                             "else ~/.medmnist)")
    source.add_argument("--npz", metavar="FILE", help="any MedMNIST-format .npz")
    source.add_argument("--image-dir", metavar="DIR",
                        help="folder of cell images: DIR/{train,val,test}/CLASS/..., DIR/CLASS/..., "
                             "or loose images (unlabelled); an 'unlabeled' folder beside class "
                             "folders adds unlabelled training images")
    source.add_argument("--manifest", metavar="FILE.csv",
                        help="CSV with a 'path' column, optional 'label' and 'split'; other "
                             "columns are kept as metadata")
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


def _source(args: argparse.Namespace):
    from ssl_blood.data import resolve_source

    cache = None if args.cache_dir is None else ("" if args.cache_dir.lower() == "none" else args.cache_dir)
    return resolve_source(args.data_root, args.npz, args.image_dir, args.size, manifest=args.manifest,
                          layout=args.layout, split_fractions=_csv(args.split_fractions, float,
                                                                   "--split-fractions"),
                          split_seed=args.split_seed, skip_missing=args.skip_missing,
                          cache_dir=cache)


def _source_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, k, None) is not None
               for k in ("data_root", "npz", "image_dir", "manifest", "size"))


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON value (no progress bars)")


def _print_json(value: Any) -> int:
    print(json.dumps(value))
    return 0


# ----------------------------------------------------------------------------- pretrain / export


_PRETRAIN_FLAGS = {  # argparse dest -> config field
    "method": "method", "backbone": "backbone", "stem": "stem", "epochs": "epochs",
    "batch_size": "batch_size", "optimizer": "optimizer", "lr": "lr",
    "weight_decay": "weight_decay", "warmup_epochs": "warmup_epochs",
    "input_size": "input_size", "limit": "limit", "seed": "seed", "device": "device",
    "knn_every": "knn_every", "precision": "precision", "stream": "stream",
}


def _add_pretrain(sub) -> None:
    from ssl_blood.training.config import OPTIMIZERS, PRECISIONS, PRESETS, STREAMING
    from ssl_blood.methods import method_names
    from ssl_blood.model.backbones import STEMS, backbone_names

    p = sub.add_parser("pretrain", help="pretrain a backbone with SimCLR or DINO",
                       description="Pretrain a backbone self-supervised; writes OUT/checkpoint.pt, "
                                   "OUT/config.json, OUT/metrics.jsonl (atomically, every epoch).")
    p.add_argument("--method", choices=method_names(), help="default simclr")
    p.add_argument("--preset", choices=PRESETS,
                   help="quick: CPU, ~10 min (default without a GPU); standard: CPU, ~1 hour; full: "
                        "ResNet-18 on a GPU (default with one). Epochs scale with the data's size")
    p.add_argument("--config", metavar="FILE", help="start from a config.json instead of a preset")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--backbone", choices=backbone_names())
    p.add_argument("--stem", choices=STEMS, help="downsampling before the body (auto: by image size)")
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--lr", type=float, help="learning rate at batch 256 (scaled linearly)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-epochs", type=int)
    p.add_argument("--input-size", type=int, help="side of the views the model sees "
                                                  "(default: the image size)")
    p.add_argument("--knn-every", type=int, help="epochs between kNN checks on val")
    _add_data_args(p)
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--seed", type=int)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="auto: bf16 autocast on CUDA and on CPUs with fast bf16 (default)")
    p.add_argument("--stream", choices=STREAMING,
                   help="train split resident on the device, or read per batch (auto: by size)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any config setting, e.g. --set augment.hue=0.1 --set dino.output_dim=8192")
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/METHOD-PRESET)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--force", action="store_true", help="with --resume: allow another --precision")
    p.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ssl_blood.training.config import apply_settings, build_config, default_run_dir, parse_settings
    from ssl_blood.device import resolve_device
    from ssl_blood.training.loop import pretrain, resume_config

    overrides = {field: getattr(args, dest) for dest, field in _PRETRAIN_FLAGS.items()
                 if getattr(args, dest) is not None}
    if args.compile:
        overrides["compile"] = True
    if args.resume:
        if not args.out:
            raise UserError("--resume needs --out, the run folder to continue")
        if _source_given(args):
            overrides["data"] = _source(args).to_dict()
        cfg = resume_config(args.out, overrides)
        if args.preset is not None and args.preset != cfg.preset:
            raise UserError(f"--resume: the run used --preset {cfg.preset}, not {args.preset}")
    else:
        cfg = build_config(args.preset, args.method, args.config, overrides, _source(args),
                           resolve_device(args.device or "auto").type)
    if args.set:
        cfg = apply_settings(cfg, parse_settings(args.set))
    out = Path(args.out) if args.out else default_run_dir(cfg)
    args.out = str(out)  # an interrupted run names it in its resume hint
    result = pretrain(cfg, out, resume=args.resume, overwrite=args.overwrite, force=args.force)
    last = result.history[-1] if result.history else {}
    knn = f", kNN val acc {last['knn_val_acc']:.4f}" if "knn_val_acc" in last else ""
    print(f"saved {out / 'checkpoint.pt'} (epoch {last.get('epoch', '?')}, loss "
          f"{last.get('loss', float('nan')):.4f}{knn})")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write the backbone's plain state_dict",
                       description="Write the evaluation backbone of a checkpoint as a plain "
                                   "state_dict that loads without ssl-blood (see docs/user-guide.md).")
    p.add_argument("--checkpoint", required=True, metavar="CKPT")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from ssl_blood.model.checkpoint import export_backbone

    info = export_backbone(args.checkpoint, args.out, args.overwrite)
    print(f"wrote {info['out']}: {info['backbone']} (stem {info['stem']}) state_dict, "
          f"{info['parameters']:,} parameters; input {info['input_size']} px, normalise with mean "
          f"{[round(m, 4) for m in info['mean']]} std {[round(s, 4) for s in info['std']]}")
    return 0


# ----------------------------------------------------------------------------- embed / index / retrieve


def _add_embed(sub) -> None:
    from ssl_blood.features.embeddings import BASELINES, EXPORT_FORMATS, FEATURE_DTYPES
    from ssl_blood.model.backbones import backbone_names

    p = sub.add_parser("embed", help="backbone features of data splits -> embeddings file",
                       description="Embed data splits with a checkpoint's backbone (or a baseline). "
                                   "npz is ssl-blood's own file (every analysis reads it); csv and "
                                   "parquet are one row per cell (id, split, label, class name, "
                                   "metadata, f0..fD) for pandas, R or AnnData.")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", metavar="CKPT")
    model.add_argument("--baseline", choices=BASELINES,
                       help="standardised raw pixels, or the untrained --backbone")
    p.add_argument("--backbone", choices=backbone_names(), default="resnet18",
                   help="architecture for --baseline random-init")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed for random-init")
    _add_data_args(p)
    p.add_argument("--splits", help="comma-separated, default: every split the data has")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="npz")
    p.add_argument("--dtype", choices=FEATURE_DTYPES, default="float32",
                   help="feature storage (npz/parquet); float16 halves the file")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, metavar="EMB.npz")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_embed)


def _embeddings_from_args(args: argparse.Namespace, splits: Sequence[str] | None = None):
    """Embeddings of the requested splits, from --checkpoint or a --baseline."""
    from ssl_blood.data import available_splits, load_split
    from ssl_blood.features.embeddings import Embedder, embed_checkpoint, embed_splits

    source = _source(args) if (_source_given(args) or not args.checkpoint) else None
    if args.checkpoint:
        source = source or _checkpoint_source(args.checkpoint)
    wanted = list(splits or _csv(getattr(args, "splits", None)) or available_splits(source))
    have = available_splits(source)
    missing = [s for s in wanted if s not in have]
    if missing:
        raise UserError(f"the data has no '{missing[0]}' split (it has {', '.join(have)}); "
                        f"choose --splits from those")
    if args.checkpoint:
        return embed_checkpoint(args.checkpoint, source, wanted, args.limit, args.device, progress=None)
    train = load_split(source, "train", args.limit)
    embedder = Embedder.baseline(args.baseline, train, args.backbone or "resnet18", args.seed,
                                 args.device)
    return embed_splits(embedder, source, wanted, args.limit, progress=None)


def _checkpoint_source(checkpoint: str):
    from ssl_blood.model.checkpoint import load_checkpoint
    from ssl_blood.data import DataSource

    return DataSource.from_dict(load_checkpoint(checkpoint)["dataset"]["source"])


def cmd_embed(args: argparse.Namespace) -> int:
    from ssl_blood.files import refuse_existing

    refuse_existing(args.out, args.overwrite)
    emb = _embeddings_from_args(args)
    emb.export(args.out, args.format, args.dtype)
    counts = ", ".join(f"{s} {int((emb.split == s).sum())}" for s in emb.splits())
    print(f"wrote {args.out}: {len(emb.features)} x {emb.dim} features ({counts}) from {emb.name}")
    return 0


def _add_index(sub) -> None:
    from ssl_blood.features.index import INDEX_KINDS

    p = sub.add_parser("index", help="build a faiss index over one split of an embeddings file",
                       description="Build a cosine faiss index over the gallery split of an "
                                   "embeddings file (flat and IVF on the GPU when faiss has one).")
    p.add_argument("--embeddings", required=True, metavar="EMB.npz")
    p.add_argument("--gallery-split", default="train")
    p.add_argument("--kind", choices=INDEX_KINDS, default="auto",
                   help="auto: exact below 200,000 cells, HNSW above (IVF on a GPU); flat: exact; ivf: IVF-Flat; "
                        "ivfpq: IVF-PQ with exact re-ranking; hnsw: graph")
    p.add_argument("--nlist", type=int, help="IVF lists (default about 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, help="IVF lists searched per query, default 16 (HNSW: efSearch, default 64)")
    p.add_argument("--pq-m", type=int, help="IVF-PQ sub-quantisers (must divide the dimension)")
    p.add_argument("--faiss-device", choices=["auto", "gpu", "cpu"], default="auto")
    p.add_argument("--out", required=True, metavar="INDEX_DIR")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_index)


def cmd_index(args: argparse.Namespace) -> int:
    from ssl_blood.features.embeddings import Embeddings
    from ssl_blood.features.index import INDEX_FILE, CellIndex
    from ssl_blood.files import refuse_existing

    refuse_existing(Path(args.out) / INDEX_FILE, args.overwrite)
    emb = Embeddings.load(args.embeddings)
    use_gpu = {"auto": None, "gpu": True, "cpu": False}[args.faiss_device]
    index = CellIndex.from_embeddings(emb, args.gallery_split, str(Path(args.embeddings).resolve()),
                                      kind=args.kind, nlist=args.nlist, nprobe=args.nprobe,
                                      pq_m=args.pq_m, use_gpu=use_gpu)
    index.save(args.out)
    print(f"wrote {args.out}: {index.kind} index of {index.ntotal} {args.gallery_split} cells x "
          f"{index.dim} dims (built on the {'GPU' if index.on_gpu else 'CPU'})")
    return 0


def _add_retrieve(sub) -> None:
    p = sub.add_parser("retrieve", help="nearest cells of query images, or retrieval quality",
                       description="Find the most similar gallery cells of query cells, or "
                                   "(--evaluate) measure precision@k and mAP@10 of a whole split.")
    p.add_argument("--index", required=True, metavar="INDEX_DIR")
    p.add_argument("--image", nargs="+", metavar="PATH", help="query image files")
    p.add_argument("--split", help="query cells from this split (with --ids), or the split to "
                                   "evaluate (with --evaluate; default test)")
    p.add_argument("--ids", help="comma-separated positions within --split")
    p.add_argument("--k", type=int, default=10)
    _add_json(p)
    p.add_argument("--montage", metavar="OUT.png", help="picture of each query and its neighbours")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --montage file")
    p.add_argument("--evaluate", action="store_true", help="precision@1/5/10 and mAP@10 of --split")
    p.add_argument("--limit", type=int, help="with --evaluate: a stratified subset of queries")
    p.add_argument("--baseline-embeddings", nargs="+", metavar="EMB.npz",
                   help="with --evaluate: also score these embeddings files (e.g. baselines)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_retrieve)


def _retrieval_table(answers: list[dict]) -> str:
    lines = []
    for a in answers:
        lines.append(f"query {a['query']}")
        lines.append(f"  {'rank':>4}  {'id':>6}  {'similarity':>10}  class")
        for n in a["neighbours"]:
            extra = f"  {n['metadata']['path']}" if "path" in n.get("metadata", {}) else ""
            lines.append(f"  {n['rank']:>4}  {n['id']:>6}  {n['similarity']:>10.4f}  {n['class']}{extra}")
    return "\n".join(lines)


def _metrics_table(result: dict) -> str:
    keys = [k for k in result["overall"] if k != "queries"]
    lines = [f"{'':24}" + "".join(f"{k:>14}" for k in keys) + f"{'queries':>9}"]
    rows = [("overall", result["overall"])] + list(result["per_class"].items())
    for name, m in rows:
        lines.append(f"{name[:24]:24}" + "".join(f"{m[k]:>14.4f}" for k in keys) + f"{m['queries']:>9}")
    return "\n".join(lines)


def cmd_retrieve(args: argparse.Namespace) -> int:
    from ssl_blood.features import retrieval
    from ssl_blood.features.index import CellIndex
    from ssl_blood.files import refuse_existing

    if args.k < 1:
        raise UserError(f"--k {args.k} must be at least 1")
    if args.montage:
        refuse_existing(args.montage, args.overwrite, "montage")
        if Path(args.montage).suffix.lower() not in (".png", ".svg", ".pdf", ".jpg"):
            raise UserError(f"--montage {args.montage}: give a picture file name (.png, .svg, "
                            f".pdf or .jpg)")
    index = CellIndex.load(args.index)
    embedder = retrieval.embedder_for(index, args.device)
    source = retrieval.gallery_source(index)
    if args.evaluate:
        return _retrieve_evaluate(args, index, embedder, source)
    if bool(args.image) == bool(args.split):
        raise UserError("give query cells with --image PATH ... or with --split SPLIT --ids 0,17,42")
    same_split = args.split == index.meta["gallery_split"]
    if args.image:
        images = retrieval.images_from_files(args.image, embedder)
        queries, exclude = [{"image": p} for p in args.image], None
    else:
        ids = _csv(args.ids, int, "--ids")
        if not ids:
            raise UserError("--split needs --ids, e.g. --ids 0,17,42")
        images, labels = retrieval.images_from_split(source, args.split, ids)
        names = index.meta["class_names"]
        queries = [{"split": args.split, "id": i, "label": int(l),
                    "class": names[l] if 0 <= l < len(names) else None} for i, l in zip(ids, labels)]
        exclude = ids if same_split else None
    similarity, position = retrieval.neighbours(index, embedder(images), args.k, exclude)
    answers = retrieval.describe(index, similarity, position, queries,
                                 retrieval.gallery_metadata(index))
    note = retrieval.shortfall(index, answers, args.k)
    if note:
        ui.note(_as_flags(UserError(note), None))
    if args.montage:
        _write_montage(args.montage, index, source, images, answers)
    print(json.dumps(answers) if args.json else _retrieval_table(answers))
    return 0


def _write_montage(path: str, index, source, images, answers: list[dict]) -> None:
    from ssl_blood.data import load_split
    from ssl_blood.analysis.plots import retrieval_montage
    from ssl_blood.features.retrieval import montage_rows

    gallery = load_split(source, index.meta["gallery_split"]).images.numpy()
    captions = [Path(a["query"]["image"]).name if "image" in a["query"]
                else f"query {a['query']['split']} #{a['query']['id']}\n{a['query']['class']}"
                for a in answers]
    retrieval_montage(montage_rows(gallery, images.numpy(), captions, answers),
                      index.meta["class_names"], path)
    ui.note(f"wrote {path}")


def _retrieve_evaluate(args, index, embedder, source) -> int:
    from ssl_blood.features import retrieval
    from ssl_blood.data import load_split
    from ssl_blood.features.embeddings import Embeddings

    split = args.split or "test"
    same_split = split == index.meta["gallery_split"]
    data = load_split(source, split, args.limit).labelled()
    result: dict[str, Any] = {"index": str(args.index), "split": split, "limit": args.limit,
                              "gallery_subset": index.meta.get("subset") or None,
                              "model": retrieval.evaluate_index(
                                  index, embedder(data.images, progress=None), data.labels.numpy(),
                                  k=10, exclude_ids=data.ids.numpy() if same_split else None)}
    for path in args.baseline_embeddings or []:
        emb = Embeddings.load(path)
        result[emb.name] = retrieval.evaluate_embeddings(emb, index.meta["gallery_split"], split)
    if args.json:
        return _print_json(result)
    for name, metrics in result.items():
        if isinstance(metrics, dict) and "overall" in metrics:
            print(f"== {name} ({split} queries against the {index.meta['gallery_split']} gallery)")
            print(_metrics_table(metrics))
    return 0


# ----------------------------------------------------------------------------- evaluation


def _add_eval_inputs(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="CKPT", help="embed train/val/test with it first")
    src.add_argument("--embeddings", metavar="EMB.npz", help="from ssl-blood embed (also baselines)")
    _add_data_args(p)
    p.add_argument("--device", default="auto")
    _add_json(p)
    p.set_defaults(baseline=None, backbone=None)


def _eval_embeddings(args: argparse.Namespace):
    from ssl_blood.features.embeddings import Embeddings

    if args.embeddings:
        return Embeddings.load(args.embeddings)
    return _embeddings_from_args(args, ["train", "val", "test"])


def _eval_out_dir(args: argparse.Namespace) -> Path:
    from ssl_blood.training.run_dir import RunDir

    if args.out:
        return Path(args.out)
    if args.embeddings:
        return Path(args.embeddings).with_name(Path(args.embeddings).stem + "-eval")
    return RunDir(Path(args.checkpoint).parent).eval_dir


def _per_class_table(result: dict) -> str:
    lines = [f"{'class':24}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    for name, m in result["per_class"].items():
        lines.append(f"{name[:24]:24}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f1']:>10.4f}"
                     f"{m['support']:>9}")
    return "\n".join(lines)


def _clusters_line(c: dict) -> str:
    return f"k-means (k={c['k']}) on test: NMI {c['nmi']:.4f}  ARI {c['ari']:.4f}  purity {c['purity']:.4f}"


def _add_linear_probe(sub) -> None:
    p = sub.add_parser("linear-probe", help="logistic regression on frozen features",
                       description="Multinomial logistic regression on frozen features; weight decay "
                                   "chosen on val, test scored once; k-means cluster metrics of "
                                   "test. Writes linear_probe.json and confusion_matrix.png to "
                                   "--out (default: RUN/eval, or beside the embeddings).")
    _add_eval_inputs(p)
    p.add_argument("--out", metavar="DIR")
    p.set_defaults(func=cmd_linear_probe)


def cmd_linear_probe(args: argparse.Namespace) -> int:
    from ssl_blood.evaluation.frozen import probe_embeddings
    from ssl_blood.analysis.plots import confusion_matrix_png
    from ssl_blood.files import check_writable, write_json

    out = check_writable(_eval_out_dir(args), folder=True)  # before minutes of work
    emb = _eval_embeddings(args)
    result = probe_embeddings(emb, progress=None)
    result["confusion_matrix_png"] = str(confusion_matrix_png(
        result["confusion_matrix"], emb.class_names, out / "confusion_matrix.png",
        f"Linear probe, test: {emb.name}"))
    write_json(result, out / "linear_probe.json")
    if args.json:
        return _print_json(result)
    auc = "n/a" if result["test_auc"] is None else f"{result['test_auc']:.4f}"
    subset = f" (subset: limit {emb.subset['limit']})" if emb.subset else ""
    print(f"linear probe on {emb.name}{subset} (weight decay {result['weight_decay']:g}, chosen on val)\n"
          f"  val ACC {result['val_acc']:.4f}   test ACC {result['test_acc']:.4f}   test AUC {auc}\n"
          f"  balanced ACC {result['balanced_acc']:.4f}   macro-F1 {result['macro_f1']:.4f}\n"
          f"  {_clusters_line(result['test_clusters'])}\n")
    print(_per_class_table(result))
    print(f"\nwrote {out / 'linear_probe.json'} and {result['confusion_matrix_png']}")
    return 0


def _add_knn(sub) -> None:
    p = sub.add_parser("knn", help="weighted kNN accuracy (k=20, T=0.07)",
                       description="DINO's weighted cosine kNN: train split as gallery (a train "
                                   "query never counts itself); k-means cluster metrics too.")
    _add_eval_inputs(p)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--split", default="test", help="query split (default test)")
    p.set_defaults(func=cmd_knn)


def cmd_knn(args: argparse.Namespace) -> int:
    from ssl_blood.evaluation.frozen import knn_embeddings

    emb = _eval_embeddings(args)
    result = knn_embeddings(emb, args.k, args.temperature, args.split)
    if args.json:
        return _print_json(result)
    auc = "n/a" if result["auc"] is None else f"{result['auc']:.4f}"
    print(f"weighted kNN (k={args.k}, T={args.temperature}) on {emb.name}, train gallery, "
          f"{args.split} queries\n  ACC {result['acc']:.4f}   AUC {auc}   balanced ACC "
          f"{result['balanced_acc']:.4f}   macro-F1 {result['macro_f1']:.4f}\n"
          f"  {_clusters_line(result[args.split + '_clusters'])}\n")
    print(_per_class_table(result))
    return 0


def _add_few_shot(sub) -> None:
    from ssl_blood.evaluation.frozen import FEW_SHOT_HEADS

    p = sub.add_parser("few-shot", help="prototype / kNN / logistic heads with few labels",
                       description="Heads trained on small class-balanced labelled sets from train; "
                                   "per setting the head with the best val accuracy is scored on "
                                   "test (mean and 95 %% CI over episodes); every head's numbers "
                                   "are listed too.")
    _add_eval_inputs(p)
    p.add_argument("--shots", default="1,5,10,20", help="labels per class (comma-separated)")
    p.add_argument("--fractions", default="0.01,0.1", help="class-balanced fractions of train")
    p.add_argument("--heads", default=",".join(FEW_SHOT_HEADS))
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_few_shot)


def cmd_few_shot(args: argparse.Namespace) -> int:
    from ssl_blood.evaluation.frozen import few_shot_embeddings

    emb = _eval_embeddings(args)
    result = few_shot_embeddings(emb, progress=None, shots=_csv(args.shots, int, "--shots"),
                                 fractions=_csv(args.fractions, float, "--fractions"),
                                 heads=_csv(args.heads), episodes=args.episodes, seed=args.seed)
    if args.json:
        return _print_json(result)
    print(f"few-shot on {emb.name}: test accuracy, mean and 95 % CI over {args.episodes} "
          f"episodes; head chosen on val (*)")
    print(f"{'setting':16}{'labels':>7}  {'head':11}{'val acc':>9}{'test acc':>10}{'ci95':>9}")
    for r in result["results"]:
        for head, h in r["heads"].items():
            mark = "*" if head == r["head"] else " "
            ci = "" if h["test_ci95"] is None else f"±{h['test_ci95']:.4f}"
            print(f"{r['setting']:16}{r['labels']:>7}  {head + mark:11}{h['val_acc']:>9.4f}"
                  f"{h['test_acc']:>10.4f}{ci:>9}")
    return 0


def _add_labelled_subset(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--fraction", type=float, help="class-balanced fraction of the labelled "
                                                      "train cells (the subsets few-shot draws)")
    group.add_argument("--shots", type=int, help="labelled train cells per class")


def _add_supervised(sub) -> None:
    from ssl_blood.model.backbones import STEMS, backbone_names

    p = sub.add_parser("supervised", help="train the backbone end-to-end with labels (reference)",
                       description="MedMNIST v2 protocol: Adam 1e-3, x0.1 at 50 %% and 75 %% of the "
                                   "epochs, batch 128; best val epoch scored once on test. With "
                                   "--fraction/--shots: the same labelled subset fine-tune uses.")
    p.add_argument("--backbone", choices=backbone_names(), default="resnet18")
    p.add_argument("--stem", choices=STEMS, default="auto")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--augment", choices=["none", "device"], default="none",
                   help="none: the MedMNIST protocol; device: the batched augmentation")
    _add_labelled_subset(p)
    _add_data_args(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="DIR", help="write supervised.json and checkpoint.pt here")
    p.add_argument("--overwrite", action="store_true")
    _add_json(p)
    p.set_defaults(func=cmd_supervised)


def _training_summary(result: dict, what: str) -> str:
    auc = "n/a" if result["test_auc"] is None else f"{result['test_auc']:.4f}"
    return (f"{what} on {result['labels']} labelled cells ({result['device']}, "
            f"{result['seconds']:.0f} s): best val ACC {result['val_acc']:.4f} at epoch "
            f"{result['best_epoch']}; test ACC {result['test_acc']:.4f}, test AUC {auc}")


def cmd_supervised(args: argparse.Namespace) -> int:
    from ssl_blood.evaluation.supervised import SupervisedConfig, train_supervised

    cfg = SupervisedConfig(backbone=args.backbone, stem=args.stem, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr, augment=args.augment == "device",
                           data=_source(args).to_dict(), fraction=args.fraction, shots=args.shots,
                           limit=args.limit, seed=args.seed, device=args.device)
    result = train_supervised(cfg, args.out, overwrite=args.overwrite)
    if args.json:
        return _print_json({k: v for k, v in result.items() if k != "history"})
    print(_training_summary(result, f"supervised {cfg.backbone}, {cfg.epochs} epochs"))
    return 0


def _add_fine_tune(sub) -> None:
    p = sub.add_parser("fine-tune", help="fine-tune a pretrained backbone on labelled cells",
                       description="The pretrained backbone plus a linear head (started from the "
                                   "logistic regression of its frozen features), trained end to end "
                                   "with the device augmentation on labelled train cells; learning "
                                   "rate, backbone-lr ratio and epoch chosen on val, test scored "
                                   "once. Compare with: ssl-blood supervised --fraction F.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT")
    _add_labelled_subset(p)
    p.add_argument("--epochs", type=int, default=30, help="at most; the best val epoch is kept")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lrs", default="3e-4,1e-3", help="head learning rates to try (AdamW)")
    p.add_argument("--backbone-lr-ratios", default="0.1,1", help="backbone lr / head lr to try")
    _add_data_args(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="DIR", help="write fine_tune.json and checkpoint.pt here")
    p.add_argument("--overwrite", action="store_true")
    _add_json(p)
    p.set_defaults(func=cmd_fine_tune)


def cmd_fine_tune(args: argparse.Namespace) -> int:
    from ssl_blood.evaluation.supervised import FineTuneConfig, fine_tune

    cfg = FineTuneConfig(epochs=args.epochs, batch_size=args.batch_size,
                         lrs=tuple(_csv(args.lrs, float, "--lrs")),
                         backbone_lr_ratios=tuple(_csv(args.backbone_lr_ratios, float,
                                                       "--backbone-lr-ratios")),
                         data=_source(args).to_dict() if _source_given(args) else None,
                         fraction=args.fraction, shots=args.shots, limit=args.limit,
                         seed=args.seed, device=args.device)
    result = fine_tune(args.checkpoint, cfg, args.out, overwrite=args.overwrite)
    if args.json:
        return _print_json({k: v for k, v in result.items() if k != "history"})
    c = result["chosen"]
    print(_training_summary(result, "fine-tuned") +
          f"\n  chosen on val: lr {c['lr']:g}, backbone lr x{c['backbone_lr_ratio']:g}; the "
          f"initial linear probe of the same cells: test ACC {result['initial_probe_test_acc']:.4f}")
    return 0


def _add_select(sub) -> None:
    from ssl_blood.analysis.select import STRATEGIES

    p = sub.add_parser("select", help="choose which train cells to label first",
                       description="The --budget train cells to label first, chosen on the "
                                   "embeddings without looking at labels: typiclust (most typical "
                                   "cell of each k-means cluster), kcenter (coreset) or random. "
                                   "--exclude continues from cells already labelled.")
    p.add_argument("--embeddings", required=True, metavar="EMB.npz")
    p.add_argument("--budget", type=int, required=True)
    p.add_argument("--strategy", choices=STRATEGIES, default="typiclust")
    p.add_argument("--exclude", metavar="IDS.csv", help="cells already labelled (an 'id' column)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, metavar="PICKS.csv")
    p.add_argument("--montage", metavar="PICKS.png", help="picture of the chosen cells")
    p.add_argument("--overwrite", action="store_true")
    _add_json(p)
    p.set_defaults(func=cmd_select)


def cmd_select(args: argparse.Namespace) -> int:
    from ssl_blood.features.embeddings import Embeddings
    from ssl_blood.files import refuse_existing
    from ssl_blood.analysis.select import montage, read_ids, select_cells, write_picks

    refuse_existing(args.out, args.overwrite)
    if args.montage:
        refuse_existing(args.montage, args.overwrite, "montage")
    emb = Embeddings.load(args.embeddings)
    exclude = read_ids(args.exclude) if args.exclude else []
    result = select_cells(emb, args.budget, args.strategy, exclude, args.seed)
    write_picks(result, args.out)
    if args.montage:
        montage(result, emb, args.montage)
    if args.json:
        return _print_json(result)
    print(f"wrote {args.out}: {args.budget} cells to label first ({args.strategy}, "
          f"{result['excluded']} already labelled)" + (f" and {args.montage}" if args.montage else ""))
    return 0


# ----------------------------------------------------------------------------- maps, checks, report


def _read_json(path: str | None, what: str) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{what} {path}: cannot read it as JSON ({exc}); give the file ssl-blood "
                        f"wrote") from None


def _add_umap(sub) -> None:
    from ssl_blood.analysis.umap_ig import IG

    p = sub.add_parser("umap", help="UMAP maps and the immature-granulocyte analysis",
                       description="2-D UMAP (cosine) of one split coloured by class, the highlighted "
                                   "class against the rest, and ig_analysis.json with the numbers "
                                   "behind the picture.")
    p.add_argument("--embeddings", required=True, metavar="EMB.npz")
    p.add_argument("--split", default="test")
    p.add_argument("--highlight", default=IG, help="class to analyse")
    p.add_argument("--compare", metavar="OTHER_EMB.npz", help="same panels for a baseline")
    p.add_argument("--probe", metavar="linear_probe.json", help="add the class's confusion rows")
    p.add_argument("--seed", type=int, default=0)
    _add_json(p)
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=cmd_umap)


def cmd_umap(args: argparse.Namespace) -> int:
    from ssl_blood.features.embeddings import Embeddings
    from ssl_blood.analysis.umap_ig import umap_report
    from ssl_blood.files import check_writable

    check_writable(args.out, folder=True)  # before the embedding of UMAP
    emb = Embeddings.load(args.embeddings)
    compare = Embeddings.load(args.compare) if args.compare else None
    result = umap_report(emb, args.out, args.split, args.highlight, compare, args.seed,
                         _read_json(args.probe, "--probe"))
    if args.json:
        return _print_json(result)
    main = result["analyses"][emb.name]
    share = main["same_class_neighbour_share"][result["highlight"]]
    print(f"{result['highlight']} ({main['cells']} {args.split} cells, {emb.name}): "
          f"{share:.1%} of their {main['k']} nearest neighbours share the class; nearest classes: "
          + ", ".join(f"{r['class']} ({r['cosine_distance']:.3f})" for r in main["nearest_classes"][:3])
          + f"; {main['subclusters']['k']} sub-clusters")
    print("wrote " + ", ".join(result["files"] + [str(Path(args.out) / "ig_analysis.json")]))
    return 0


def _add_explore(sub) -> None:
    p = sub.add_parser("explore", help="interactive map of the cells (one offline HTML file)",
                       description="One self-contained HTML page (no network at view time): the 2-D "
                                   "UMAP of a split, coloured by class, predicted class, probe "
                                   "right/wrong or outlier score; hover shows the cell, click lists "
                                   "its nearest cells; legend hides classes; box/lasso selection "
                                   "counts classes and downloads ids as CSV.")
    p.add_argument("--embeddings", required=True, metavar="EMB.npz")
    p.add_argument("--split", default="test")
    p.add_argument("--probe", metavar="linear_probe.json", help="predicted classes of the test split")
    p.add_argument("--index", metavar="INDEX_DIR", help="neighbours from this index (default: an "
                                                        "exact index over the split)")
    p.add_argument("--k", type=int, default=8, help="neighbours shown on click")
    p.add_argument("--max-thumbnails", type=int, default=20_000,
                   help="cells with a hover thumbnail, at most (a stratified sample above)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, metavar="MAP.html")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_explore)


def cmd_explore(args: argparse.Namespace) -> int:
    from ssl_blood.features.embeddings import Embeddings
    from ssl_blood.analysis.explore import explore_page
    from ssl_blood.files import check_writable, refuse_existing

    check_writable(refuse_existing(args.out, args.overwrite), folder=False)
    emb = Embeddings.load(args.embeddings)
    info = explore_page(emb, args.out, args.split, _read_json(args.probe, "--probe"), args.index,
                        args.k, args.max_thumbnails, args.seed)
    print(f"wrote {args.out}: {info['cells']} {args.split} cells, {info['thumbnails']} thumbnails, "
          f"{info['bytes'] / 1e6:.1f} MB")
    return 0


def _add_qc(sub) -> None:
    p = sub.add_parser("qc", help="duplicates, outliers and label suspects",
                       description="Near-duplicate pairs (cosine >= --threshold) and exact pixel "
                                   "duplicates within and across splits (train/test leakage first), "
                                   "outliers (mean cosine distance to the k nearest train cells) and "
                                   "label suspects (the neighbourhood votes for another class). "
                                   "Writes qc.json and montages to --out.")
    p.add_argument("--embeddings", required=True, metavar="EMB.npz")
    p.add_argument("--threshold", type=float, help="near-duplicate cosine similarity (default: adaptive, "
                   "1 - 0.1 x the median nearest-neighbour cosine distance)")
    p.add_argument("--min-confidence", type=float, default=0.8,
                   help="label suspect: share of the neighbours' weighted votes for another class")
    p.add_argument("--k", type=int, default=10, help="neighbours per cell")
    p.add_argument("--top", type=int, default=20, help="outliers per split, suspects per class")
    p.add_argument("--out", metavar="DIR", help="default: beside the embeddings, EMB-qc/")
    p.add_argument("--overwrite", action="store_true")
    _add_json(p)
    p.set_defaults(func=cmd_qc)


def cmd_qc(args: argparse.Namespace) -> int:
    from ssl_blood.features.embeddings import Embeddings
    from ssl_blood.analysis.qc import run_qc
    from ssl_blood.files import refuse_existing

    out = Path(args.out) if args.out else Path(args.embeddings).with_name(Path(args.embeddings).stem + "-qc")
    refuse_existing(out / "qc.json", args.overwrite)
    emb = Embeddings.load(args.embeddings)
    result = run_qc(emb, out, args.threshold, args.k, args.top, args.min_confidence)
    if args.json:
        return _print_json(result)
    near, exact = result["near_duplicates"], result["exact_duplicates"]
    print(f"qc of {emb.name} ({', '.join(f'{s} {n}' for s, n in result['cells'].items())})")
    print(f"  near-duplicates (cosine >= {near['threshold']}): {near['pairs']} pairs "
          f"{near['by_split_pair']}; leakage across splits: {near['leakage_pairs']}; labelled "
          f"differently: {near['label_conflicts']}")
    if exact is not None:
        print(f"  exact pixel duplicates: {exact['pairs']} pairs {exact['by_split_pair']}; "
              f"leakage: {exact['leakage_pairs']}; labelled differently: {exact['label_conflicts']}")
    if result["label_suspects"]:
        s = result["label_suspects"]
        print(f"  label suspects (>= {s['min_confidence']:.0%} of the votes elsewhere): {s['suspects']} of "
              f"{s['labelled_cells']} labelled cells {s['by_split']}")
    print(f"wrote {out / 'qc.json'}" + "".join(f", {m}" for m in result.get("montages", [])))
    return 0


def _add_report(sub) -> None:
    from ssl_blood.features.embeddings import BASELINES

    p = sub.add_parser("report", help="one self-contained HTML page of a run",
                       description="Everything of one pretraining run on one HTML page (images "
                                   "embedded): config, training curves, evaluation with baselines, "
                                   "confusion matrix, cluster metrics, UMAP, IG analysis, the "
                                   "interactive map, retrieval montages. Missing analyses are "
                                   "computed and kept in RUN/analysis/.")
    p.add_argument("--run", required=True, metavar="RUN_DIR")
    p.add_argument("--out", metavar="report.html", help="default RUN_DIR/report.html")
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help="baselines to compare against (comma-separated; empty for none)")
    p.add_argument("--limit", type=int, help="stratified subset per split (quick looks)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from ssl_blood.analysis.report import build_report

    path = build_report(args.run, args.out, limit=args.limit, device=args.device,
                        baselines=_csv(args.baselines, flag="--baselines"))
    print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------- parser and main


_COMMANDS = (_add_pretrain, _add_export, _add_embed, _add_index, _add_retrieve, _add_linear_probe,
             _add_knn, _add_few_shot, _add_supervised, _add_fine_tune, _add_select, _add_umap,
             _add_explore, _add_qc, _add_report)


def build_parser() -> argparse.ArgumentParser:
    from ssl_blood import __version__

    parser = _Parser(prog="ssl-blood", description="Self-supervised learning for blood-cell "
                     "microscopy: pretrain, embed, index, retrieve, evaluate, label, check, map.")
    parser.add_argument("--version", action="version", version=f"ssl-blood {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def _as_flags(exc: SslBloodError, parser: argparse.ArgumentParser | None) -> str:
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


def cli_reference_markdown() -> str:
    """docs/cli.md: every subcommand's --help, generated (tests check the file is current)."""
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, {"COLUMNS": "100"}):
        parser = build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parts = ["# CLI reference", "",
                 "<!-- generated by ssl_blood.cli.cli_reference_markdown(); regenerate with\n"
                 "     python -c \"from ssl_blood.cli import cli_reference_markdown as m; "
                 "open('docs/cli.md', 'w').write(m())\" -->", "",
                 "`ssl-blood COMMAND --help` prints the same. Bad input: one line on stderr, exit code 2, "
                 "nothing overwritten; a run that stops (non-finite loss, DINO collapse, full disk): "
                 "one line, exit code 1.", "", "```", parser.format_help().rstrip(), "```", ""]
        for name, command in sub.choices.items():
            parts += [f"## `ssl-blood {name}`", "", "```", command.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "json", False):
        ui.set_quiet(True)
    try:
        with _signals_interrupt():
            return int(args.func(args) or 0)
    except SslBloodError as exc:
        message = _as_flags(exc, _subparser(parser, args.command))
        sys.stderr.write(f"ssl-blood {args.command}: error: {' '.join(message.split())}\n")
        return exc.exit_code
    except KeyboardInterrupt as exc:
        sys.stderr.write(f"ssl-blood {args.command}: stopped by {exc.args[0] if exc.args else 'SIGINT'}"
                         f"; {_after_interrupt(args)}\n")
        return 1


@contextlib.contextmanager
def _signals_interrupt():
    """SIGTERM (a scheduler, `kill`) stops a command as Ctrl-C does: the step in progress is
    abandoned, `with` blocks release folder locks, finished files stay (all writes are atomic)."""
    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _after_interrupt(args: argparse.Namespace) -> str:
    """What an interrupted command left and how to go on."""
    if args.command == "pretrain" and getattr(args, "out", None) and (Path(args.out) / "checkpoint.pt").is_file():
        return (f"the last checkpoint in {args.out} is kept; continue with "
                f"`ssl-blood pretrain --out {args.out} --resume`")
    return "no file was left half-written; run the command again"


if __name__ == "__main__":
    raise SystemExit(main())

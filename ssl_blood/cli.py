"""`ssl-blood` command line: parses arguments and calls the library, nothing more.

User-facing problems (`SslBloodError`) become one line on stderr and exit code 2 (bad input)
or 1 (a run that stopped); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from ssl_blood.errors import SslBloodError, UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}; see '{self.prog} --help'\n")
        raise SystemExit(2)


def _add_data_args(p: argparse.ArgumentParser, size_help: str = "image side in pixels") -> None:
    group = p.add_argument_group("data (one of)")
    source = group.add_mutually_exclusive_group()
    source.add_argument("--data-root", metavar="DIR",
                        help="medmnist root holding bloodmnist.npz (default: $SSL_BLOOD_DATA_ROOT, "
                             "else ~/.medmnist)")
    source.add_argument("--npz", metavar="FILE", help="any MedMNIST-format .npz")
    source.add_argument("--image-dir", metavar="DIR", help="folder of cell images (unlabeled)")
    group.add_argument("--size", type=int, help=f"{size_help} (BloodMNIST: 28, 64, 128, 224)")
    group.add_argument("--limit", type=int, metavar="N", help="stratified subset of N images per split")


def _source(args: argparse.Namespace):
    from ssl_blood.data import resolve_source

    return resolve_source(args.data_root, args.npz, args.image_dir, args.size)


def _source_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, k) is not None for k in ("data_root", "npz", "image_dir", "size"))


def _refuse_existing(path: Path, overwrite: bool, what: str = "--out") -> None:
    if path.exists() and not overwrite:
        raise UserError(f"{what} {path} exists; add --overwrite to replace it or choose another path")


# ----------------------------------------------------------------------------- pretrain


_PRETRAIN_FLAGS = {  # argparse dest -> config field
    "method": "method", "backbone": "backbone", "epochs": "epochs", "batch_size": "batch_size",
    "optimizer": "optimizer", "lr": "lr", "weight_decay": "weight_decay",
    "warmup_epochs": "warmup_epochs", "input_size": "input_size", "augment": "augment_pipeline",
    "limit": "limit", "seed": "seed", "device": "device", "num_workers": "num_workers",
    "knn_every": "knn_every", "precision": "precision",
}


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ssl_blood.config import PretrainConfig, apply_settings, parse_settings, preset_config
    from ssl_blood.device import resolve_device
    from ssl_blood.train import CHECKPOINT, pretrain, resume_config

    overrides = {field: getattr(args, dest) for dest, field in _PRETRAIN_FLAGS.items()
                 if getattr(args, dest) is not None}
    if args.compile:
        overrides["compile"] = True
    if _source_given(args):
        overrides["data"] = _source(args).to_dict()
    settings = parse_settings(args.set or [])
    out = Path(args.out) if args.out else None
    if args.resume:
        if out is None:
            raise UserError("--resume needs --out, the run folder to continue")
        cfg = resume_config(out, overrides)
        if args.preset is not None and args.preset != cfg.preset:
            raise UserError(f"--resume: the run used --preset {cfg.preset}, not {args.preset}")
    else:
        device = resolve_device(args.device or "auto")
        preset = args.preset or ("full" if device.type == "cuda" else "quick")
        if args.config:
            cfg = PretrainConfig.load(args.config)
        else:
            cfg = preset_config(preset, args.method or "simclr")
        if "data" not in overrides:
            overrides["data"] = _source(args).to_dict()
        cfg = PretrainConfig.from_dict({**cfg.to_dict(), **overrides})
    if settings:
        cfg = apply_settings(cfg, settings)
    out = out or Path("runs") / f"{cfg.method}-{cfg.preset}"
    result = pretrain(cfg.validate(), out, resume=args.resume, overwrite=args.overwrite)
    last = result.history[-1] if result.history else {}
    knn = f", kNN val acc {last['knn_val_acc']:.4f}" if "knn_val_acc" in last else ""
    print(f"saved {out / CHECKPOINT} (epoch {last.get('epoch', '?')}, loss "
          f"{last.get('loss', float('nan')):.4f}{knn})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ssl_blood.checkpoint import export_backbone

    out = Path(args.out)
    _refuse_existing(out, args.overwrite)
    info = export_backbone(args.checkpoint, out)
    print(f"wrote {info['out']}: {info['backbone']} state_dict, {info['parameters']:,} parameters; "
          f"input {info['input_size']} px, normalise with mean {[round(m, 4) for m in info['mean']]} "
          f"std {[round(s, 4) for s in info['std']]}")
    return 0


# ----------------------------------------------------------------------------- embed / index / retrieve


def _csv(text: str | None, kind: Callable[[str], Any] = str) -> list[Any]:
    if not text:
        return []
    try:
        return [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UserError(f"cannot read {text!r} as a comma-separated list of {kind.__name__}") from None


def _checkpoint_source(args: argparse.Namespace, dataset: dict):
    """The data given on the command line, else the data the checkpoint was trained on."""
    from ssl_blood.data import DataSource

    return _source(args) if _source_given(args) else DataSource.from_dict(dataset["source"])


def _embed_from_args(args: argparse.Namespace, splits: Sequence[str] | None = None):
    """Embeddings of the requested splits, from --checkpoint or a --baseline."""
    from ssl_blood.data import available_splits, load_split
    from ssl_blood.embed import Embedder, embed_splits

    if args.checkpoint:
        embedder = Embedder.from_checkpoint(args.checkpoint, args.device)
        source = _checkpoint_source(args, {"source": embedder.spec["source"]})
    else:
        source = _source(args)
        train = load_split(source, "train", getattr(args, "limit", None))
        embedder = Embedder.baseline(args.baseline, train, args.backbone or "resnet18",
                                     args.seed, args.device)
    wanted = splits or _csv(getattr(args, "splits", None)) or list(available_splits(source))
    have = available_splits(source)
    missing = [s for s in wanted if s not in have]
    if missing:
        raise UserError(f"the data has no '{missing[0]}' split (it has {', '.join(have)}); "
                        f"choose --splits from those")
    return embed_splits(embedder, source, wanted, getattr(args, "limit", None), progress=True)


def cmd_embed(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _refuse_existing(out, args.overwrite)
    emb = _embed_from_args(args)
    emb.save(out)
    counts = ", ".join(f"{s} {int((emb.split == s).sum())}" for s in emb.splits())
    print(f"wrote {out}: {len(emb.features)} x {emb.dim} features ({counts}) from {emb.name}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from ssl_blood.embed import Embeddings
    from ssl_blood.index import CellIndex

    out = Path(args.out)
    if (out / "index.faiss").exists() and not args.overwrite:
        raise UserError(f"--out {out} already holds an index; add --overwrite or choose another --out")
    emb = Embeddings.load(args.embeddings)
    x, y, ids = emb.select(args.gallery_split)
    meta = {"gallery_split": args.gallery_split, "class_names": list(emb.class_names),
            "checkpoint_sha256": emb.checkpoint_sha256, "embedder": emb.embedder,
            "embeddings_file": str(Path(args.embeddings).resolve()),
            "preprocessing": {k: emb.embedder.get(k) for k in ("kind", "input_size", "image_size",
                                                               "mean", "std") if k in emb.embedder}}
    use_gpu = {"auto": None, "gpu": True, "cpu": False}[args.faiss_device]
    index = CellIndex.build(x, labels=y, ids=ids, kind=args.kind, nlist=args.nlist,
                            nprobe=args.nprobe, pq_m=args.pq_m, use_gpu=use_gpu, meta=meta)
    index.save(out)
    where = "GPU" if index.on_gpu else "CPU"
    print(f"wrote {out}: {args.kind} index of {index.ntotal} {args.gallery_split} cells x "
          f"{index.dim} dims (built on the {where})")
    return 0


def _retrieval_table(answers: list[dict]) -> str:
    lines = []
    for a in answers:
        lines.append(f"query {a['query']}")
        lines.append(f"  {'rank':>4}  {'id':>6}  {'similarity':>10}  class")
        for n in a["neighbours"]:
            lines.append(f"  {n['rank']:>4}  {n['id']:>6}  {n['similarity']:>10.4f}  {n['class']}")
    return "\n".join(lines)


def _metrics_table(result: dict) -> str:
    keys = [k for k in result["overall"] if k != "queries"]
    lines = [f"{'':24}" + "".join(f"{k:>14}" for k in keys) + f"{'queries':>9}"]
    rows = [("overall", result["overall"])] + list(result["per_class"].items())
    for name, m in rows:
        lines.append(f"{name[:24]:24}" + "".join(f"{m[k]:>14.4f}" for k in keys) + f"{m['queries']:>9}")
    return "\n".join(lines)


def cmd_retrieve(args: argparse.Namespace) -> int:
    from ssl_blood import retrieval
    from ssl_blood.data import DataSource
    from ssl_blood.index import CellIndex

    index = CellIndex.load(args.index)
    if args.k < 1:
        raise UserError(f"--k {args.k} must be at least 1")
    embedder = retrieval.embedder_for(index, args.device)
    source = DataSource.from_dict(embedder.spec["source"])
    same_split = args.split == index.meta.get("gallery_split")
    if args.evaluate:
        return _retrieve_evaluate(args, index, embedder, source, same_split)
    if bool(args.image) == bool(args.split):
        raise UserError("give query cells with --image PATH ... or with --split SPLIT --ids 0,17,42")
    if args.image:
        images = retrieval.images_from_files(args.image, embedder)
        queries = [{"image": p} for p in args.image]
        exclude = None
    else:
        ids = _csv(args.ids, int)
        if not ids:
            raise UserError("--split needs --ids, e.g. --ids 0,17,42")
        images, labels = retrieval.images_from_split(source, args.split, ids)
        names = index.meta.get("class_names", [])
        queries = [{"split": args.split, "id": i, "label": int(l),
                    "class": names[l] if 0 <= l < len(names) else None} for i, l in zip(ids, labels)]
        exclude = ids if same_split else None
    similarity, position = retrieval.neighbours(index, embedder(images), args.k, exclude)
    answers = retrieval.describe(index, similarity, position, queries)
    if args.montage:
        _write_montage(args.montage, index, source, images, answers)
    print(json.dumps(answers) if args.json else _retrieval_table(answers))
    return 0


def _write_montage(path: str, index, source, images, answers: list[dict]) -> None:
    from ssl_blood.data import load_split
    from ssl_blood.plots import retrieval_montage

    gallery = load_split(source, index.meta["gallery_split"])
    rows = []
    for image, answer in zip(images.numpy(), answers):
        q = answer["query"]
        caption = Path(q["image"]).name if "image" in q else f"query {q['split']} #{q['id']}\n{q['class']}"
        rows.append({"query": image, "caption": caption,
                     "neighbours": [gallery.images[n["id"]].numpy() for n in answer["neighbours"]],
                     "labels": [n["label"] for n in answer["neighbours"]],
                     "similarities": [n["similarity"] for n in answer["neighbours"]]})
    retrieval_montage(rows, index.meta.get("class_names", []), path)
    print(f"wrote {path}", file=sys.stderr)


def _retrieve_evaluate(args, index, embedder, source, same_split: bool) -> int:
    from ssl_blood import retrieval
    from ssl_blood.data import load_split
    from ssl_blood.embed import Embeddings
    from ssl_blood.index import CellIndex

    split = args.split or "test"
    data = load_split(source, split, args.limit)
    exclude = data.ids.numpy() if same_split else None
    result = {"index": str(args.index), "split": split,
              "model": retrieval.evaluate_index(index, embedder(data.images, progress=True),
                                                data.labels.numpy(), k=10, exclude_ids=exclude)}
    for path in args.baseline_embeddings or []:
        emb = Embeddings.load(path)
        gx, gy, gids = emb.select(index.meta["gallery_split"])
        qx, qy, qids = emb.select(split)
        base = CellIndex.build(gx, labels=gy, ids=gids, meta={"class_names": list(emb.class_names)})
        result[emb.name] = retrieval.evaluate_index(base, qx, qy, k=10,
                                                    exclude_ids=qids if same_split else None)
    if args.json:
        print(json.dumps(result))
    else:
        for name, metrics in result.items():
            if isinstance(metrics, dict):
                print(f"== {name} ({split} queries against the {index.meta['gallery_split']} gallery)")
                print(_metrics_table(metrics))
    return 0


# ----------------------------------------------------------------------------- evaluation


def _eval_embeddings(args: argparse.Namespace):
    """Embeddings from --embeddings, or train/val/test embedded with --checkpoint."""
    from ssl_blood.embed import Embeddings

    if args.embeddings:
        return Embeddings.load(args.embeddings)
    emb = _embed_from_args(args, ["train", "val", "test"])
    from ssl_blood.checkpoint import load_checkpoint

    trained_classes = int(load_checkpoint(args.checkpoint)["dataset"]["num_classes"])
    if trained_classes and trained_classes != len(emb.class_names):
        raise UserError(f"the checkpoint was pretrained on data with {trained_classes} classes but "
                        f"this data has {len(emb.class_names)}; evaluate it on its own dataset, or "
                        f"embed this data with ssl-blood embed and pass --embeddings")
    return emb


def _eval_out_dir(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    if args.embeddings:
        return Path(args.embeddings).with_suffix("").with_name(Path(args.embeddings).stem + "-eval")
    return Path(args.checkpoint).parent / "eval"


def _per_class_table(result: dict) -> str:
    lines = [f"{'class':24}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    for name, m in result["per_class"].items():
        lines.append(f"{name[:24]:24}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f1']:>10.4f}"
                     f"{m['support']:>9}")
    return "\n".join(lines)


def cmd_linear_probe(args: argparse.Namespace) -> int:
    from ssl_blood.checkpoint import write_json
    from ssl_blood.evaluate import probe_embeddings
    from ssl_blood.plots import confusion_matrix_png

    emb = _eval_embeddings(args)
    result = probe_embeddings(emb, device=args.device)
    out = _eval_out_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    result["confusion_matrix_png"] = str(confusion_matrix_png(
        result["confusion_matrix"], emb.class_names, out / "confusion_matrix.png",
        f"Linear probe, test: {emb.name}"))
    write_json(result, out / "linear_probe.json")
    if args.json:
        print(json.dumps(result))
        return 0
    auc = "n/a" if result["test_auc"] is None else f"{result['test_auc']:.4f}"
    print(f"linear probe on {emb.name} (weight decay {result['weight_decay']:g}, chosen on val)\n"
          f"  val ACC {result['val_acc']:.4f}   test ACC {result['test_acc']:.4f}   test AUC {auc}\n"
          f"  balanced ACC {result['balanced_acc']:.4f}   macro-F1 {result['macro_f1']:.4f}\n")
    print(_per_class_table(result))
    print(f"\nwrote {out / 'linear_probe.json'} and {result['confusion_matrix_png']}")
    return 0


def cmd_knn(args: argparse.Namespace) -> int:
    from ssl_blood.evaluate import knn_embeddings

    emb = _eval_embeddings(args)
    result = knn_embeddings(emb, args.k, args.temperature, args.split)
    if args.json:
        print(json.dumps(result))
        return 0
    auc = "n/a" if result["auc"] is None else f"{result['auc']:.4f}"
    print(f"weighted kNN (k={args.k}, T={args.temperature}) on {emb.name}, train gallery, "
          f"{args.split} queries\n  ACC {result['acc']:.4f}   AUC {auc}   balanced ACC "
          f"{result['balanced_acc']:.4f}   macro-F1 {result['macro_f1']:.4f}\n")
    print(_per_class_table(result))
    return 0


def cmd_few_shot(args: argparse.Namespace) -> int:
    from ssl_blood.evaluate import few_shot_embeddings

    emb = _eval_embeddings(args)
    results = few_shot_embeddings(emb, shots=_csv(args.shots, int),
                                  fractions=_csv(args.fractions, float),
                                  heads=_csv(args.heads), episodes=args.episodes, seed=args.seed)
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"few-shot on {emb.name}: test accuracy, mean and 95 % CI over {args.episodes} episodes")
    print(f"{'setting':16}{'labels':>7}  {'head':10}{'mean acc':>10}{'ci95':>9}")
    for r in results:
        ci = "" if r["ci95"] is None else f"±{r['ci95']:.4f}"
        print(f"{r['setting']:16}{r['labels']:>7}  {r['head']:10}{r['mean_acc']:>10.4f}{ci:>9}")
    return 0


def cmd_supervised(args: argparse.Namespace) -> int:
    from ssl_blood.supervised import SupervisedConfig, train_supervised

    out = Path(args.out) if args.out else None
    if out is not None:
        _refuse_existing(out / "checkpoint.pt", args.overwrite, "--out")
    cfg = SupervisedConfig(backbone=args.backbone, epochs=args.epochs, batch_size=args.batch_size,
                           lr=args.lr, augment=args.augment == "device", data=_source(args).to_dict(),
                           limit=args.limit, seed=args.seed, device=args.device)
    result = train_supervised(cfg, out)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}))
        return 0
    auc = "n/a" if result["test_auc"] is None else f"{result['test_auc']:.4f}"
    print(f"supervised {cfg.backbone}, {cfg.epochs} epochs on {result['device']} "
          f"({result['seconds']:.0f} s): best val ACC {result['val_acc']:.4f} at epoch "
          f"{result['best_epoch']}; test ACC {result['test_acc']:.4f}, test AUC {auc}")
    return 0


# ----------------------------------------------------------------------------- umap / report


def _read_json(path: str | None, what: str) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{what} {path}: cannot read it as JSON ({exc}); give the file ssl-blood "
                        f"wrote") from None


def cmd_umap(args: argparse.Namespace) -> int:
    from ssl_blood.embed import Embeddings
    from ssl_blood.umap_ig import umap_report

    emb = Embeddings.load(args.embeddings)
    compare = Embeddings.load(args.compare) if args.compare else None
    result = umap_report(emb, args.out, args.split, args.highlight, compare, args.seed,
                         _read_json(args.probe, "--probe"))
    if args.json:
        print(json.dumps(result))
        return 0
    main = result["analyses"][emb.name]
    share = main["same_class_neighbour_share"][result["highlight"]]
    print(f"{result['highlight']} ({main['cells']} {args.split} cells, {emb.name}): "
          f"{share:.1%} of their {main['k']} nearest neighbours share the class; nearest classes: "
          + ", ".join(f"{r['class']} ({r['cosine_distance']:.3f})" for r in main["nearest_classes"][:3])
          + f"; {main['subclusters']['k']} sub-clusters")
    print("wrote " + ", ".join(result["files"] + [str(Path(args.out) / "ig_analysis.json")]))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ssl_blood.report import build_report

    path = build_report(args.run, args.out, limit=args.limit, device=args.device,
                        baselines=_csv(args.baselines))
    print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from ssl_blood import __version__

    parser = _Parser(prog="ssl-blood", description="Self-supervised learning for blood-cell "
                     "microscopy: pretrain, embed, index, retrieve, evaluate, visualise.")
    parser.add_argument("--version", action="version", version=f"ssl-blood {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                metavar="COMMAND")

    p = sub.add_parser("pretrain", help="pretrain a backbone with SimCLR or DINO",
                       description="Pretrain a backbone with SimCLR or DINO; writes OUT/checkpoint.pt, "
                                   "OUT/config.json, OUT/metrics.jsonl.")
    p.add_argument("--method", choices=["simclr", "dino"], help="default simclr")
    p.add_argument("--preset", choices=["quick", "full"],
                   help="quick: CPU-sized (default without a GPU); full: ResNet-18 accuracy setting "
                        "(default with a GPU)")
    p.add_argument("--config", metavar="FILE", help="start from a config.json instead of a preset")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--backbone", help="resnet18, resnet18-s2, resnet18-imagenet, resnet34, "
                                      "resnet50, cnn6, cnn6-wide")
    p.add_argument("--optimizer", choices=["lars", "sgd", "adamw"])
    p.add_argument("--lr", type=float, help="learning rate at batch 256 (scaled linearly)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-epochs", type=int)
    p.add_argument("--input-size", type=int, help="side of the views the model sees "
                                                  "(default: the image size)")
    p.add_argument("--augment", choices=["device", "cpu"],
                   help="device: batched on the training device (default); cpu: lightly's PIL "
                        "transforms in a DataLoader")
    p.add_argument("--num-workers", type=int, help="DataLoader workers for --augment cpu")
    p.add_argument("--knn-every", type=int, help="epochs between kNN checks on val")
    _add_data_args(p)
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--seed", type=int)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on CUDA and on CPUs with fast bf16 (default)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any config setting, e.g. --set augment.hue=0.1 --set dino.output_dim=8192")
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/METHOD-PRESET)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("export", help="write the backbone's plain state_dict",
                       description="Write the evaluation backbone of a checkpoint as a plain "
                                   "state_dict that loads without ssl-blood (see docs/user-guide.md).")
    p.add_argument("--checkpoint", required=True, metavar="CKPT")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("embed", help="backbone features of data splits -> embeddings.npz",
                       description="Embed data splits with a checkpoint's backbone (or a baseline) "
                                   "into an embeddings.npz file.")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", metavar="CKPT")
    model.add_argument("--baseline", choices=["pixels", "random-init"],
                       help="standardised raw pixels, or the untrained --backbone")
    p.add_argument("--backbone", help="architecture for --baseline random-init (default resnet18)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed for random-init")
    _add_data_args(p)
    p.add_argument("--splits", help="comma-separated, default: every split the data has")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, metavar="EMB.npz")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("index", help="build a faiss index over one split of an embeddings file",
                       description="Build a cosine faiss index over the gallery split of an "
                                   "embeddings file (GPU when the faiss build has one).")
    p.add_argument("--embeddings", required=True, metavar="EMB.npz")
    p.add_argument("--gallery-split", default="train")
    p.add_argument("--kind", choices=["flat", "ivf", "ivfpq"], default="flat",
                   help="flat: exact (default); ivf: IVF-Flat; ivfpq: IVF-PQ, for millions of cells")
    p.add_argument("--nlist", type=int, help="IVF lists (default about 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, help="IVF lists searched per query")
    p.add_argument("--pq-m", type=int, help="IVF-PQ sub-quantisers (must divide the dimension)")
    p.add_argument("--faiss-device", choices=["auto", "gpu", "cpu"], default="auto")
    p.add_argument("--out", required=True, metavar="INDEX_DIR")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("retrieve", help="nearest cells of query images, or retrieval quality",
                       description="Find the most similar gallery cells of query cells, or "
                                   "(--evaluate) measure precision@k and mAP@10 of a whole split.")
    p.add_argument("--index", required=True, metavar="INDEX_DIR")
    p.add_argument("--image", nargs="+", metavar="PATH", help="query image files")
    p.add_argument("--split", help="query cells from this split (with --ids), or the split to "
                                   "evaluate (with --evaluate; default test)")
    p.add_argument("--ids", help="comma-separated positions within --split")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--json", action="store_true", help="one JSON value instead of a table")
    p.add_argument("--montage", metavar="OUT.png", help="picture of each query and its neighbours")
    p.add_argument("--evaluate", action="store_true", help="precision@1/5/10 and mAP@10 of --split")
    p.add_argument("--limit", type=int, help="with --evaluate: a stratified subset of queries")
    p.add_argument("--baseline-embeddings", nargs="+", metavar="EMB.npz",
                   help="with --evaluate: also score these embeddings files (e.g. baselines)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_retrieve)

    def add_eval_inputs(p: argparse.ArgumentParser) -> None:
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--checkpoint", metavar="CKPT", help="embed train/val/test with it first")
        src.add_argument("--embeddings", metavar="EMB.npz", help="from ssl-blood embed (also baselines)")
        _add_data_args(p)
        p.add_argument("--device", default="auto")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.set_defaults(baseline=None, backbone=None, seed=0)

    p = sub.add_parser("linear-probe", help="logistic regression on frozen features",
                       description="Multinomial logistic regression on frozen features; weight decay "
                                   "chosen on val, test scored once. Writes linear_probe.json and "
                                   "confusion_matrix.png to --out (default: beside the input).")
    add_eval_inputs(p)
    p.add_argument("--out", metavar="DIR")
    p.set_defaults(func=cmd_linear_probe)

    p = sub.add_parser("knn", help="weighted kNN accuracy (k=20, T=0.07)",
                       description="DINO's weighted cosine kNN: train split as gallery.")
    add_eval_inputs(p)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--split", default="test", help="query split (default test)")
    p.set_defaults(func=cmd_knn)

    p = sub.add_parser("few-shot", help="prototype / kNN / logistic heads with few labels",
                       description="Heads trained on small class-balanced labelled sets from train, "
                                   "scored on test; mean and 95 %% CI over episodes.")
    add_eval_inputs(p)
    p.add_argument("--shots", default="1,5,10,20", help="labels per class (comma-separated)")
    p.add_argument("--fractions", default="0.01,0.1", help="class-balanced fractions of train")
    p.add_argument("--heads", default="prototype,knn,logreg")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_few_shot)

    p = sub.add_parser("supervised", help="train the backbone end-to-end with labels (reference)",
                       description="MedMNIST v2 protocol: Adam 1e-3, x0.1 at 50 %% and 75 %% of the "
                                   "epochs, batch 128; best val epoch scored once on test.")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--augment", choices=["none", "device"], default="none",
                   help="none: the MedMNIST protocol; device: the core's batched augmentation")
    _add_data_args(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="DIR", help="write supervised.json and checkpoint.pt here")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_supervised)

    p = sub.add_parser("umap", help="UMAP maps and the immature-granulocyte analysis",
                       description="2-D UMAP (cosine) of one split coloured by class, the highlighted "
                                   "class against the rest, and ig_analysis.json with the numbers "
                                   "behind the picture.")
    p.add_argument("--embeddings", required=True, metavar="EMB.npz")
    p.add_argument("--split", default="test")
    p.add_argument("--highlight", default="immature granulocytes", help="class to analyse")
    p.add_argument("--compare", metavar="OTHER_EMB.npz", help="same panels for a baseline")
    p.add_argument("--probe", metavar="linear_probe.json", help="add the class's confusion rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=cmd_umap)

    p = sub.add_parser("report", help="one self-contained HTML page of a run",
                       description="Everything of one pretraining run on one HTML page (images "
                                   "embedded): config, training curves, evaluation with baselines, "
                                   "confusion matrix, UMAP, IG analysis, retrieval montages. Missing "
                                   "analyses are computed and kept in RUN/analysis/.")
    p.add_argument("--run", required=True, metavar="RUN_DIR")
    p.add_argument("--out", metavar="report.html", help="default RUN_DIR/report.html")
    p.add_argument("--baselines", default="pixels,random-init",
                   help="baselines to compare against (comma-separated; empty for none)")
    p.add_argument("--limit", type=int, help="stratified subset per split (quick looks)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_report)
    return parser


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
                 "nothing overwritten; a run that stops (non-finite loss, DINO collapse): one line, "
                 "exit code 1.", "", "```", parser.format_help().rstrip(), "```", ""]
        for name, command in sub.choices.items():
            parts += [f"## `ssl-blood {name}`", "", "```", command.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SslBloodError as exc:
        sys.stderr.write(f"ssl-blood {args.command}: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"ssl-blood {args.command}: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

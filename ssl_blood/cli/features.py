"""`embed`, `index`, `retrieve`: features of cells, their FAISS index, nearest cells."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ssl_blood import ui
from ssl_blood.cli.common import csv_list, add_data_args, add_json, print_json, embeddings_from_args
from ssl_blood.errors import UserError


HELP = {  # one line per command for `ssl-blood --help`, which builds no command's flags
    "embed": "backbone features of data splits -> embeddings file",
    "index": "build a faiss index over one split of an embeddings file",
    "retrieve": "nearest cells of query images, or retrieval quality",
}


def _add_embed(sub) -> None:
    from ssl_blood.features.embeddings import BASELINES, EXPORT_FORMATS, FEATURE_DTYPES
    from ssl_blood.model.backbones import backbone_names

    p = sub.add_parser("embed", help=HELP["embed"],
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
    add_data_args(p)
    p.add_argument("--splits", help="comma-separated, default: every split the data has")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="npz")
    p.add_argument("--dtype", choices=FEATURE_DTYPES, default="float32",
                   help="feature storage (npz/parquet); float16 halves the file")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, metavar="EMB.npz")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_embed)




def cmd_embed(args: argparse.Namespace) -> int:
    from ssl_blood.files import refuse_existing

    refuse_existing(args.out, args.overwrite)
    emb = embeddings_from_args(args)
    emb.export(args.out, args.format, args.dtype)
    counts = ", ".join(f"{s} {int((emb.split == s).sum())}" for s in emb.splits())
    print(f"wrote {args.out}: {len(emb.features)} x {emb.dim} features ({counts}) from {emb.name}")
    return 0


def _add_index(sub) -> None:
    from ssl_blood.features.index import INDEX_KINDS

    p = sub.add_parser("index", help=HELP["index"],
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
    p = sub.add_parser("retrieve", help=HELP["retrieve"],
                       description="Find the most similar gallery cells of query cells, or "
                                   "(--evaluate) measure precision@k and mAP@10 of a whole split.")
    p.add_argument("--index", required=True, metavar="INDEX_DIR")
    p.add_argument("--image", nargs="+", metavar="PATH", help="query image files")
    p.add_argument("--split", help="query cells from this split (with --ids), or the split to "
                                   "evaluate (with --evaluate; default test)")
    p.add_argument("--ids", help="comma-separated cells of --split: relative file paths (folders, "
                                 "manifests) or positions")
    p.add_argument("--k", type=int, default=10)
    add_json(p)
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
    from ssl_blood.features.neighbours import neighbours
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
        cells = csv_list(args.ids, str, "--ids")
        if not cells:
            raise UserError("--split needs --ids, e.g. --ids 0,17,42 (or file paths)")
        ids = retrieval.cell_positions(source, args.split, cells)
        images, labels = retrieval.images_from_split(source, args.split, ids)
        names = index.meta["class_names"]
        queries = [{"split": args.split, "id": i, "label": int(l),
                    "class": names[l] if 0 <= l < len(names) else None,
                    **({"path": c} if c != str(i) else {})} for i, l, c in zip(ids, labels, cells)]
        exclude = ids if same_split else None
    similarity, position = neighbours(index, embedder(images), args.k, exclude)
    answers = retrieval.describe(index, similarity, position, queries,
                                 retrieval.gallery_metadata(index))
    note = retrieval.shortfall(index, answers, args.k)
    if note:
        ui.note(note)  # main() writes its parameters as flags
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
                else f"{Path(a['query']['path']).name}\n{a['query']['class']}" if "path" in a["query"]
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
                                  k=args.k, exclude_ids=data.ids.numpy() if same_split else None)}
    for path in args.baseline_embeddings or []:
        emb = Embeddings.load(path)
        result[emb.name] = retrieval.evaluate_embeddings(emb, index.meta["gallery_split"], split,
                                                         args.k)
    if args.json:
        return print_json(result)
    for name, metrics in result.items():
        if isinstance(metrics, dict) and "overall" in metrics:
            print(f"== {name} ({split} queries against the {index.meta['gallery_split']} gallery)")
            print(_metrics_table(metrics))
    return 0


ADDERS = {"embed": _add_embed, "index": _add_index, "retrieve": _add_retrieve}

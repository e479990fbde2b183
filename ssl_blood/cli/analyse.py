"""`select`, `umap`, `explore`, `qc`, `report`: which cells to label, maps, checks, the report."""

from __future__ import annotations

import argparse
from pathlib import Path

from ssl_blood.cli.common import csv_list, add_json, print_json, read_json


HELP = {  # one line per command for `ssl-blood --help`, which builds no command's flags
    "select": "choose which train cells to label first",
    "umap": "UMAP maps and the immature-granulocyte analysis",
    "explore": "interactive map of the cells (one offline HTML file)",
    "qc": "duplicates, outliers and label suspects",
    "report": "one self-contained HTML page of a run",
}


def _add_select(sub) -> None:
    from ssl_blood.analysis.select import STRATEGIES

    p = sub.add_parser("select", help=HELP["select"],
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
    add_json(p)
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
        return print_json(result)
    print(f"wrote {args.out}: {args.budget} cells to label first ({args.strategy}, "
          f"{result['excluded']} already labelled)" + (f" and {args.montage}" if args.montage else ""))
    return 0




def _add_umap(sub) -> None:
    from ssl_blood.analysis.umap_ig import IG

    p = sub.add_parser("umap", help=HELP["umap"],
                       description="2-D UMAP (cosine) of one split coloured by class, the highlighted "
                                   "class against the rest, and ig_analysis.json with the numbers "
                                   "behind the picture.")
    p.add_argument("--embeddings", required=True, metavar="EMB.npz")
    p.add_argument("--split", help="default: test, or all the cells of a source without splits")
    p.add_argument("--highlight", default=IG, help="class to analyse")
    p.add_argument("--compare", metavar="OTHER_EMB.npz", help="same panels for a baseline")
    p.add_argument("--probe", metavar="linear_probe.json", help="add the class's confusion rows")
    p.add_argument("--seed", type=int, default=0)
    add_json(p)
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
                         read_json(args.probe, "--probe"))
    if args.json:
        return print_json(result)
    main = result["analyses"][emb.name]
    share = main["same_class_neighbour_share"][result["highlight"]]
    print(f"{result['highlight']} ({main['cells']} {result['split']} cells, {emb.name}): "
          f"{share:.1%} of their {main['k']} nearest neighbours share the class; nearest classes: "
          + ", ".join(f"{r['class']} ({r['cosine_distance']:.3f})" for r in main["nearest_classes"][:3])
          + f"; {main['subclusters']['k']} sub-clusters")
    print("wrote " + ", ".join(result["files"] + [str(Path(args.out) / "ig_analysis.json")]))
    return 0


def _add_explore(sub) -> None:
    p = sub.add_parser("explore", help=HELP["explore"],
                       description="One self-contained HTML page (no network at view time): the 2-D "
                                   "UMAP of a split, coloured by class, predicted class, probe "
                                   "right/wrong or outlier score; hover shows the cell, click lists "
                                   "its nearest cells; legend hides classes; box/lasso selection "
                                   "counts classes and downloads ids as CSV.")
    p.add_argument("--embeddings", required=True, metavar="EMB.npz")
    p.add_argument("--split", help="default: test, or all the cells of a source without splits")
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
    info = explore_page(emb, args.out, args.split, read_json(args.probe, "--probe"), args.index,
                        args.k, args.max_thumbnails, args.seed)
    print(f"wrote {args.out}: {info['cells']} {info['split']} cells, {info['thumbnails']} thumbnails, "
          f"{info['bytes'] / 1e6:.1f} MB")
    return 0


def _add_qc(sub) -> None:
    p = sub.add_parser("qc", help=HELP["qc"],
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
    add_json(p)
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
        return print_json(result)
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

    p = sub.add_parser("report", help=HELP["report"],
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
                        baselines=csv_list(args.baselines, flag="--baselines"))
    print(f"wrote {path}")
    return 0


ADDERS = {"select": _add_select, "umap": _add_umap, "explore": _add_explore, "qc": _add_qc, "report": _add_report}

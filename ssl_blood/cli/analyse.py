"""`select`, `umap`, `explore`, `qc`, `report`: which cells to label, maps, checks, the report."""

from __future__ import annotations

import argparse
from pathlib import Path

from ssl_blood.cli.common import (add_data_args, add_json, csv_list, print_json, read_json,
                                  source_from_args, source_given)


HELP = {  # one line per command for `ssl-blood --help`, which builds no command's flags
    "select": "choose which cells to label next (and a sheet to label them in)",
    "sheet": "an offline page to label the cells a CSV names; downloads labels.csv",
    "umap": "UMAP maps and the immature-granulocyte analysis",
    "explore": "interactive map of the cells (one offline HTML file)",
    "qc": "duplicates, outliers and label suspects",
    "report": "one self-contained HTML page of a run",
}


def class_list(text: str) -> list[str]:
    """Class names as given, empty ones kept: the sheet refuses them by name."""
    return [c.strip() for c in text.split(",")]


def _add_select(sub) -> None:
    from ssl_blood.analysis.select import AUTO, STRATEGIES

    p = sub.add_parser("select", help=HELP["select"],
                       description="The --budget train cells to label next, chosen on the "
                                   "embeddings: typiclust (most typical cell of each k-means "
                                   "cluster, best at the first few dozen labels), probcover "
                                   "(coverage, keeps its gain at larger budgets), kcenter "
                                   "(coreset), margin (the current --classifier's least sure "
                                   "cells, spread by clustering) or random. Cells in --exclude or "
                                   "--labels are not picked again. --sheet writes the page to "
                                   "label them in.")
    p.add_argument("--embeddings", required=True, metavar="EMB.npz")
    p.add_argument("--budget", type=int, required=True)
    p.add_argument("--strategy", choices=(AUTO, *STRATEGIES), default=AUTO,
                   help="auto (default): margin with --classifier, else typiclust; label in rounds "
                        "of about 40 (docs/classifier.md: 120 cells in three rounds made a better "
                        "classifier than 120 at once)")
    p.add_argument("--exclude", metavar="CELLS.csv",
                   help="cells already seen (a 'path' or 'id' column, e.g. an earlier picks.csv)")
    p.add_argument("--labels", metavar="LABELS.csv",
                   help="cells labelled so far (as the sheet downloads): not picked again, and "
                        "shown on the sheet as the picks' labelled neighbours")
    p.add_argument("--classifier", metavar="DIR", help="the current classifier (strategy margin)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, metavar="PICKS.csv")
    p.add_argument("--montage", metavar="PICKS.png", help="picture of the chosen cells")
    p.add_argument("--sheet", metavar="PICKS.html", help="labelling page for the chosen cells")
    p.add_argument("--classes", type=class_list, metavar="A,B,C",
                   help="the sheet's classes (default: the classifier's, the labels', the data's)")
    p.add_argument("--overwrite", action="store_true")
    add_json(p)
    p.set_defaults(func=cmd_select)


def cmd_select(args: argparse.Namespace) -> int:
    from ssl_blood.analysis.select import choose_cells

    result = choose_cells(args.embeddings, args.budget, args.out, args.strategy, args.exclude,
                          args.labels, args.classifier, args.seed, args.montage, args.sheet,
                          args.classes, args.overwrite)
    if args.json:
        return print_json(result)
    written = ", ".join(p for p in (args.montage, args.sheet) if p)
    print(f"wrote {args.out}: {args.budget} cells to label next ({result['strategy']}, "
          f"{result['excluded']} already seen)" + (f" and {written}" if written else ""))
    if args.sheet:
        print(f"open {args.sheet} in a browser, label the cells, download labels.csv and give it "
              f"to ssl-blood train-classifier --labels")
    return 0


def _add_sheet(sub) -> None:
    p = sub.add_parser("sheet", help=HELP["sheet"],
                       description="One offline HTML page to label the cells a CSV names (a "
                                   "'path' or 'id' column: picks.csv, labels.csv, corrections): "
                                   "each cell large, a class per cell by key or click, 'unsure' "
                                   "and 'not a cell', work kept across reloads, and a button that "
                                   "downloads labels.csv for ssl-blood train-classifier --labels.")
    p.add_argument("--labels", required=True, metavar="CELLS.csv")
    p.add_argument("--embeddings", metavar="EMB.npz",
                   help="the cells' embeddings: their data, and neighbours on the sheet")
    add_data_args(p)
    p.add_argument("--split", help="which split the cells are in (default train, or the only one)")
    p.add_argument("--classes", type=class_list, metavar="A,B,C")
    p.add_argument("--classifier", metavar="DIR", help="take the classes from this classifier")
    p.add_argument("--out", required=True, metavar="SHEET.html")
    p.add_argument("--overwrite", action="store_true")
    add_json(p)
    p.set_defaults(func=cmd_sheet)


def cmd_sheet(args: argparse.Namespace) -> int:
    from ssl_blood.analysis.sheet import sheet_for_file

    result = sheet_for_file(args.labels, args.out, source_from_args(args) if source_given(args) else None,
                            args.split, args.embeddings, args.classes, args.classifier, args.overwrite)
    if args.json:
        return print_json(result)
    print(f"wrote {args.out}: {result['cells']} cells, {result['labelled']} already labelled")
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


ADDERS = {"select": _add_select, "sheet": _add_sheet, "umap": _add_umap, "explore": _add_explore, "qc": _add_qc, "report": _add_report}

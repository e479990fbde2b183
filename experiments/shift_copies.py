"""What `train-classifier --shift-copies` buys on shifted slides: the logistic head with and
without shifted copies of its labelled cells, under every shift at severity 3.

120 typiclust-chosen train cells (seeds 0-2), every other train cell unlabelled (the shift check
and review pool), `Classifier.train` exactly as `train-classifier` does, once with
`shift_copies` 0 and once with COPIES; then `ssl-blood robustness`'s library code on the whole
test split: clean, and each shift at severity 3 (ssl-blood's own stain, blur, resampling and
brightness, the kinds the copies are made of, and MedMNIST-C's, which they are not: the
held-out test of whether the head learned robustness or only these shifts). Val is not used;
test is touched once per reported number. Resumable: each (seed, copies) result is written as
soon as it exists.

    python experiments/shift_copies.py --checkpoint runs/quick/checkpoint.pt

Writes experiments/results/shift_copies.json and its section of docs/robustness.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ssl_blood.analysis.robustness import REPORTED_SEVERITY, run_robustness
from ssl_blood.analysis.select import select_cells
from ssl_blood.classify.classifier import DEFAULT_VIEWS, Classifier
from ssl_blood.data import load_split
from ssl_blood.data.shifts import SHIFTS
from ssl_blood.files import write_json

from frozen_features import checkpoint_features, load_results, put_section, record_checkpoint

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
COPIES = 8
TAG = "shift-copies"
COLOUR_CLASSES = ("eosinophil", "basophil")  # told apart by their granules' colour


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--labels", type=int, default=120)
    parser.add_argument("--copies", type=int, default=COPIES)
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--corruptions", help="comma-separated (default: every available one)")
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "shift_copies.json"))
    parser.add_argument("--doc", default=str(REPO / "docs" / "robustness.md"))
    parser.add_argument("--doc-only", action="store_true", help="rewrite the doc section from --out")
    parser.add_argument("--tag", default=TAG, help="the doc section's name (one per label budget)")
    args = parser.parse_args()
    out = Path(args.out)
    results = load_results(out)
    if args.doc_only:
        return put_section(Path(args.doc), f"<!-- {args.tag}:start -->", f"<!-- {args.tag}:end -->",
                           document(results, args.tag))
    embedder, source, emb = checkpoint_features(args.checkpoint)
    train, test = load_split(source, "train"), load_split(source, "test")
    record_checkpoint(results, args.checkpoint, embedder, out)
    results.update(labels=args.labels, views=DEFAULT_VIEWS, results_file=out.name)
    for seed in map(int, args.seeds.split(",")):
        rows = np.sort([p["id"] for p in select_cells(emb, args.labels, "typiclust", seed=seed)["picks"]])
        cells = train.labelled_only_at(rows)
        for copies in (0, args.copies):
            key = f"seed{seed}-copies{copies}"
            if key in results["entries"]:
                continue
            started = time.monotonic()
            model = Classifier.train(embedder, cells, "logistic",
                                     seed=seed, shift_copies=copies)
            result = run_robustness(model, test, args.corruptions.split(",") if args.corruptions else None,
                                    severities=(REPORTED_SEVERITY,), progress=True)
            results["entries"][key] = {"seed": seed, "copies": copies, "cells": result["cells"],
                                       "rows": result["rows"], "skipped": result["skipped"],
                                       "minutes": (time.monotonic() - started) / 60}
            write_json(results, out)
            print(key, {r["corruption"]: round(r["accuracy"], 3) for r in result["rows"]}, flush=True)
    put_section(Path(args.doc), f"<!-- {args.tag}:start -->", f"<!-- {args.tag}:end -->",
                document(results, args.tag))


def _mean(entries: list[dict], corruption: str, value=lambda r: r["accuracy"]) -> float:
    return float(np.mean([value(next(r for r in e["rows"] if r["corruption"] == corruption))
                          for e in entries]))


def document(results: dict, tag: str = TAG) -> str:
    by_copies: dict[int, list[dict]] = {}
    for e in results["entries"].values():
        by_copies.setdefault(e["copies"], []).append(e)
    plain, copied = by_copies[0], by_copies[max(by_copies)]
    k = max(by_copies)
    names = [r["corruption"] for r in plain[0]["rows"] if r["corruption"] != "clean"]
    s = REPORTED_SEVERITY
    lines = [f"<!-- {tag}:start -->",
             f"## Shifted copies of the labelled cells, {results['labels']} labels (`train-classifier --shift-copies`, `experiments/shift_copies.py`)",
             "", f"Measured on {results['device']}: checkpoint `{results['checkpoint']}` "
             f"({results['checkpoint_sha256'][:19]}), {results['labels']} typiclust-chosen labels "
             f"(seeds {', '.join(str(e['seed']) for e in plain)}, mean), the logistic head with "
             f"{results['views']} views, without and with {k} shifted copies of each labelled cell "
             f"(each under one of {', '.join(SHIFTS)} at a random severity 1-5); the whole test split "
             f"({plain[0]['cells']} cells) at severity {s}, no adaptation. MedMNIST-C's corruptions are not among "
             f"the copies' shifts: they test whether the head learned robustness or only those shifts.", "",
             f"| shift at severity {s} | without copies | with {k} copies | change |", "|---|---|---|---|"]
    for name in ["clean", *names]:
        a, b = _mean(plain, name), _mean(copied, name)
        kind = "" if name in SHIFTS or name == "clean" else " (MedMNIST-C)"
        lines.append(f"| {name}{kind} | {a:.1%} | {b:.1%} | {100 * (b - a):+.1f} |")
    own = [n for n in names if n in SHIFTS]
    held = [n for n in names if n not in SHIFTS]

    def mean_over(entries: list[dict], group: list[str]) -> float:
        return float(np.mean([_mean(entries, n) for n in group])) if group else float("nan")

    lines += ["", "| | without copies | with copies |", "|---|---|---|"]
    for title, group in (("mean over ssl-blood's shifts", own), ("mean over MedMNIST-C's", held),
                         ("mean over all", names)):
        lines.append(f"| {title} | {mean_over(plain, group):.1%} | {mean_over(copied, group):.1%} |")
    worst = {tag: min(names, key=lambda n: _mean(e, n)) for tag, e in (("plain", plain), ("copied", copied))}
    lines.append(f"| worst shift | {worst['plain']} {_mean(plain, worst['plain']):.1%} | "
                 f"{worst['copied']} {_mean(copied, worst['copied']):.1%} |")
    for name in COLOUR_CLASSES:
        recall = lambda r, n=name: r["recall"].get(n, float("nan"))
        lines.append(f"| {name} recall, clean / stain | {_mean(plain, 'clean', recall):.1%} / "
                     f"{_mean(plain, 'stain', recall):.1%} | {_mean(copied, 'clean', recall):.1%} / "
                     f"{_mean(copied, 'stain', recall):.1%} |")
    for title, value in (("clean ECE", lambda r: r["ece"]), ("clean review share", lambda r: r["review_share"]),
                         ("clean accepted accuracy", lambda r: r["accepted_accuracy"])):
        fmt = "{:.3f}" if title.endswith("ECE") else "{:.1%}"
        lines.append(f"| {title} | {fmt.format(_mean(plain, 'clean', value))} | "
                     f"{fmt.format(_mean(copied, 'clean', value))} |")
    ece_plain, ece_copied = (_mean(e, "clean", lambda r: r["ece"]) for e in (plain, copied))
    clean_change = 100 * (_mean(copied, "clean") - _mean(plain, "clean"))
    lines += ["", f"What it says: the copies change clean accuracy by {clean_change:+.1f} points and the mean "
              f"over all shifts at severity {s} by {100 * (mean_over(copied, names) - mean_over(plain, names)):+.1f} "
              f"(ssl-blood's own {100 * (mean_over(copied, own) - mean_over(plain, own)):+.1f}, MedMNIST-C's "
              f"{100 * (mean_over(copied, held) - mean_over(plain, held)):+.1f}), and clean ECE from "
              f"{ece_plain:.3f} to {ece_copied:.3f} ({'worse' if ece_copied > ece_plain else 'better' if ece_copied < ece_plain else 'the same'}). "
              f"Cost: the copies are embedded "
              f"once when the classifier is trained ({k} x the labelled cells); predicting costs the same.", "",
              f"Per-class recall, ECE and review share of every row: `experiments/results/{results['results_file']}`.",
              "", f"<!-- {tag}:end -->"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

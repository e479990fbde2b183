"""A new lab's slides: what a few of its own labels give back (`train-classifier --from`).

The classifier of experiments/robustness.py: 120 typiclust-chosen BloodMNIST train cells, the
logistic head on a checkpoint's frozen features, trained with `Classifier.train` as
`train-classifier` does. The "new lab": every val and test cell under one fixed shift at
`--severity` (one stain draw for all of them, as one lab has one stain; MedMNIST-C's JPEG
compression and defocus blur, where AdaBN gave least back). Its val cells are the new lab's own
cells: k of them labelled, chosen `--picks` random or review (the k the classifier is least sure
of, by its review score under `--adapt auto`: the first cells a technologist corrects), the rest
unlabelled (the shift check's reference and the AdaBN head's cells once labels are added). On
the new lab's test cells, per shift and k:

- the classifier as it is (`predict --adapt none` and `auto`);
- the new lab's k labels added (`train-classifier --from clf --labels new-lab.csv`), both ways;
- a classifier from the new lab's k labels alone (none where a class has too few of them);
- and, on the first lab's own clean test cells, the classifier with the new lab's labels added
  (what it now does with the slides it was first trained for).

`--arms` measures some of these only (e.g. `added` after a change to what `--from` keeps).

No setting is chosen on val here (its cells are the new lab's pool); test is touched once per
reported number.

    python experiments/new_lab.py --checkpoint runs/quick/checkpoint.pt

Writes experiments/results/new_lab.json (resumable: done entries are kept) and its section of
docs/robustness.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ssl_blood.analysis.robustness import available_corruptions, score
from ssl_blood.analysis.select import select_cells
from ssl_blood.classify.classifier import Classifier
from ssl_blood.data import CellData, load_split
from ssl_blood.device import describe_device
from ssl_blood.errors import UserError
from ssl_blood.files import write_json

from frozen_features import checkpoint_features, load_results, put_section, record_checkpoint

REPO = Path(__file__).resolve().parents[1]
ADAPTS = ("none", "adabn", "auto")
ARMS = {"asis": "as it is", "added": "added", "alone": "alone"}  # --arms: the rows' arm names
FIRST_LAB = "added, first lab's slides"  # the added classifier on the first lab's clean test cells
SHIFTS = "stain,medmnistc-jpeg_compression,medmnistc-defocus_blur"


def shifted(cells: CellData, name: str, severity: int, seed: int) -> CellData:
    """`cells` under shift `name` (one draw of its parameters for all of them)."""
    images = available_corruptions()[name](cells.images.numpy(), severity, seed)
    return cells.with_images(images)


def labelling_order(base: Classifier, pool: CellData, how: str, seed: int) -> np.ndarray:
    """The order the new lab labels its cells in (its first k labelled: the first k rows): at
    random, or the cells the classifier is least sure of first (its review score under AdaBN
    where the shift check warns, as predict --adapt auto)."""
    if how == "random":
        return np.random.default_rng(seed).permutation(len(pool))
    prediction = base.predict_each(pool, ("auto",))["auto"]
    return np.argsort(prediction.review_scores, kind="stable")


def measured(model: Classifier, test: CellData, arm: str, k: int, extra: dict) -> list[dict]:
    """`model` on the new lab's test cells, with each adaptation it has (an AdaBN head needs at
    least 32 of the lab's own unlabelled cells: a tiny test's pool has fewer)."""
    adapts = ADAPTS if model.adapted_head is not None else ("none",)
    return [{"arm": arm, "k": k, **extra, "cells": len(test), **row} for row in score(model, test, adapts)]


def _accuracies(r: dict, shift: str, arm: str, k: int, adapt: str) -> list[float]:
    """Test accuracy of every draw of one setting (the doc's tables and verdict read these)."""
    return [x["accuracy"] for x in r["rows"] if (x["shift"], x["arm"], x["k"], x["adapt"]) == (shift, arm, k, adapt)]


def document(r: dict, tag: str) -> str:
    def cell(shift: str, arm: str, k: int, adapt: str) -> str:
        hit = _accuracies(r, shift, arm, k, adapt)
        if not hit:
            return "–"
        return f"{100 * np.mean(hit):.1f}" + (f" (n={len(hit)})" if len(hit) != r["draws"] else "")

    ks = r["ks"]
    measured_arms = {x["arm"] for x in r["rows"]}
    columns = ([("as it is", 0, "as it is")] if "as it is" in measured_arms else []) \
        + [("added", k, f"+{k} new-lab labels") for k in ks if "added" in measured_arms] \
        + [("alone", k, f"{k} new-lab labels alone") for k in ks if "alone" in measured_arms]
    header = ["shift", *(name for _, _, name in columns)]
    lines = [f"<!-- {tag}:start -->",
             f"## A new lab's own labels{', ' + r['heading'] if r.get('heading') else ''} (`train-classifier --from`, "
             "`experiments/new_lab.py`)", "",
             f"Measured on {r['device']} in {r['minutes']:.1f} min: checkpoint `{r['checkpoint']}` "
             f"({r['checkpoint_sha256'][:19]}); the classifier from {r['labels']} typiclust-chosen train labels "
             f"(logistic head, {r['views']} views); a new lab = val and test under one fixed shift at severity "
             f"{r['severity']}; its labelled cells: {r['picks']} "
             + ("(the ones the classifier is least sure of under `--adapt auto`: the first a technologist "
                "corrects)" if r["picks"] == "review" else "(at random)")
             + f" among its {r['pool']} val cells, the rest its unlabelled cells; accuracy on its "
             f"{r['cells']} test cells, mean over {r['draws']} draw(s) (label draw and stain draw)."
             + (f" {r['note']}" if r.get("note") else ""), ""]
    for adapt in ADAPTS:
        lines += [f"`predict --adapt {adapt}`:", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for shift in r["shifts"]:
            lines.append("| " + " | ".join([shift, *(cell(shift, arm, k, adapt) for arm, k, _ in columns)]) + " |")
        lines.append("")
    first = [(shift, k) for shift in r["shifts"] for k in ks if _accuracies(r, shift, FIRST_LAB, k, "none")]
    if first:
        lines += ["The first lab's own clean test cells, classified by the classifier with the new lab's labels "
                  "added (accuracy with `--adapt none` / `auto`; the share of draws whose whole test split "
                  "warned, and was adapted by `auto`):", "",
                  "| new lab | labels added | none | auto | warned | adapted by auto |", "|---|---|---|---|---|---|"]
        for shift, k in first:
            rows = [x for x in r["rows"] if (x["shift"], x["arm"], x["k"]) == (shift, FIRST_LAB, k)]
            auto = [x for x in rows if x["adapt"] == "auto"]
            lines.append(f"| {shift} | {k} | {cell(shift, FIRST_LAB, k, 'none')} | {cell(shift, FIRST_LAB, k, 'auto')} | "
                         f"{np.mean([bool(x['shift_warning']) for x in auto]):.0%} | "
                         f"{np.mean([x['adapted'] == 'adabn' for x in auto]):.0%} |")
        lines.append("")
    lines += [_verdict(r), "", f"Every row (balanced accuracy, per-class recall, ECE, review share, shift "
              f"warning): `experiments/results/{r['results_file']}`.", "", f"<!-- {tag}:end -->"]
    return "\n".join(lines) + "\n"


def _verdict(r: dict) -> str:
    """Per shift, at the largest k: the classifier as it is (with `auto`) against the new lab's
    labels added (without and with AdaBN) and alone."""
    k, parts = max(r["ks"]), []

    def acc(shift: str, arm: str, kk: int, adapt: str) -> float | None:
        hit = _accuracies(r, shift, arm, kk, adapt)
        return float(np.mean(hit)) if hit else None

    for shift in r["shifts"]:
        base, none, adabn = acc(shift, "as it is", 0, "auto"), acc(shift, "added", k, "none"), acc(shift, "added", k, "adabn")
        if None in (none, adabn):
            continue
        alone, auto, first = acc(shift, "alone", k, "none"), acc(shift, "added", k, "auto"), acc(shift, FIRST_LAB, k, "auto")

        def vs_base(x: float) -> str:
            return f" ({100 * (x - base):+.1f})" if base is not None else ""

        parts.append(f"{shift}: " + (f"{100 * base:.1f} % as it is, " if base is not None else "")
                     + f"{100 * none:.1f} % with them added{vs_base(none)}, {100 * adabn:.1f} % added and "
                     f"`--adapt adabn`{vs_base(adabn)}"
                     + (f", {100 * auto:.1f} % added and `--adapt auto`{vs_base(auto)}" if auto is not None else "")
                     + (f", {100 * alone:.1f} % from them alone" if alone is not None else "")
                     + (f"; the first lab's clean cells {100 * first:.1f} % with `auto`" if first is not None else ""))
    clean = [x["accuracy"] for x in r["rows"] if x["arm"] == "clean" and x["adapt"] == "none"]
    return (f"With {k} of the new lab's labels"
            + (", against the classifier as it is with `--adapt auto`" if "as it is" in {x["arm"] for x in r["rows"]} else "")
            + ": " + "; ".join(parts)
            + (f". On clean test cells the classifier as it is scores {100 * np.mean(clean):.1f} %." if clean else "."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--labels", type=int, default=120, help="the classifier's typiclust train labels")
    parser.add_argument("--shifts", default=SHIFTS, help="comma-separated ssl-blood robustness corruptions")
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--ks", default="10,20,40", help="the new lab's labels, comma-separated")
    parser.add_argument("--picks", choices=("random", "review"), default="review")
    parser.add_argument("--draws", type=int, default=2, help="label and stain draws (seeds 0..)")
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "new_lab.json"))
    parser.add_argument("--doc", default=str(REPO / "docs" / "robustness.md"))
    parser.add_argument("--tag", default="new-lab")
    parser.add_argument("--doc-only", action="store_true")
    parser.add_argument("--arms", default=",".join(ARMS),
                        help=f"what to measure, comma-separated: {', '.join(ARMS)} (added also measures the "
                             "added classifier on the first lab's clean test cells)")
    parser.add_argument("--note", help="a sentence for the doc section (kept in the results), e.g. what code measured")
    parser.add_argument("--heading", help="the doc section's heading's ending (kept in the results)")
    args = parser.parse_args()
    out, doc = Path(args.out), Path(args.doc)
    results = load_results(out)
    results.update({k: v for k, v in (("note", args.note), ("heading", args.heading)) if v})
    if args.doc_only:
        write_json(results, out)
        return put_section(doc, f"<!-- {args.tag}:start -->", f"<!-- {args.tag}:end -->", document(results, args.tag))
    if not args.checkpoint:
        parser.error("--checkpoint is needed to measure (only --doc-only goes without)")
    shifts, ks, arms = args.shifts.split(","), [int(k) for k in args.ks.split(",")], args.arms.split(",")
    if set(arms) - set(ARMS):
        parser.error(f"unknown --arms entry {sorted(set(arms) - set(ARMS))[0]}; choose from {', '.join(ARMS)}")
    unknown = [s for s in shifts if s not in available_corruptions()]
    if unknown:
        parser.error(f"unknown --shifts entry {unknown[0]}; choose from {', '.join(available_corruptions())}")
    started = time.monotonic()
    embedder, source, emb = checkpoint_features(args.checkpoint)
    record_checkpoint(results, args.checkpoint, embedder, out)
    train, val, test = (load_split(source, s) for s in ("train", "val", "test"))
    results.setdefault("rows", [])
    results.update(device=describe_device("cpu"), labels=args.labels, severity=args.severity, ks=ks,
                   picks=args.picks, draws=args.draws, views=args.views, shifts=shifts, pool=len(val),
                   cells=len(test), results_file=out.name)
    done = {(x["shift"], x["arm"], x["k"], x["draw"]) for x in results["rows"]}

    clock = [started]

    def keep(rows: list[dict]) -> None:
        results["rows"] += rows
        now = time.monotonic()
        results["minutes"] = results.get("minutes", 0) + (now - clock[0]) / 60  # a resumed run adds its own
        clock[0] = now
        write_json(results, out)

    for draw in range(args.draws):
        labelled = np.sort([p["id"] for p in select_cells(emb, args.labels, "typiclust", seed=draw)["picks"]])
        base = Classifier.train(embedder, train.labelled_only_at(labelled), "logistic", seed=draw, views=args.views)
        if ("clean", "clean", 0, draw) not in done:
            keep(measured(base, test, "clean", 0, {"shift": "clean", "draw": draw}))
        for shift in shifts:
            pool, new_test = shifted(val, shift, args.severity, draw), shifted(test, shift, args.severity, draw)
            info = {"shift": shift, "draw": draw}
            if "asis" in arms and (shift, "as it is", 0, draw) not in done:
                keep(measured(base, new_test, "as it is", 0, info))
            order = labelling_order(base, pool, args.picks, draw)
            for k in ks:
                rows = np.sort(order[:k])
                labels = np.bincount(pool.labels.numpy()[rows], minlength=len(base.class_names)).tolist()
                if "added" in arms and {(shift, "added", k, draw), (shift, FIRST_LAB, k, draw)} - done:
                    added = Classifier.train(embedder, pool.labelled_only_at(rows), "logistic", seed=draw, base=base)
                    extra = {**info, "new_labels_per_class": labels}  # each measured once (a resumed run)
                    keep([row for arm, cells in (("added", new_test), (FIRST_LAB, test)) if (shift, arm, k, draw) not in done
                          for row in measured(added, cells, arm, k, extra)])
                if "alone" in arms and (shift, "alone", k, draw) not in done:
                    try:
                        alone = Classifier.train(embedder, pool.labelled_only_at(rows), "logistic", seed=draw,
                                                 views=args.views)
                    except UserError as exc:  # a class with too few of the k labels: recorded, not a row
                        keep([{"arm": "alone", "k": k, **info, "adapt": "refused", "reason": str(exc)}])
                        continue
                    keep(measured(alone, new_test, "alone", k, {**info, "new_labels_per_class": labels}))
                print(shift, k, draw, "done", flush=True)
    put_section(doc, f"<!-- {args.tag}:start -->", f"<!-- {args.tag}:end -->", document(results, args.tag))


if __name__ == "__main__":
    main()

"""Stain and scanner shift on BloodMNIST: does predict's shift check fire, and what does a shift
cost in accuracy?

A classifier from 120 `select`-chosen train cells (typiclust, seed 0) on the frozen features of a
checkpoint (the quick preset's SimCLR by default), its shift check calibrated on 2,000 unlabelled
train cells as `train-classifier` does. Batches of 500 test cells: clean ones (target: the
warning fires for <= 5 %), and the same cells under each shift of ssl_blood/data/shifts.py at
severities 1-5 (target: >= 95 % at severity >= 3 for stain-colour and blur shifts). Then accuracy
on the whole test split under each shift at severity 3 against clean. No adaptation yet (AdaBN,
stain augmentation): this is the baseline they have to beat. Val is not used; test is touched
once per reported number.

    python experiments/shift.py --checkpoint runs/quick/checkpoint.pt

Writes experiments/results/shift.json and docs/robustness.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ssl_blood.analysis.select import select_cells
from ssl_blood.classify.classifier import SHIFT_POOL, Classifier
from ssl_blood.data import load_split
from ssl_blood.data.shifts import SHIFTS, apply_shift
from ssl_blood.device import describe_device
from ssl_blood.features.embeddings import Embedder
from ssl_blood.files import write_json

from frozen_features import checkpoint_features, put_section

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- shift:start -->", "<!-- shift:end -->"


def fire_rate(model: Classifier, embedder: Embedder, images: np.ndarray, batches: list[np.ndarray],
              shift: str | None, severity: int) -> float:
    fired = []
    for b, rows in enumerate(batches):
        x = images[rows] if shift is None else apply_shift(images[rows], shift, severity, seed=b)
        ood = model.ood_scores(embedder(torch.from_numpy(np.ascontiguousarray(x))))
        fired.append(model.shift_check(ood)["shift_warning"])
    return float(np.mean(fired))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--labels", type=int, default=120)
    parser.add_argument("--batch", type=int, default=500, help="cells per batch (a slide)")
    parser.add_argument("--clean-batches", type=int, default=40)
    parser.add_argument("--shift-batches", type=int, default=10)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "shift.json"))
    parser.add_argument("--doc", default=str(REPO / "docs" / "robustness.md"))
    args = parser.parse_args()
    embedder, source, emb = checkpoint_features(args.checkpoint)
    train = load_split(source, "train")
    test = load_split(source, "test")
    train_x = np.asarray(emb.select("train")[0], dtype=np.float32)
    rows = np.sort([p["id"] for p in select_cells(emb, args.labels, "typiclust", seed=0)["picks"]])
    rest = np.setdiff1d(np.arange(len(train_x)), rows)
    pool = np.random.default_rng(0).permutation(rest)[:SHIFT_POOL]  # as train-classifier samples
    model = Classifier.from_features(embedder, train_x[rows], train.subset(rows), clean=train_x[pool])
    images, labels = test.images.numpy(), test.labels.numpy()
    rng = np.random.default_rng(1)
    clean_batches = [rng.choice(len(images), args.batch, replace=False) for _ in range(args.clean_batches)]
    shift_batches = clean_batches[:args.shift_batches]
    result = {"device": describe_device("cpu"), "labels": args.labels, "batch": args.batch,
              "clean_fire_rate": fire_rate(model, embedder, images, clean_batches, None, 0),
              "fire_rate": {}, "accuracy": {}}
    print("clean", result["clean_fire_rate"], flush=True)
    for shift in SHIFTS:
        result["fire_rate"][shift] = {s: fire_rate(model, embedder, images, shift_batches, shift, s)
                                      for s in range(1, 6)}
        print(shift, result["fire_rate"][shift], flush=True)
    clean_x = np.asarray(emb.select("test")[0], dtype=np.float32)
    result["accuracy"]["clean"] = float((model.probabilities(clean_x).argmax(1) == labels).mean())
    for shift in SHIFTS:
        x = embedder(torch.from_numpy(apply_shift(images, shift, 3, seed=0)))
        result["accuracy"][shift] = float((model.probabilities(x).argmax(1) == labels).mean())
    write_json(result, args.out)
    put_section(Path(args.doc), START, END, document(result))


def document(r: dict) -> str:
    shifts = list(r["fire_rate"])
    lines = [START, f"Measured by `experiments/shift.py` on {r['device']}: the quick preset's SimCLR features, a "
             f"classifier from {r['labels']} typiclust-chosen train cells (logistic head), its shift check "
             f"calibrated on 2,000 unlabelled train cells as `train-classifier` does; shifts from "
             f"`ssl_blood/data/shifts.py` (HED stain balance, blur, resampling, brightness) applied to "
             f"BloodMNIST test cells. MedMNIST-C's corruptions are not in this table yet (medmnistc needs "
             f"ImageMagick through Wand).", "",
             f"## Does `predict` warn? (batches of {r['batch']} cells)", "",
             f"Clean test batches: the warning fired for **{100 * r['clean_fire_rate']:.0f} %** (target <= 5 %).", "",
             "| shift | " + " | ".join(f"severity {s}" for s in range(1, 6)) + " |", "|---|" + "---|" * 5]
    for shift in shifts:
        lines.append(f"| {shift} | " + " | ".join(f"{100 * v:.0f} %" for v in r["fire_rate"][shift].values()) + " |")
    missed = [f"{name} (severity 3: {100 * r['fire_rate'][name][3]:.0f} %)" for name in shifts
              if min(r["fire_rate"][name][s] for s in (3, 4, 5)) < 0.95]
    lines += ["", "Target: >= 95 % at severity >= 3 for the stain-colour and blur shifts. "
              + (f"Missed for {', '.join(missed)}: the median distance to the labelled cells moves less "
                 f"than clean batches vary for these shifts (a mild blur of a 28-px cell barely moves its "
                 f"embedding, and a stain draw can shift colour along directions the features ignore), so a "
                 f"shift statistic beyond the median OOD score (e.g. a kernel two-sample test on the "
                 f"embeddings) is the next step." if missed else "Met for every shift."), "",
              "## What a shift costs (whole test split, severity 3, no adaptation)", "",
              "| | accuracy |", "|---|---|", f"| clean | {100 * r['accuracy']['clean']:.1f} % |"]
    lines += [f"| {s} | {100 * r['accuracy'][s]:.1f} % |" for s in shifts]
    lines += ["", "With adaptation, every severity and the per-class recall: the next section. Numbers: "
              "`experiments/results/shift.json`.", "", END]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

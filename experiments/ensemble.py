"""Does keeping the calibration folds' models pay? `train-classifier --ensemble` against the one
trained model it is built around, from the same runs (paired), on BloodMNIST test.

For 120 labelled train cells chosen by `select` (typiclust, seeds 0-2) and each head that trains
the backbone (`--heads`, default fine-tune): one `Classifier.train(..., ensemble=True)` per draw,
every setting from the labelled cells (cross-validation, cross-fitting) and the train split's
unlabelled cells; val unused. Then the trained model alone (its matched temperature and review
threshold, as `train-classifier` without --ensemble keeps it) and the ensemble (the average of it
and its fold models) each classify the test split once through `Classifier.predict`: accuracy,
ECE and NLL, the review at its own threshold, accepted accuracy at 15 % review and error
enrichment at 20 % by its review score, and cells per second. Resumable per (head, draw).

    python experiments/ensemble.py --checkpoint runs/quick/checkpoint.pt

Writes experiments/results/ensemble.json and the section `ensemble` of docs/classifier.md.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import numpy as np

from ssl_blood.classify.calibration import negative_log_likelihood
from ssl_blood.classify.classifier import Classifier, Prediction, remove_run_states
from ssl_blood.classify.consistency import ConsistencyConfig
from ssl_blood.data import load_split
from ssl_blood.files import write_json

from frozen_features import checkpoint_features, load_results, put_section, record_checkpoint
from loop_classifier import picks, review_figures

REPO = Path(__file__).resolve().parents[1]
TAG = "ensemble"
SEEDS = (0, 1, 2)


def scored(prediction: Prediction, seconds: float, truth: np.ndarray) -> dict[str, Any]:
    """What a lab sees of one classifier on the test split, and how fast."""
    p = prediction.probabilities
    return {**review_figures(p, prediction.review_scores, prediction.review, truth),
            "nll": negative_log_likelihood(p, truth), "review_score": prediction.review_score,
            "cells_per_s": float(len(truth) / seconds)}


def timed_predict(model: Classifier, cells) -> tuple[Prediction, float]:
    started = time.perf_counter()
    prediction = model.predict(cells)
    return prediction, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--heads", default="fine-tune", help="comma-separated: fine-tune, fixmatch")
    parser.add_argument("--labels", type=int, default=120)
    parser.add_argument("--picks", choices=("typiclust", "loop"), default="typiclust",
                        help="the labelled cells: typiclust all at once, or the labelling loop "
                             "(40 typiclust, then margin rounds of 40: experiments/loop_classifier.py)")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--steps", type=int, default=500, help="training steps per run (the default's)")
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "ensemble.json"))
    parser.add_argument("--doc", default=str(REPO / "docs" / "classifier.md"))
    parser.add_argument("--tag", default=TAG, help="the doc section's name (one per results file)")
    args = parser.parse_args()
    out = Path(args.out)
    results = load_results(out)
    embedder, source, emb = checkpoint_features(args.checkpoint)
    record_checkpoint(results, args.checkpoint, embedder, out)
    results["results_file"] = out.name
    train, test = load_split(source, "train"), load_split(source, "test")
    truth = test.labels.numpy()
    for head in args.heads.split(","):
        for seed in map(int, args.seeds.split(",")):
            key = f"{head}-{args.labels}-seed{seed}" + ("-loop" if args.picks == "loop" else "")
            if key in results["entries"]:
                continue
            how = "loop: typiclust then margin" if args.picks == "loop" else "typiclust at once"
            rows = picks(how, emb, embedder, train, args.labels, seed)
            state = out.with_suffix("") / f"{key}.state.pt"  # to resume an interrupted run
            started = time.process_time()
            model = Classifier.train(embedder, train.labelled_only_at(rows), head, seed,
                                     consistency=ConsistencyConfig(seed=seed, steps=args.steps),
                                     state_path=state, ensemble=True)
            cpu_minutes = (time.process_time() - started) / 60
            single = copy.copy(model)  # the trained model as train-classifier keeps it without --ensemble
            single.members, single.ensemble = [], None
            results["entries"][key] = {
                "head": head, "labels": args.labels, "picks": args.picks, "seed": seed,
                "models": 1 + len(model.members),
                "cpu_minutes_training": round(cpu_minutes, 1),
                "single": scored(*timed_predict(single, test), truth),
                "ensemble": scored(*timed_predict(model, test), truth)}
            write_json(results, out)
            remove_run_states(state)
            print(key, {k: round(results["entries"][key][k]["accuracy"], 4) for k in ("single", "ensemble")})
    put_section(Path(args.doc), f"<!-- {args.tag}:start -->", f"<!-- {args.tag}:end -->", document(results, args.tag))


def document(results: dict, tag: str = TAG) -> str:
    """The doc section: one row per (head, which model), mean ± SD over draws, and the reading."""
    entries = list(results["entries"].values())
    title = "## An ensemble of the calibration folds' models (`train-classifier --ensemble`)"
    lines = [f"<!-- {tag}:start -->", title + (f", checkpoint `{results['checkpoint']}`" if tag != TAG else ""), "",
             f"Measured by `experiments/ensemble.py` on {results['device']} (results in "
             f"`experiments/results/{results['results_file']}`): checkpoint `{results['checkpoint']}` "
             f"({results['checkpoint_sha256'][:19]}), labels chosen by typiclust all at once or by "
             f"the labelling loop (section 'Which cells to label'), one training per draw with "
             f"`ensemble` on; the trained model alone (as `train-classifier` keeps it without "
             f"--ensemble) and the ensemble (the average of it and its fold models) each classify "
             f"the test split once. Review scores and thresholds are each classifier's own.", "",
             "| head | labels | draws | models | test accuracy | ECE | NLL | own threshold: review rate, accepted accuracy "
             "| accepted accuracy at 15 % review | error enrichment at 20 % review | cells/s (8 views) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = _groups(entries)
    for (head, labels, how), group in groups.items():
        for which in ("single", "ensemble"):
            rows = [e[which] for e in group]
            models = 1 if which == "single" else group[0]["models"]

            def ms(f):
                values = [f(r) for r in rows]
                return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"
            lines.append(
                f"| {head} | {labels} ({how}) | {len(rows)} | {models} | {ms(lambda r: r['accuracy'])} | {ms(lambda r: r['ece'])} "
                f"| {ms(lambda r: r['nll'])} | {np.mean([r['own_threshold']['review_rate'] for r in rows]):.1%}, "
                f"{ms(lambda r: r['own_threshold']['accepted_accuracy'])} | {ms(lambda r: r['review_15']['accepted_accuracy'])} "
                f"| {np.mean([r['review_20']['error_enrichment'] for r in rows]):.1f}x "
                f"| {np.mean([r['cells_per_s'] for r in rows]):.0f} |")
    lines += ["", _reading(groups), f"<!-- {tag}:end -->"]
    return "\n".join(lines) + "\n"


def _groups(entries: list[dict]) -> dict[tuple, list[dict]]:
    """The draws of each (head, labels, picks), in sorted order (entries before picks had typiclust)."""
    groups: dict[tuple, list[dict]] = {}
    for e in entries:
        groups.setdefault((e["head"], e["labels"], e.get("picks", "typiclust")), []).append(e)
    return dict(sorted(groups.items()))


def _reading(groups: dict[tuple, list[dict]]) -> str:
    """Per head: the ensemble's change in each figure, and in how many draws it helped."""
    parts = []
    for (head, labels, how), group in groups.items():

        def change(f):
            return float(np.mean([f(e["ensemble"]) - f(e["single"]) for e in group]))
        better_ece = sum(e["ensemble"]["ece"] < e["single"]["ece"] for e in group)
        better_acc = sum(e["ensemble"]["review_15"]["accepted_accuracy"] > e["single"]["review_15"]["accepted_accuracy"]
                         for e in group)
        ece = np.mean([e["ensemble"]["ece"] for e in group])
        parts.append(
            f"{head} at {labels} labels ({how}): the ensemble changes accuracy by {100 * change(lambda r: r['accuracy']):+.1f} "
            f"points, ECE by {change(lambda r: r['ece']):+.3f} (to {ece:.3f}: target ≤ 0.03 "
            f"{'met' if ece <= 0.03 else 'missed'}; lower in {better_ece} of {len(group)} draws), accepted accuracy "
            f"at 15 % review by {100 * change(lambda r: r['review_15']['accepted_accuracy']):+.1f} points (higher in "
            f"{better_acc} of {len(group)}), enrichment at 20 % by {change(lambda r: r['review_20']['error_enrichment']):+.1f}x, "
            f"at {np.mean([e['single']['cells_per_s'] / e['ensemble']['cells_per_s'] for e in group]):.1f}x the "
            f"prediction time" + (_targets(group) if labels == 120 else ""))
    return "What it says: " + "; ".join(parts) + "."


def _targets(group: list[dict]) -> str:
    """The ensemble, then the trained model alone, against the classifier issue's targets at 120
    labels (90 % accepted accuracy at 15 % review, 6x error enrichment at 20 %), with how many
    draws reach each."""
    return _against_targets(group, "ensemble", "ensemble's") + _against_targets(group, "single", "the trained model alone:")


def _against_targets(group: list[dict], which: str, name: str) -> str:
    accepted = [e[which]["review_15"]["accepted_accuracy"] for e in group]
    enrichment = [e[which]["review_20"]["error_enrichment"] for e in group]
    return (f" ({name} accepted accuracy {np.mean(accepted):.1%}: target ≥ 90 % "
            f"{'met' if np.mean(accepted) >= 0.90 else 'missed'}, reached in {sum(a >= 0.90 for a in accepted)} "
            f"of {len(group)} draws; enrichment {np.mean(enrichment):.1f}x: target ≥ 6x "
            f"{'met' if np.mean(enrichment) >= 6 else 'missed'}, reached in {sum(x >= 6 for x in enrichment)} "
            f"of {len(group)})")


if __name__ == "__main__":
    main()

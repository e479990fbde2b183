"""Which 120 cells to label for a classifier a lab can trust: all at once, or round by round?

On BloodMNIST with a checkpoint's features: (a) 120 cells chosen at once by `select`'s
typiclust (how docs/classifier.md measures), (b) the labelling loop of docs/your-own-slide.md:
40 typiclust cells, then rounds of 40 chosen by `select --strategy margin` with the classifier
trained so far (logistic head, 1 view, as `experiments/label_loop.py` runs it), and (c) 120
random cells. Each set then trains `train-classifier`'s default classifier (logistic head, 8
views, every setting by cross-validation on the labelled cells; val unused), which classifies the
test split once: accuracy, ECE, accepted accuracy at 15 % review and error enrichment at 20 %
by its own review score, and the review at its own threshold. Seeds 0-2; resumable.

    python experiments/loop_classifier.py --checkpoint runs/quick/checkpoint.pt

Writes experiments/results/loop_classifier.json and the section `loop-classifier` of
docs/classifier.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ssl_blood.analysis.select import select_cells
from ssl_blood.classify.calibration import expected_calibration_error
from ssl_blood.classify.classifier import Classifier, _pool_rows, review_at_rate
from ssl_blood.data import load_split
from ssl_blood.files import write_json

from frozen_features import checkpoint_features, load_results, put_section, repo_relative, view_features

REPO = Path(__file__).resolve().parents[1]
TAG = "loop-classifier"
SEEDS = (0, 1, 2)
PICKS = ("typiclust at once", "loop: typiclust then margin", "random")


def picks(how: str, emb, embedder, train_x: np.ndarray, train, budget: int, cold: int, size: int,
          seed: int) -> np.ndarray:
    """Rows of the train cells labelled by `how` (PICKS)."""
    if how == "random":
        return np.sort(np.random.default_rng(seed).choice(len(train_x), budget, replace=False))
    if how == "typiclust at once":
        return np.sort([p["id"] for p in select_cells(emb, budget, "typiclust", seed=seed)["picks"]])
    labelled = [p["id"] for p in select_cells(emb, cold, "typiclust", seed=seed)["picks"]]
    for r in range((budget - cold) // size):  # as experiments/label_loop.py runs a round
        rows = np.sort(np.asarray(labelled))
        model = Classifier.from_features(embedder, train_x[rows], train.subset(rows), seed=seed)
        chosen = select_cells(emb, size, "margin", labelled, seed=seed + 100 * (r + 1),
                              probabilities=model.probabilities(train_x))["picks"]
        labelled += [p["id"] for p in chosen]
    return np.sort(np.asarray(labelled))


def review_figures(probabilities: np.ndarray, scores: np.ndarray, review: np.ndarray,
                   truth: np.ndarray) -> dict:
    """Accuracy, ECE, the review at the classifier's own threshold (`review` flags) and at 15 % /
    20 % by its review `scores`: what a lab sees of one classifier (experiments/ensemble.py too)."""
    correct = probabilities.argmax(1) == truth
    return {"accuracy": float(correct.mean()), "ece": expected_calibration_error(probabilities, truth),
            "own_threshold": {"review_rate": float(review.mean()),
                              "accepted_accuracy": float(correct[~review].mean())},
            "review_15": review_at_rate(scores, correct, 0.15),
            "review_20": review_at_rate(scores, correct, 0.20)}


def scored(model: Classifier, x: np.ndarray, y: np.ndarray) -> dict:
    probabilities = model.probabilities(x)
    scores = model.review_scores(probabilities, x)
    review = model.review_flags(probabilities, model.ood_scores(x), scores=scores)
    return {**review_figures(probabilities, scores, review, y),
            "labels_per_class": np.bincount(model.tensors["labels"].numpy(), minlength=len(model.class_names)).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--labels", type=int, default=120)
    parser.add_argument("--cold", type=int, default=40, help="cold-start typiclust cells of the loop")
    parser.add_argument("--size", type=int, default=40, help="cells per round of the loop")
    parser.add_argument("--views", type=int, default=8, help="the classifier's (train-classifier's default)")
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "loop_classifier.json"))
    parser.add_argument("--doc", default=str(REPO / "docs" / "classifier.md"))
    args = parser.parse_args()
    out = Path(args.out)
    results = load_results(out)
    embedder, source, emb = checkpoint_features(args.checkpoint)
    results.update(checkpoint=repo_relative(args.checkpoint), checkpoint_sha256=embedder.identity)
    train = load_split(source, "train")
    train_x1 = np.asarray(emb.select("train")[0], dtype=np.float32)  # what select and the loop read
    train_y, test_y = emb.select("train")[1], emb.select("test")[1]
    features = view_features(args.checkpoint, embedder, source, args.views)
    for how in PICKS:
        for seed in SEEDS:
            key = f"{how}-{args.labels}-seed{seed}"
            if key in results["entries"]:
                continue
            rows = picks(how, emb, embedder, train_x1, train, args.labels, args.cold, args.size, seed)
            hidden = np.full(len(train_y), -1, dtype=np.int64)
            hidden[rows] = train_y[rows]
            pool = _pool_rows(train.with_labels(hidden, train.class_names), seed)  # as train-classifier draws it
            model = Classifier.from_features(embedder, features["train"][rows], train.subset(rows), seed=seed,
                                             views=args.views, clean=features["train"][pool],
                                             clean_images=train.subset(pool).images)
            results["entries"][key] = {"picks": how, "labels": int(len(rows)), "seed": seed,
                                       **scored(model, features["test"], test_y)}
            write_json(results, out)
            print(key, round(results["entries"][key]["accuracy"], 4),
                  round(results["entries"][key]["review_15"]["accepted_accuracy"], 4), flush=True)
    put_section(Path(args.doc), f"<!-- {TAG}:start -->", f"<!-- {TAG}:end -->", document(results, args))


def document(results: dict, args: argparse.Namespace) -> str:
    entries = list(results["entries"].values())
    lines = [f"<!-- {TAG}:start -->", "## Which cells to label: all at once, or round by round", "",
             f"Measured by `experiments/loop_classifier.py` on {results['device']} (results in "
             f"`experiments/results/{Path(args.out).name}`): checkpoint `{results['checkpoint']}` "
             f"({results['checkpoint_sha256'][:19]}). {args.labels} train cells labelled three ways: "
             f"typiclust all at once; the loop, {args.cold} typiclust cells then rounds of {args.size} "
             f"`select --strategy margin` picks of the classifier trained so far; random. Each set "
             f"trains the default classifier (logistic head, {args.views} views, settings by "
             f"cross-validation on the labelled cells), which classifies the test split once. "
             f"Mean ± SD over seeds 0-2.", "",
             "| cells | draws | test accuracy | ECE | own threshold: review rate, accepted accuracy "
             "| accepted accuracy at 15 % review | error enrichment at 20 % review | fewest labels in a class |",
             "|---|---|---|---|---|---|---|---|"]
    means = {}
    for how in PICKS:
        rows = [e for e in entries if e["picks"] == how]
        if not rows:
            continue

        def ms(f):
            values = [f(r) for r in rows]
            return f"{np.mean(values):.3f} ± {np.std(values):.3f}"
        means[how] = float(np.mean([r["review_15"]["accepted_accuracy"] for r in rows]))
        lines.append(f"| {how} | {len(rows)} | {ms(lambda r: r['accuracy'])} | {ms(lambda r: r['ece'])} "
                     f"| {np.mean([r['own_threshold']['review_rate'] for r in rows]):.1%}, "
                     f"{ms(lambda r: r['own_threshold']['accepted_accuracy'])} "
                     f"| {ms(lambda r: r['review_15']['accepted_accuracy'])} "
                     f"| {np.mean([r['review_20']['error_enrichment'] for r in rows]):.1f}x "
                     f"| {np.mean([min(r['labels_per_class']) for r in rows]):.1f} |")
    best = max(means, key=means.get)
    lines += ["", f"What it says: at {args.labels} labels, accepted accuracy at 15 % review is highest "
                  f"with **{best}** ({means[best]:.1%}; target 90 %: "
                  f"{'met' if means[best] >= 0.90 else 'missed'}); "
              + ", ".join(f"{how} {m:.1%}" for how, m in means.items() if how != best) + ".",
              f"<!-- {TAG}:end -->"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Which temperature calibrates a head that trained the backbone (fine-tune, fixmatch)? Measured
on BloodMNIST **val** (the choice of rule; test is scored once by classifier.py).

For 120 typiclust-chosen train labels (seeds 0-2) the head's training runs once on all labels
(the trained model) and again on each cross-fitting fold (`train-classifier`'s
`--calibration-folds`, 3 folds, at most the smallest class's cells), as `train-classifier` does;
the val logits of every model and the fold models' held-out logits of the labelled cells are
kept per draw (RESULTS_DIR/trained_head_temperature/<head>-seed<S>.npz, so a run resumes). Then
val is split in two halves at random: one half stands for the lab's unlabelled cells (no labels
read), the other is scored:

- held-out rule: the temperature fitted on the fold models' held-out logits, kept when > 1
  (train-classifier before the matched rule);
- matched: the temperature that brings the trained model's probabilities on the unlabelled half
  closest to the average of all the models' (`Classifier.recalibrate` with `ensemble`);
- the ensemble itself (the average of all the models' probabilities: k + 1 backbones per cell);
- the best temperature for the scored half (an oracle, to see how far each rule is).

    python experiments/trained_head_temperature.py --checkpoint runs/quick/checkpoint.pt [--head fine-tune]

Writes experiments/results/trained_head_temperature.json and its section of docs/classifier.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ssl_blood.analysis.select import select_cells
from ssl_blood.classify.calibration import (calibration_report, expected_calibration_error,
                                            fit_temperature, matching_temperature,
                                            negative_log_likelihood, softmax)
from ssl_blood.classify.classifier import (CALIBRATION_FOLDS, DEFAULT_VIEWS, _calibration_folds,
                                           _cross_fitted_logits, _cross_validated_logistic,
                                           _fit_logits, _trained_backbone)
from ssl_blood.classify.consistency import ConsistencyConfig
from ssl_blood.data import load_split
from ssl_blood.files import write_json

from classifier import review_at_rate
from frozen_features import checkpoint_features, load_results, put_section, repo_relative

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
LABELS = 120


def member_logits(checkpoint: str, head: str, seed: int, steps: int, path: Path,
                  budget: int = LABELS) -> dict[str, np.ndarray]:
    """Val logits of the trained model and of each fold model (k + 1, N, C), the fold models'
    held-out logits of the labelled cells, their labels and folds: read from `path` or made."""
    if path.exists():
        return dict(np.load(path))
    embedder, source, emb = checkpoint_features(checkpoint)
    train, val = load_split(source, "train"), load_split(source, "val")
    rows = np.sort([p["id"] for p in select_cells(emb, budget, "typiclust", seed=seed)["picks"]])
    cells = train.labelled_only_at(rows)
    labels = cells.labels.numpy()[rows]
    cfg = ConsistencyConfig(seed=seed, steps=steps)
    folds = _calibration_folds(labels, CALIBRATION_FOLDS, seed)
    _, trained, _, _ = _trained_backbone(head, embedder, cells, seed, cfg, None, None)
    fit = _cross_validated_logistic(trained(train.subset(rows).images, views=DEFAULT_VIEWS), labels,
                                    len(train.class_names), seed)
    members = [_fit_logits(fit, trained(val.images, views=DEFAULT_VIEWS))]
    # the fold models score val's cells, which stand in for the lab's unlabelled cells
    oof, fold_val, _ = _cross_fitted_logits(head, embedder, cells, folds, seed, cfg, None, None,
                                         DEFAULT_VIEWS, pool=val.images)
    out = {"members": np.concatenate([np.stack(members), fold_val]), "oof": oof, "labels": labels,
           "folds": folds, "val_labels": val.labels.numpy()}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def scores(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    correct = probabilities.argmax(1) == labels
    return {"accuracy": float(correct.mean()), "ece": expected_calibration_error(probabilities, labels),
            "nll": negative_log_likelihood(probabilities, labels),
            "accepted_accuracy_15": review_at_rate(probabilities.max(1), correct, 0.15)["accepted_accuracy"]}


def compare(draw: dict[str, np.ndarray]) -> dict:
    """The rules on one draw: temperatures and the scored half's figures."""
    members, y = draw["members"], draw["val_labels"]
    order = np.random.default_rng(0).permutation(len(y))
    pool, scored = order[:len(y) // 2], order[len(y) // 2:]
    final = members[0]
    average = np.mean([softmax(m) for m in members], axis=0)
    held_out = calibration_report(draw["oof"], draw["labels"], draw["folds"], cross_fitted=True)["temperature"]
    matched = matching_temperature(final[pool], average[pool])
    oracle = fit_temperature(final[scored], y[scored])
    return {"fold_models": int(len(members) - 1),
            "temperature": {"held_out_rule": held_out, "matched": matched, "oracle": oracle},
            "uncalibrated": scores(softmax(final[scored]), y[scored]),
            "held_out_rule": scores(softmax(final[scored], held_out), y[scored]),
            "matched": scores(softmax(final[scored], matched), y[scored]),
            "ensemble": scores(average[scored], y[scored])}


RULES = ("uncalibrated", "held_out_rule", "matched", "ensemble")
START, END = "<!-- trained-head-temperature:start -->", "<!-- trained-head-temperature:end -->"


def section(results: dict) -> str:
    """The table of every draw and what it says, computed from the results."""
    entries = list(results["entries"].values())
    lines = [START, "## How a head that trained the backbone gets its temperature", "",
             f"Measured by `experiments/trained_head_temperature.py` on {results['device']} (results in "
             f"`experiments/results/trained_head_temperature.json`), on BloodMNIST **val**, where the rule "
             f"was chosen: checkpoint `{results['checkpoint']}`, typiclust labels, the head trained once "
             f"on all of them and once per cross-fitting fold. One random half of val stands for the lab's "
             f"unlabelled cells (its labels unread), the other half is scored. `held-out` is the "
             f"temperature fitted on the fold models' held-out logits of the labelled cells (kept when "
             f"above 1: the rule before), `matched` the one that brings the trained model to the "
             f"average of all the models on the unlabelled half (`train-classifier` now), `oracle` the "
             f"best for the scored half; `ensemble` predicts with that average itself (k + 1 backbones "
             f"per cell).", "",
             "| head | labels | draw | fold models | temperature: held-out / matched / oracle | ECE: uncalibrated / "
             "held-out / matched / ensemble | accepted accuracy at 15 % review: trained model / ensemble |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        t = e["temperature"]
        lines.append(f"| {e['head']} | {e['labels']} | {e['seed']} | {e['fold_models']} | {t['held_out_rule']:.2f} / "
                     f"{t['matched']:.2f} / {t['oracle']:.2f} | "
                     + " / ".join(f"{e[r]['ece']:.3f}" for r in RULES)
                     + f" | {e['matched']['accepted_accuracy_15']:.3f} / {e['ensemble']['accepted_accuracy_15']:.3f} |")
    mean = {r: float(np.mean([e[r]["ece"] for e in entries])) for r in RULES}
    accepted = {r: float(np.mean([e[r]["accepted_accuracy_15"] for e in entries])) for r in ("matched", "ensemble")}
    gap = {r: float(np.mean([abs(np.log(e["temperature"][r] / e["temperature"]["oracle"])) for e in entries]))
           for r in ("held_out_rule", "matched")}
    lines += ["", f"What it says: mean ECE uncalibrated {mean['uncalibrated']:.3f}, held-out rule "
              f"{mean['held_out_rule']:.3f}, matched {mean['matched']:.3f}, ensemble {mean['ensemble']:.3f}; "
              f"the matched temperature is {np.exp(gap['matched']):.2f}x from the oracle on average "
              f"(geometric), the held-out one {np.exp(gap['held_out_rule']):.2f}x. The ensemble itself "
              f"reaches accepted accuracy {accepted['ensemble']:.3f} against the trained model's "
              f"{accepted['matched']:.3f}, but costs k + 1 backbone passes per cell at every "
              f"prediction; `train-classifier` keeps one model and matches its temperature.", END]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--head", default="fine-tune", choices=("fine-tune", "fixmatch"))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--labels", type=int, default=LABELS, help="labelled train cells per draw")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="label draws (typiclust seeds)")
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "trained_head_temperature.json"))
    parser.add_argument("--doc", default=str(REPO / "docs" / "classifier.md"))
    args = parser.parse_args()
    out = Path(args.out)
    results = load_results(out)
    results["checkpoint"] = repo_relative(args.checkpoint)
    for seed in map(int, args.seeds.split(",")):
        key = f"{args.head}-{args.labels}-seed{seed}"
        draw = member_logits(args.checkpoint, args.head, seed, args.steps,
                             out.with_suffix("") / f"{key}.npz", args.labels)
        results["entries"][key] = {"head": args.head, "labels": args.labels, "seed": seed, "steps": args.steps,
                                   **compare(draw)}
        write_json(results, out)
        entry = results["entries"][key]
        print(key, entry["temperature"], {r: round(entry[r]["ece"], 3) for r in RULES})
    put_section(Path(args.doc), START, END, section(results))


if __name__ == "__main__":
    main()

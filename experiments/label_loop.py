"""The labelling loop, simulated on BloodMNIST: which cells to label next, round after round.

A lab's loop is: select -> label on the sheet -> train-classifier -> predict -> review -> select
again. Here BloodMNIST's train labels play the person: a cold start of 40 TypiClust cells
(seeded), then 4 rounds of 40 chosen by each strategy of `ssl-blood select` (random, typiclust
continued, probcover, margin with the current classifier), the `train-classifier` logistic head
refitted after every round (its settings by cross-validation on the labelled cells only). After
each round, on the test split: accuracy, balanced accuracy and the share of cells the classifier
flags for review. Val is never used. Resumable: each (strategy, seed) is written when done.

    python experiments/label_loop.py --checkpoint runs/quick/checkpoint.pt

Writes experiments/results/label_loop.json, docs/figures/label_loop.png and its section of
docs/label-efficiency.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ssl_blood.analysis.select import select_cells
from ssl_blood.classify.classifier import Classifier
from ssl_blood.data import load_split
from ssl_blood.features.embeddings import Embedder, Embeddings
from ssl_blood.files import save_figure, write_json

from frozen_features import checkpoint_features, load_results, put_section

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ("random", "typiclust", "probcover", "margin")
START, END = "<!-- label-loop:start -->", "<!-- label-loop:end -->"


def evaluate(model: Classifier, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import balanced_accuracy_score

    probabilities = model.probabilities(x)
    predicted = probabilities.argmax(1)
    review = model.review_flags(probabilities, model.ood_scores(x))
    return {"accuracy": float((predicted == y).mean()),
            "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
            "review_share": float(review.mean())}


def run_loop(strategy: str, seed: int, emb: Embeddings, train, embedder: Embedder, test_x, test_y,
             cold: int, rounds: int, size: int) -> dict:
    train_x = np.asarray(emb.select("train")[0], dtype=np.float32)
    labelled = [p["id"] for p in select_cells(emb, cold, "typiclust", seed=seed)["picks"]]
    steps = []
    for r in range(rounds + 1):
        started = time.perf_counter()
        rows = np.sort(np.asarray(labelled))
        model = Classifier.from_features(embedder, train_x[rows], train.subset(rows), seed=seed)
        steps.append({"round": r, "labels": len(labelled), **evaluate(model, test_x, test_y),
                      "cv_accuracy": model.card["cross_validation"]["accuracy"]})
        if r == rounds:
            break
        probabilities = model.probabilities(train_x) if strategy == "margin" else None
        picks = select_cells(emb, size, strategy, labelled, seed=seed + 100 * (r + 1),
                             probabilities=probabilities)["picks"]
        labelled += [p["id"] for p in picks]
        steps[-1]["seconds"] = round(time.perf_counter() - started, 1)
    return {"strategy": strategy, "seed": seed, "steps": steps}


def summary(results: dict) -> dict:
    table = {}
    for strategy in STRATEGIES:
        runs = [v for v in results["entries"].values() if v["strategy"] == strategy]
        if not runs:
            continue
        acc = np.array([[s["accuracy"] for s in r["steps"]] for r in runs])
        bal = np.array([[s["balanced_accuracy"] for s in r["steps"]] for r in runs])
        rev = np.array([[s["review_share"] for s in r["steps"]] for r in runs])
        table[strategy] = {"labels": [s["labels"] for s in runs[0]["steps"]], "seeds": len(runs),
                           "accuracy_mean": acc.mean(0).tolist(), "accuracy_std": acc.std(0).tolist(),
                           "balanced_accuracy_mean": bal.mean(0).tolist(),
                           "review_share_mean": rev.mean(0).tolist()}
    return table


def figure(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, row in table.items():
        mean, std = np.array(row["accuracy_mean"]) * 100, np.array(row["accuracy_std"]) * 100
        ax.plot(row["labels"], mean, marker="o", label=strategy)
        ax.fill_between(row["labels"], mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("labelled cells")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Labelling loop: 40 TypiClust cells, then rounds of 40")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, dpi=130)
    plt.close(fig)


def document(results: dict, table: dict) -> str:
    labels = next(iter(table.values()))["labels"]
    lines = [START, "## The labelling loop (`experiments/label_loop.py`)", "",
             f"Simulated on BloodMNIST with the quick preset's SimCLR features ({results['device']}): "
             f"40 TypiClust cells, then rounds of 40 chosen by each `select` strategy, the "
             f"`train-classifier` logistic head refitted after each round (settings by "
             f"cross-validation on the labelled cells; val unused). Test accuracy, mean ± std over "
             f"{next(iter(table.values()))['seeds']} seeds; the share of test cells flagged for review "
             f"at the classifier's own threshold in brackets.", "",
             "| strategy | " + " | ".join(f"{n} labels" for n in labels) + " |",
             "|---|" + "---|" * len(labels)]
    for strategy, row in table.items():
        cells = [f"{100 * m:.1f} ± {100 * s:.1f} ({100 * r:.0f} %)" for m, s, r in
                 zip(row["accuracy_mean"], row["accuracy_std"], row["review_share_mean"])]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    best = max(table, key=lambda s: table[s]["accuracy_mean"][-1])
    lines += ["", "![accuracy against labelled cells per strategy](figures/label_loop.png)", "",
              f"At {labels[-1]} labels the best strategy here is **{best}** "
              f"({100 * table[best]['accuracy_mean'][-1]:.1f} %). Targets of the issue: >= 5 points "
              f"ahead of random at every round and >= 88 % at 200 labels, both with the best head of "
              f"the semi-supervised issue; with the logistic head measured here they are "
              + ("met." if table[best]["accuracy_mean"][-1] >= 0.88 and all(
                  b - r >= 0.05 for b, r in zip(table[best]["accuracy_mean"][1:],
                                                table.get("random", table[best])["accuracy_mean"][1:]))
                 else f"not met: {best} is {100 * (table[best]['accuracy_mean'][-1] - table.get('random', table[best])['accuracy_mean'][-1]):.1f} "
                      f"points ahead of random at {labels[-1]} labels, with the frozen logistic head; what "
                      f"the consistency-training head (fixmatch) gives is measured below, at random labels.")
              + " Numbers: `experiments/results/label_loop.json`.", END]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--size", type=int, default=40, help="cells labelled per round")
    parser.add_argument("--cold", type=int, default=40, help="cold-start TypiClust cells")
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "label_loop.json"))
    parser.add_argument("--doc", default=str(REPO / "docs" / "label-efficiency.md"))
    parser.add_argument("--figure", default=str(REPO / "docs" / "figures" / "label_loop.png"))
    args = parser.parse_args()
    out = Path(args.out)
    results = load_results(out)
    embedder, source, emb = checkpoint_features(args.checkpoint)
    train = load_split(source, "train")
    test_x, test_y, _ = emb.select("test")
    test_x = np.asarray(test_x, dtype=np.float32)
    for seed in range(args.seeds):
        for strategy in STRATEGIES:
            key = f"{strategy}-seed{seed}"
            if key in results["entries"]:
                continue
            results["entries"][key] = run_loop(strategy, seed, emb, train, embedder, test_x, test_y,
                                               args.cold, args.rounds, args.size)
            write_json(results, out)
            print(key, [round(s["accuracy"], 3) for s in results["entries"][key]["steps"]], flush=True)
    table = summary(results)
    results["summary"] = table
    write_json(results, out)
    figure(table, Path(args.figure))
    put_section(Path(args.doc), START, END, document(results, table))


if __name__ == "__main__":
    main()

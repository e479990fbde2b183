"""Which score sends the right cells to review? BloodMNIST, a checkpoint's frozen features.

`train-classifier`'s logistic head (8 views, settings by cross-validation on the labelled cells)
on 40, 120 and 1,196 cells chosen by `select` (typiclust, seeds 0-2). Each scores every cell of
val and test, and the 15 % with the lowest score go to review; what is compared is the accuracy
on the accepted 85 % and the error enrichment (error rate of flagged / of accepted cells):
- `top`: the calibrated top probability (what `predict` flags by today);
- `margin`: top minus second probability; `entropy`: minus the entropy;
- `agreement`: the share of the cell's k nearest unlabelled cells of the source (cosine, faiss)
  that the head gives the same class (ties broken by `top`);
- `smoothed`: the head's probability of its call averaged over the cell and those k cells.
k is 5, 10 or 20. The score (and k) is chosen on val per budget; test is scored once for it and
for `top`. Issue 22 asks whether a better score than the top probability helps the review pile.

    python experiments/review_score.py --checkpoint runs/standard/checkpoint.pt

Writes experiments/results/review_score.json and a section of docs/classifier.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import faiss
import numpy as np

from ssl_blood.analysis.select import select_cells
from ssl_blood.classify.calibration import softmax
from ssl_blood.classify.classifier import Classifier
from ssl_blood.data import load_split
from ssl_blood.features.embeddings import l2_normalize
from ssl_blood.files import write_json

from classifier import review_at_rate
from frozen_features import checkpoint_features, load_results, put_section, repo_relative, view_features

REPO = Path(__file__).resolve().parents[1]
BUDGETS = (40, 120, 1196)
SEEDS = (0, 1, 2)
NEIGHBOURS = (5, 10, 20)
VIEWS = 8
RATE = 0.15
START, END = "<!-- review-score:start -->", "<!-- review-score:end -->"


def scores(p: np.ndarray, pool_p: np.ndarray, neighbours: np.ndarray) -> dict[str, np.ndarray]:
    """Every candidate review score (higher: surer) of cells with probabilities `p`, given the
    pool cells' probabilities and each cell's nearest pool cells (N, max k)."""
    call, top = p.argmax(1), p.max(1)
    ranked = np.sort(p, 1)
    out = {"top": top, "margin": ranked[:, -1] - ranked[:, -2],
           "entropy": (p * np.log(p + 1e-12)).sum(1)}
    for k in NEIGHBOURS:
        near = pool_p[neighbours[:, :k]]  # (N, k, C)
        out[f"agreement-k{k}"] = (near.argmax(2) == call[:, None]).mean(1) + 1e-3 * top
        near_of_call = np.take_along_axis(near, call[:, None, None], axis=2)[:, :, 0]  # (N, k)
        out[f"smoothed-k{k}"] = (top + near_of_call.sum(1)) / (k + 1)
    return out


def measure(model: Classifier, features: dict[str, np.ndarray], labels: dict[str, np.ndarray],
            index: faiss.Index) -> dict[str, dict[str, dict[str, float]]]:
    """{split: {score: review metrics at RATE}} for val and test."""
    pool_p = softmax(model.logits(features["train"]), model.temperature)
    out = {}
    for split in ("val", "test"):
        p = softmax(model.logits(features[split]), model.temperature)
        _, neighbours = index.search(l2_normalize(features[split]).astype(np.float32), max(NEIGHBOURS))
        correct = p.argmax(1) == labels[split]
        out[split] = {name: review_at_rate(s, correct, RATE)
                      for name, s in scores(p, pool_p, neighbours).items()}
    return out


def chosen(entries: list[dict]) -> str:
    """The score with the best mean accepted accuracy on val."""
    names = entries[0]["val"].keys()
    return max(names, key=lambda n: np.mean([e["val"][n]["accepted_accuracy"] for e in entries]))


def section(results: dict) -> str:
    rows = ["| labels | score chosen on val | val accepted: top → chosen | test accepted: top → chosen "
            f"| test error enrichment at {int(RATE * 100)} % review: top → chosen |", "|---|---|---|---|---|"]
    for budget in BUDGETS:
        entries = [results["entries"][k] for k in results["entries"] if k.startswith(f"{budget}-")]
        if not entries:
            continue
        name = chosen(entries)

        def mean(split: str, score: str, key: str) -> float:
            return float(np.mean([e[split][score][key] for e in entries]))
        rows.append(f"| {budget} | {name} | {mean('val', 'top', 'accepted_accuracy'):.3f} → "
                    f"{mean('val', name, 'accepted_accuracy'):.3f} | {mean('test', 'top', 'accepted_accuracy'):.3f} → "
                    f"{mean('test', name, 'accepted_accuracy'):.3f} | {mean('test', 'top', 'error_enrichment'):.1f}x → "
                    f"{mean('test', name, 'error_enrichment'):.1f}x |")
    return "\n".join([
        START, "## Which score to review by", "",
        f"Measured by `experiments/review_score.py` (results in `experiments/results/{results['results_file']}`) on "
        f"{results['device']}: checkpoint `{results['checkpoint']}`, the logistic head with {VIEWS} views on "
        f"`select`'s typiclust picks (seeds 0-2, mean), {int(RATE * 100)} % of the cells sent to review by each "
        "score. Candidates: the calibrated top probability (what `predict` flags by), the margin, the entropy, "
        "the agreement of the cell's k nearest unlabelled train cells with its call, and the call's probability "
        "averaged over the cell and those k cells (k 5, 10, 20); the score is chosen on val, test scored once.", "",
        *rows, "", reading(results), END, ""])


def reading(results: dict) -> str:
    """What the table says, computed: the chosen score's test gain over `top` per budget."""
    gains = []
    for budget in BUDGETS:
        entries = [results["entries"][k] for k in results["entries"] if k.startswith(f"{budget}-")]
        if entries:
            name = chosen(entries)
            gain = 100 * np.mean([e["test"][name]["accepted_accuracy"] - e["test"]["top"]["accepted_accuracy"]
                                  for e in entries])
            gains.append(f"{gain:+.1f} points at {budget} labels ({name})")
    return ("What it says: on test, the score chosen on val changes the accepted cells' accuracy by "
            + ", ".join(gains) + ". `predict` still flags by the top probability: its threshold is "
            "calibrated on the labelled cells by cross-validation, and the neighbour scores need the "
            "unlabelled pool's features as the head reads them, which a saved classifier does not keep "
            "(it keeps them normalised, for the shift check).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "review_score.json"))
    parser.add_argument("--doc", default=str(REPO / "docs" / "classifier.md"))
    args = parser.parse_args()
    out = Path(args.out)
    results = load_results(out)
    results.update(checkpoint=repo_relative(args.checkpoint), results_file=out.name)
    embedder, source, emb = checkpoint_features(args.checkpoint)
    features = view_features(args.checkpoint, embedder, source, VIEWS)
    val = load_split(source, "val")
    features["val"] = embedder(val.images, progress=True, views=VIEWS)
    train = load_split(source, "train")
    labels = {"val": val.labels.numpy(), "test": emb.select("test")[1]}
    index = faiss.IndexFlatIP(features["train"].shape[1])
    index.add(l2_normalize(features["train"]).astype(np.float32))
    for budget, seed in [(b, s) for b in BUDGETS for s in SEEDS]:
        key = f"{budget}-seed{seed}"
        if key in results["entries"]:
            continue
        rows = np.sort([p["id"] for p in select_cells(emb, budget, "typiclust", seed=seed)["picks"]])
        model = Classifier.from_features(embedder, features["train"][rows], train.subset(rows),
                                         seed=seed, views=VIEWS)
        results["entries"][key] = measure(model, features, labels, index)
        write_json(results, out)
        print(key, {s: round(m["accepted_accuracy"], 4) for s, m in results["entries"][key]["test"].items()})
    put_section(Path(args.doc), START, END, section(results))


if __name__ == "__main__":
    main()

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
for `top`, and once more with the neighbours drawn from the 2,000 unlabelled cells a saved
classifier keeps (SHIFT_POOL), which is what `predict` could use. Issue 22 asks whether a better score than the top probability helps the review pile.

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
from ssl_blood.classify.classifier import SHIFT_POOL, Classifier
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
KEPT = "@kept"  # the neighbours drawn from the cells a saved classifier keeps
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
            kept: np.ndarray) -> dict[str, dict[str, dict[str, float]]]:
    """{split: {score: review metrics at RATE}} for val and test, the neighbours drawn from every
    train cell and (names ending KEPT) from the train rows `kept` only."""
    out = {"val": {}, "test": {}}
    for pool, suffix in ((np.arange(len(features["train"])), ""), (kept, KEPT)):
        index = faiss.IndexFlatIP(features["train"].shape[1])
        index.add(l2_normalize(features["train"][pool]).astype(np.float32))
        pool_p = softmax(model.logits(features["train"][pool]), model.temperature)
        for split in out:
            p = softmax(model.logits(features[split]), model.temperature)
            _, neighbours = index.search(l2_normalize(features[split]).astype(np.float32), max(NEIGHBOURS))
            correct = p.argmax(1) == labels[split]
            out[split].update({name + suffix: review_at_rate(s, correct, RATE)
                               for name, s in scores(p, pool_p, neighbours).items()
                               if not suffix or name not in ("top", "margin", "entropy")})
    return out


def chosen(entries: list[dict]) -> str:
    """The score with the best mean accepted accuracy on val (neighbours from every train cell)."""
    names = [n for n in entries[0]["val"] if not n.endswith(KEPT)]
    return max(names, key=lambda n: np.mean([e["val"][n]["accepted_accuracy"] for e in entries]))


def section(results: dict) -> str:
    rows = ["| labels | score chosen on val | val accepted: top → chosen | test accepted: top → chosen "
            f"| test error enrichment at {int(RATE * 100)} % review: top → chosen "
            f"| test accepted, chosen, neighbours from the {SHIFT_POOL:,} cells a classifier keeps |",
            "|---|---|---|---|---|---|"]
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
                    f"{mean('test', name, 'error_enrichment'):.1f}x | {kept_cell(entries, name)} |")
    return "\n".join([
        START, "## Which score to review by", "",
        f"Measured by `experiments/review_score.py` (results in `experiments/results/{results['results_file']}`) on "
        f"{results['device']}: checkpoint `{results['checkpoint']}`, the logistic head with {VIEWS} views on "
        f"`select`'s typiclust picks (seeds 0-2, mean), {int(RATE * 100)} % of the cells sent to review by each "
        "score. Candidates: the calibrated top probability (what `predict` flags by), the margin, the entropy, "
        "the agreement of the cell's k nearest unlabelled train cells with its call, and the call's probability "
        "averaged over the cell and those k cells (k 5, 10, 20); the score is chosen on val, test scored once.", "",
        *rows, "", reading(results), END, ""])


def kept_cell(entries: list[dict], name: str) -> str:
    """The chosen score's test accepted accuracy with the kept cells as neighbours ('-' for a
    score without neighbours, or results measured before the kept pool was)."""
    if name + KEPT not in entries[0]["test"]:
        return "-"
    return f"{np.mean([e['test'][name + KEPT]['accepted_accuracy'] for e in entries]):.3f}"


def reading(results: dict) -> str:
    """What the table says, computed: the chosen score's test gain over `top` per budget."""
    gains = []
    for budget in BUDGETS:
        entries = [results["entries"][k] for k in results["entries"] if k.startswith(f"{budget}-")]
        if entries:
            name = chosen(entries)
            gain = 100 * np.mean([e["test"][name]["accepted_accuracy"] - e["test"]["top"]["accepted_accuracy"]
                                  for e in entries])
            kept = (f", {100 * np.mean([e['test'][name + KEPT]['accepted_accuracy'] - e['test']['top']['accepted_accuracy'] for e in entries]):+.1f} with the kept cells"
                    if name + KEPT in entries[0]["test"] else "")
            gains.append(f"{gain:+.1f} points at {budget} labels ({name}{kept})")
    return ("What it says: on test, the score chosen on val changes the accepted cells' accuracy by "
            + ", ".join(gains) + ". `predict` still flags by the top probability: its threshold is "
            f"calibrated on the labelled cells by cross-validation, and the neighbour scores need an "
            f"unlabelled pool; with the {SHIFT_POOL:,} cells a saved classifier keeps (for the shift check) "
            "as the pool, the gain is the figure after 'with the kept cells'.")


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
    for budget, seed in [(b, s) for b in BUDGETS for s in SEEDS]:
        key = f"{budget}-seed{seed}"
        if key in results["entries"]:
            continue
        rows = np.sort([p["id"] for p in select_cells(emb, budget, "typiclust", seed=seed)["picks"]])
        model = Classifier.from_features(embedder, features["train"][rows], train.subset(rows),
                                         seed=seed, views=VIEWS)
        rest = np.setdiff1d(np.arange(len(train)), rows)  # as train-classifier draws its pool
        kept = rest[np.sort(np.random.default_rng(seed).permutation(len(rest))[:SHIFT_POOL])]
        results["entries"][key] = measure(model, features, labels, kept)
        write_json(results, out)
        print(key, {s: round(m["accepted_accuracy"], 4) for s, m in results["entries"][key]["test"].items()})
    put_section(Path(args.doc), START, END, section(results))


if __name__ == "__main__":
    main()

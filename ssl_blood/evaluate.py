"""Frozen-feature evaluation: weighted kNN, linear probe, few-shot heads, and their metrics.

ACC and AUC are computed by medmnist's own `getACC` / `getAUC` (the Evaluator's definitions:
AUC is the mean one-vs-rest ROC AUC over classes); balanced accuracy, macro-F1 and per-class
precision/recall/F1 come from scikit-learn. Hyperparameters are chosen on val; test is scored
once with the chosen setting.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from ssl_blood.errors import UserError
from ssl_blood.index import CellIndex

PROBE_WEIGHT_DECAYS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
FEW_SHOT_HEADS = ("prototype", "knn", "logreg")
FEW_SHOT_LOGREG_WEIGHT_DECAY = 1e-3  # fixed: a few-label user has no val set to tune on


# ----------------------------------------------------------------------------- metrics


def classification_metrics(y_true: np.ndarray, scores: np.ndarray,
                           class_names: Sequence[str]) -> dict[str, Any]:
    """ACC/AUC as medmnist's Evaluator, plus balanced accuracy, macro-F1, per-class scores."""
    from medmnist.evaluator import getACC, getAUC
    from sklearn.metrics import (balanced_accuracy_score, confusion_matrix, f1_score,
                                 precision_recall_fscore_support)

    y_pred = scores.argmax(1)
    labels = np.arange(len(class_names))
    with warnings.catch_warnings():  # tiny subsets may miss a class: AUC is then undefined
        warnings.simplefilter("ignore")
        try:
            auc = float(getAUC(y_true, scores, "multi-class"))
        except ValueError:
            auc = float("nan")
        balanced = float(balanced_accuracy_score(y_true, y_pred))
    auc = None if math.isnan(auc) else auc
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    return {
        "acc": float(getACC(y_true, scores, "multi-class")),
        "auc": auc,
        "balanced_acc": balanced,
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f),
                             "support": int(s)}
                      for name, p, r, f, s in zip(class_names, precision, recall, f1, support)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def mean_ci95(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and half-width of the 95 % t-interval (None for a single value)."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), None
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(half)


# ----------------------------------------------------------------------------- kNN


def knn_scores(gallery: np.ndarray, gallery_labels: np.ndarray, queries: np.ndarray,
               num_classes: int, k: int = 20, temperature: float = 0.07,
               index: CellIndex | None = None) -> np.ndarray:
    """Class scores (Q, C) of DINO's weighted kNN: each of the k nearest gallery vectors
    (cosine, through CellIndex) votes for its class with weight exp(similarity / T)."""
    if k < 1 or temperature <= 0:
        raise UserError(f"kNN needs k >= 1 and temperature > 0 (got k={k}, T={temperature})")
    index = index or CellIndex.build(gallery, labels=gallery_labels)
    similarity, position = index.search(queries, k)
    # subtracting each row's max leaves the normalised votes unchanged and avoids overflow
    weights = np.exp((similarity - similarity.max(1, keepdims=True)) / temperature)
    votes = np.zeros((len(queries), num_classes), dtype=np.float64)
    np.add.at(votes, (np.arange(len(queries))[:, None], gallery_labels[position]), weights)
    return (votes / votes.sum(1, keepdims=True)).astype(np.float32)


def knn_accuracy(gallery: np.ndarray, gallery_labels: np.ndarray, queries: np.ndarray,
                 query_labels: np.ndarray, num_classes: int, k: int = 20,
                 temperature: float = 0.07) -> float:
    scores = knn_scores(gallery, gallery_labels, queries, num_classes, k, temperature)
    return float((scores.argmax(1) == query_labels).mean())


# ----------------------------------------------------------------------------- logistic regression


def _standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0), x.std(0) + 1e-6


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
                 max_iter: int = 500, start: torch.nn.Linear | None = None) -> torch.nn.Linear:
    """Multinomial logistic regression, full-batch L-BFGS, L2 penalty on the weights; starts
    from zeros, or from `start` (a warm start along a weight-decay path)."""
    head = torch.nn.Linear(x.shape[1], num_classes).to(x.device)
    with torch.no_grad():
        head.weight.copy_(start.weight if start is not None else torch.zeros_like(head.weight))
        head.bias.copy_(start.bias if start is not None else torch.zeros_like(head.bias))
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y)
        loss = loss + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


@torch.no_grad()
def _softmax_scores(head: torch.nn.Linear, x: torch.Tensor) -> np.ndarray:
    return torch.softmax(head(x), 1).cpu().numpy()


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                 test_x: np.ndarray, test_y: np.ndarray, class_names: Sequence[str],
                 weight_decays: Sequence[float] = PROBE_WEIGHT_DECAYS,
                 device: str = "auto") -> dict[str, Any]:
    """Logistic regression on standardised frozen features; weight decay chosen on val ACC,
    test scored once with that choice."""
    from ssl_blood.device import resolve_device

    dev = resolve_device(device)
    mean, std = _standardizer(train_x)

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((x - mean) / std, dtype=torch.float32, device=dev)

    xtr, xva, xte = tensor(train_x), tensor(val_x), tensor(test_x)
    ytr = torch.as_tensor(train_y, device=dev)
    c = len(class_names)
    val_acc_by_wd, heads, previous = {}, {}, None
    for wd in sorted(weight_decays, reverse=True):  # strong to weak: each fit starts from the last
        heads[wd] = previous = fit_logistic(xtr, ytr, c, wd, start=previous)
        val_acc_by_wd[wd] = float((_softmax_scores(heads[wd], xva).argmax(1) == val_y).mean())
    # best val ACC; ties go to the stronger penalty
    best = max(weight_decays, key=lambda wd: (val_acc_by_wd[wd], wd))
    val_metrics = classification_metrics(val_y, _softmax_scores(heads[best], xva), class_names)
    test_scores = _softmax_scores(heads[best], xte)
    test_metrics = classification_metrics(test_y, test_scores, class_names)
    return {
        "val_acc": val_metrics["acc"], "val_auc": val_metrics["auc"],
        "test_acc": test_metrics["acc"], "test_auc": test_metrics["auc"],
        "balanced_acc": test_metrics["balanced_acc"], "macro_f1": test_metrics["macro_f1"],
        "per_class": test_metrics["per_class"],
        "confusion_matrix": test_metrics["confusion_matrix"],
        "weight_decay": best, "val_acc_by_weight_decay": {str(k): v for k, v in val_acc_by_wd.items()},
        "class_names": list(class_names), "test_predictions": test_scores.argmax(1).tolist(),
    }


# ----------------------------------------------------------------------------- few-shot


def support_indices(labels: np.ndarray, num_classes: int, rng: np.random.Generator,
                    shots: int | None = None, fraction: float | None = None) -> np.ndarray:
    """A class-balanced labelled set drawn from `labels`: `shots` per class, or round(fraction
    * N) in all, split as evenly over classes as possible (leftover images to random classes)."""
    counts = np.bincount(labels, minlength=num_classes)
    if shots is not None:
        quota = np.full(num_classes, shots)
    else:
        if fraction is None or not 0 < fraction <= 1:
            raise UserError(f"--fractions {fraction}: each fraction must be in (0, 1]")
        total = max(num_classes, int(round(fraction * len(labels))))
        quota = np.full(num_classes, total // num_classes)
        quota[rng.choice(num_classes, total % num_classes, replace=False)] += 1
    short = np.flatnonzero(quota > counts)
    if len(short):
        c = short[0]
        raise UserError(f"asked for {quota[c]} labelled images of class {c} but the train split "
                        f"has {counts[c]}; use fewer shots or a smaller fraction")
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), quota[c], replace=False)
                           for c in range(num_classes)])


def _predict_prototype(sx, sy, qx, num_classes):
    from ssl_blood.embed import l2_normalize

    sx, qx = l2_normalize(sx), l2_normalize(qx)
    prototypes = l2_normalize(np.stack([sx[sy == c].mean(0) for c in range(num_classes)]))
    return (qx @ prototypes.T).argmax(1)


def _predict_knn(sx, sy, qx, num_classes):
    k = min(20, len(sx))
    return knn_scores(sx, sy, qx, num_classes, k=k).argmax(1)


def _predict_logreg(sx, sy, qx, num_classes):
    from ssl_blood.embed import l2_normalize

    head = fit_logistic(torch.as_tensor(l2_normalize(sx)), torch.as_tensor(sy), num_classes,
                        FEW_SHOT_LOGREG_WEIGHT_DECAY, max_iter=200)
    return _softmax_scores(head, torch.as_tensor(l2_normalize(qx))).argmax(1)


_HEADS = {"prototype": _predict_prototype, "knn": _predict_knn, "logreg": _predict_logreg}


def few_shot(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
             num_classes: int, shots: Sequence[int] = (1, 5, 10, 20),
             fractions: Sequence[float] = (0.01, 0.1), heads: Sequence[str] = FEW_SHOT_HEADS,
             episodes: int = 20, seed: int = 0) -> list[dict[str, Any]]:
    """Accuracy on test of each head trained on small labelled sets from train; mean and 95 %
    CI over `episodes` draws. Every head sees the same draws."""
    unknown = [h for h in heads if h not in _HEADS]
    if unknown:
        raise UserError(f"unknown few-shot head '{unknown[0]}'; choose from {', '.join(_HEADS)}")
    if episodes < 1:
        raise UserError(f"--episodes {episodes} must be at least 1")
    for s in shots:
        if s < 1:
            raise UserError(f"--shots {s}: shots must be at least 1")
    settings = [(f"{s}-shot", {"shots": s}) for s in shots]
    settings += [(f"{f:g} of train", {"fraction": f}) for f in fractions]
    results = []
    for setting_number, (name, how) in enumerate(settings):
        rng = np.random.default_rng([seed, setting_number])
        draws = [support_indices(train_y, num_classes, rng, **how) for _ in range(episodes)]
        for head in heads:
            accs = [float((_HEADS[head](train_x[d], train_y[d], test_x, num_classes) == test_y).mean())
                    for d in draws]
            mean, ci = mean_ci95(accs)
            results.append({"setting": name, "head": head, "labels": int(len(draws[0])),
                            "mean_acc": mean, "ci95": ci, "episodes": episodes})
    return results


# ----------------------------------------------------------------------------- on embeddings files


def labelled_split(emb, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of a split of an Embeddings object; refuses unlabelled data."""
    if split not in emb.splits():
        raise UserError(f"the embeddings hold no '{split}' split (they hold "
                        f"{', '.join(emb.splits())}); embed train, val and test with ssl-blood embed")
    x, y, _ = emb.select(split)
    if (y < 0).any():
        raise UserError(f"the '{split}' split of the embeddings has no labels; evaluation needs "
                        f"labelled data (BloodMNIST or an .npz with labels)")
    return x, y


def probe_embeddings(emb, device: str = "auto") -> dict[str, Any]:
    """Linear probe with train / val / test of an Embeddings object."""
    parts = [labelled_split(emb, s) for s in ("train", "val", "test")]
    result = linear_probe(*parts[0], *parts[1], *parts[2], emb.class_names, device=device)
    return {"embeddings": emb.name, **result}


def knn_embeddings(emb, k: int = 20, temperature: float = 0.07, query_split: str = "test") -> dict[str, Any]:
    """Weighted kNN: train is the gallery, `query_split` the queries."""
    gx, gy = labelled_split(emb, "train")
    qx, qy = labelled_split(emb, query_split)
    scores = knn_scores(gx, gy, qx, len(emb.class_names), k, temperature)
    metrics = classification_metrics(qy, scores, emb.class_names)
    return {"embeddings": emb.name, "k": k, "temperature": temperature, "split": query_split,
            f"{query_split}_acc": metrics["acc"], f"{query_split}_auc": metrics["auc"], **metrics}


def few_shot_embeddings(emb, **kwargs: Any) -> list[dict[str, Any]]:
    """Few-shot heads: labelled sets from train, accuracy on test."""
    tx, ty = labelled_split(emb, "train")
    qx, qy = labelled_split(emb, "test")
    return few_shot(tx, ty, qx, qy, len(emb.class_names), **kwargs)

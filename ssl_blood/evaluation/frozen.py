"""Frozen-feature evaluation: weighted kNN, linear probe, few-shot heads, clustering quality.

ACC and AUC are computed by medmnist's own `getACC` / `getAUC` (the Evaluator's definitions:
AUC is the mean one-vs-rest ROC AUC over classes); balanced accuracy, macro-F1, per-class
precision/recall/F1, NMI and ARI come from scikit-learn. Every choice (weight decay, few-shot
head) is made on val; test is scored once with the chosen setting. Every result names the
embeddings it came from and the subset (`limit`) they cover, so a subset result can never pass
for a full one.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from ssl_blood import ui
from ssl_blood.errors import UserError
from ssl_blood.features.index import CellIndex
from ssl_blood.features.neighbours import (KNN_K, KNN_TEMPERATURE, clamped_k,
                                           knn_scores)

# 1e-1 and 1 widen the grid because the raw-pixel baseline chose 1e-2, its old edge; every
# feature set now chooses inside it (docs/results.md lists the choices).
PROBE_WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
FEW_SHOT_HEADS = ("prototype", "knn", "logreg")
# fixed: tuning it on a handful of labels would overfit. It applies to L2-normalised features
# scaled to norm sqrt(D) (about unit scale per dimension, as the linear probe's standardised
# features): on unit-norm features the same penalty underfits from ~100 labels on (BloodMNIST val,
# 400 labels: 77.8 % against 84.9 %; all of train: 78.6 % against 91.2 %).
FEW_SHOT_LOGREG_WEIGHT_DECAY = 1e-3


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
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    return {
        "acc": float(getACC(y_true, scores, "multi-class")),
        "auc": None if math.isnan(auc) else auc,
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


def cluster_metrics(features: np.ndarray, labels: np.ndarray, num_classes: int,
                    seed: int = 0) -> dict[str, float]:
    """How well k-means (k = number of classes, spherical: cosine geometry, best of 10 restarts,
    faiss) recovers the classes: NMI, ARI (scikit-learn) and purity (share of cells in their
    cluster's majority class)."""
    import faiss
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from ssl_blood.features.embeddings import l2_normalize

    if len(features) < num_classes:
        raise UserError(f"{len(features)} cells are too few to cluster into {num_classes} classes",
                        param="split")
    x = np.ascontiguousarray(l2_normalize(features), dtype=np.float32)
    kmeans = faiss.Kmeans(x.shape[1], num_classes, niter=25, nredo=10, spherical=True, seed=seed,
                          verbose=False, min_points_per_centroid=1,
                          max_points_per_centroid=max(256, len(x)))
    kmeans.train(x)
    clusters = kmeans.index.search(x, 1)[1][:, 0]
    table = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(table, (clusters, labels), 1)
    return {"nmi": float(normalized_mutual_info_score(labels, clusters)),
            "ari": float(adjusted_rand_score(labels, clusters)),
            "purity": float(table.max(1).sum() / len(labels)), "k": num_classes, "seed": seed}


# ----------------------------------------------------------------------------- kNN


# ----------------------------------------------------------------------------- logistic regression


def _standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0), x.std(0) + 1e-6


def _lbfgs(x: torch.Tensor, onehot: torch.Tensor, weight_decay: float, w: torch.Tensor,
           max_iter: int) -> torch.Tensor:
    """Full-batch L-BFGS on the penalised softmax cross-entropy; `w` (C, D + 1) holds the
    weights and, in its last column, the bias (not penalised). The gradient is written by hand
    (softmax - one-hot): the two matmuls with `x` are all the work, in `x`'s dtype."""
    n, d = x.shape
    w = w.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        with torch.no_grad():
            weights = w[:, :d]
            logits = (x @ weights.T.to(x.dtype)).float() + w[:, d]
            log_p = torch.log_softmax(logits, 1)
            loss = -(log_p * onehot).sum() / n + 0.5 * weight_decay * (weights * weights).sum()
            residual = (log_p.exp() - onehot) / n
            grad = torch.empty_like(w)
            grad[:, :d] = (residual.T.to(x.dtype) @ x).float() + weight_decay * weights
            grad[:, d] = residual.sum(0)
        w.grad = grad
        return loss

    optimizer.step(closure)
    return w.detach()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
                 max_iter: int = 100, start: torch.nn.Linear | None = None,
                 bf16_start: bool = False) -> torch.nn.Linear:
    """Multinomial logistic regression, full-batch L-BFGS, L2 penalty on the weights; starts
    from zeros, or from `start` (a warm start along a weight-decay path). With `bf16_start`,
    up to `max_iter` iterations run with the features in bf16 (memory-bound matmuls, about 6x
    faster on CPUs with AMX) and 25 more in float32 refine the result: the same optimum within
    optimisation noise (docs/benchmarks.md, linear probe)."""
    d = x.shape[1]
    w = torch.zeros(num_classes, d + 1, device=x.device)
    if start is not None:
        w[:, :d], w[:, d] = start.weight.detach(), start.bias.detach()
    onehot = torch.nn.functional.one_hot(y.long(), num_classes).float()
    if bf16_start:
        w = _lbfgs(x.to(torch.bfloat16), onehot, weight_decay, w, max_iter)
        w = _lbfgs(x, onehot, weight_decay, w, 25)
    else:
        w = _lbfgs(x, onehot, weight_decay, w, max_iter)
    head = torch.nn.Linear(d, num_classes).to(x.device)
    with torch.no_grad():
        head.weight.copy_(w[:, :d])
        head.bias.copy_(w[:, d])
    return head


@torch.no_grad()
def _softmax_scores(head: torch.nn.Linear, x: torch.Tensor) -> np.ndarray:
    return torch.softmax(head(x), 1).cpu().numpy()


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                 test_x: np.ndarray | None, test_y: np.ndarray | None, class_names: Sequence[str],
                 weight_decays: Sequence[float] = PROBE_WEIGHT_DECAYS,
                 device: str = "cpu", progress: bool | None = False) -> dict[str, Any]:
    """Logistic regression on standardised frozen features; weight decay chosen on val ACC,
    test scored once with that choice (no test given: val only, e.g. to choose a config)."""
    from ssl_blood.device import resolve_device, uses_bf16

    dev = resolve_device(device)
    mean, std = _standardizer(train_x)

    def tensor(x: np.ndarray) -> torch.Tensor:
        z = np.subtract(x, mean, dtype=np.float32)  # one copy, standardised in place
        z /= std
        return torch.as_tensor(z, device=dev)

    xtr, xva = tensor(train_x), tensor(val_x)
    ytr = torch.as_tensor(train_y, device=dev)
    c = len(class_names)
    fast = uses_bf16(dev) and dev.type == "cpu"
    val_acc_by_wd, heads, previous = {}, {}, None
    path = sorted(weight_decays, reverse=True)  # strong to weak: each fit starts from the last
    for wd in ui.bar(path, desc="linear probe (weight decays)", unit="fit", enabled=progress):
        heads[wd] = previous = fit_logistic(xtr, ytr, c, wd, start=previous, bf16_start=fast)
        val_acc_by_wd[wd] = float((_softmax_scores(heads[wd], xva).argmax(1) == val_y).mean())
    # best val ACC; ties go to the stronger penalty
    best = max(weight_decays, key=lambda wd: (val_acc_by_wd[wd], wd))
    val_metrics = classification_metrics(val_y, _softmax_scores(heads[best], xva), class_names)
    result = {
        "val_acc": val_metrics["acc"], "val_auc": val_metrics["auc"], "weight_decay": best,
        "weight_decay_grid": sorted(float(w) for w in weight_decays),
        "weight_decay_at_grid_edge": best in (min(weight_decays), max(weight_decays)),
        "val_acc_by_weight_decay": {str(k): v for k, v in val_acc_by_wd.items()},
        "class_names": list(class_names),
    }
    if test_x is None:
        return result
    test_scores = _softmax_scores(heads[best], tensor(test_x))
    test = classification_metrics(test_y, test_scores, class_names)
    return {**result, "test_acc": test["acc"], "test_auc": test["auc"],
            "balanced_acc": test["balanced_acc"], "macro_f1": test["macro_f1"],
            "per_class": test["per_class"], "confusion_matrix": test["confusion_matrix"],
            "test_predictions": test_scores.argmax(1).tolist()}


# ----------------------------------------------------------------------------- few-shot


def support_indices(labels: np.ndarray, num_classes: int, rng: np.random.Generator,
                    shots: int | None = None, fraction: float | None = None) -> np.ndarray:
    """A class-balanced labelled set drawn from `labels`: `shots` per class, or round(fraction
    * N) in all, split as evenly over classes as possible (leftover images to random classes).
    Unlabelled cells (-1) are never drawn."""
    labelled = np.flatnonzero(labels >= 0)
    counts = np.bincount(labels[labelled], minlength=num_classes)
    if shots is not None:
        if shots < 1:
            raise UserError(f"`shots` {shots} must be at least 1", param="shots")
        quota = np.full(num_classes, shots)
    else:
        if fraction is None or not (math.isfinite(fraction) and 0 < fraction <= 1):
            raise UserError(f"`fraction` {fraction} must be in (0, 1]", param="fraction")
        total = max(num_classes, int(round(fraction * len(labelled))))
        quota = np.full(num_classes, total // num_classes)
        quota[rng.choice(num_classes, total % num_classes, replace=False)] += 1
        # a small class gives what it has; the rest go to the others, still balanced
        while (quota > counts).any():
            extra = int((quota - counts).clip(min=0).sum())
            quota = np.minimum(quota, counts)
            room = np.flatnonzero(quota < counts)
            if not len(room):
                break
            quota[rng.choice(room, min(extra, len(room)), replace=False)] += 1
    short = np.flatnonzero(quota > counts)
    if len(short):
        c = int(short[0])
        raise UserError(f"asked for {quota[c]} labelled images of class {c} but the train split "
                        f"has {counts[c]}; use fewer shots (at most {int(counts.min())}) or a "
                        f"smaller fraction", param="shots" if shots is not None else "fraction")
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), quota[c], replace=False)
                                   for c in range(num_classes)]))


def _predict_prototype(sx, sy, queries, num_classes):
    from ssl_blood.features.embeddings import l2_normalize

    sx = l2_normalize(sx)
    prototypes = l2_normalize(np.stack([sx[sy == c].mean(0) for c in range(num_classes)]))
    return [(l2_normalize(q) @ prototypes.T).argmax(1) for q in queries]


def _predict_knn(sx, sy, queries, num_classes):
    index = CellIndex.build(sx, labels=sy, use_gpu=False)
    return [knn_scores(sx, sy, q, num_classes, k=clamped_k(index, KNN_K, False), index=index).argmax(1)
            for q in queries]


def _predict_logreg(sx, sy, queries, num_classes):
    from ssl_blood.features.embeddings import l2_normalize

    def scaled(x: np.ndarray) -> torch.Tensor:  # norm sqrt(D): see FEW_SHOT_LOGREG_WEIGHT_DECAY
        return torch.as_tensor(l2_normalize(x) * np.float32(math.sqrt(x.shape[1])))

    head = fit_logistic(scaled(sx), torch.as_tensor(sy), num_classes, FEW_SHOT_LOGREG_WEIGHT_DECAY)
    return [_softmax_scores(head, scaled(q)).argmax(1) for q in queries]


# head name -> predict(support x, support y, [query sets], classes) -> predicted classes per set
FEW_SHOT_PREDICTORS = {"prototype": _predict_prototype, "knn": _predict_knn, "logreg": _predict_logreg}


def few_shot(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
             test_x: np.ndarray, test_y: np.ndarray, num_classes: int,
             shots: Sequence[int] = (1, 5, 10, 20), fractions: Sequence[float] = (0.01, 0.1),
             heads: Sequence[str] = FEW_SHOT_HEADS, episodes: int = 20, seed: int = 0,
             progress: bool | None = False) -> list[dict[str, Any]]:
    """Heads trained on small labelled sets drawn from train, `episodes` draws per setting
    (every head sees the same draws). Per setting one row: the head with the best mean val
    accuracy and its test accuracy (mean and 95 % CI over episodes), plus every head's val and
    test accuracy for the table (the choice never looks at test)."""
    unknown = [h for h in heads if h not in FEW_SHOT_PREDICTORS]
    if unknown:
        raise UserError(f"unknown few-shot `heads` entry '{unknown[0]}'; choose from "
                        f"{', '.join(FEW_SHOT_PREDICTORS)}", param="heads")
    if not heads:
        raise UserError(f"`heads` is empty; choose from {', '.join(FEW_SHOT_PREDICTORS)}",
                        param="heads")
    if episodes < 1:
        raise UserError(f"`episodes` {episodes} must be at least 1", param="episodes")
    bad = [f for f in fractions if not (math.isfinite(f) and 0 < f <= 1)]
    if bad:  # before any setting is computed, not when the loop reaches this one
        raise UserError(f"`fractions` entry {bad[0]} must be in (0, 1]", param="fractions")
    if any(s < 1 for s in shots):
        raise UserError(f"`shots` entry {min(shots)} must be at least 1", param="shots")
    settings = [(f"{s}-shot", {"shots": int(s)}) for s in shots]
    settings += [(f"{f:g} of train", {"fraction": float(f)}) for f in fractions]
    if not settings:
        raise UserError("`shots` and `fractions` are both empty: nothing to evaluate; give at "
                        "least one, e.g. `shots` 1,5,10", param=("shots", "fractions"))
    results = []
    for number, (name, how) in enumerate(ui.bar(settings, desc="few-shot", unit="setting",
                                                enabled=progress)):
        rng = np.random.default_rng([seed, number])
        draws = [support_indices(train_y, num_classes, rng, **how) for _ in range(episodes)]
        per_head = {}
        for head in heads:
            val_accs, test_accs = [], []
            for d in draws:  # one fit per draw, scored on val (to choose) and test (to report)
                on_val, on_test = FEW_SHOT_PREDICTORS[head](train_x[d], train_y[d], [val_x, test_x],
                                                            num_classes)
                val_accs.append(float((on_val == val_y).mean()))
                test_accs.append(float((on_test == test_y).mean()))
            mean, ci = mean_ci95(test_accs)
            per_head[head] = {"val_acc": float(np.mean(val_accs)), "test_acc": mean, "test_ci95": ci}
        chosen = max(heads, key=lambda h: (per_head[h]["val_acc"], -heads.index(h)))
        results.append({"setting": name, "labels": int(len(draws[0])), "episodes": episodes,
                        "head": chosen, "chosen_on": "val",
                        "val_acc": per_head[chosen]["val_acc"],
                        "mean_acc": per_head[chosen]["test_acc"],
                        "ci95": per_head[chosen]["test_ci95"], "heads": per_head})
    return results


# ----------------------------------------------------------------------------- on embeddings files


def labelled_split(emb, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, labels, ids) of the labelled cells of a split; unlabelled cells are
    skipped, a split without labels is refused."""
    if split not in emb.splits():
        raise UserError(f"the embeddings hold no '{split}' split (they hold "
                        f"{', '.join(emb.splits())}); embed train, val and test with ssl-blood "
                        f"embed", param="split")
    x, y, ids = emb.select(split)
    keep = y >= 0
    if keep.all():
        return x, y, ids
    if not keep.any():
        raise UserError(f"the '{split}' split of the embeddings has no labels; evaluation needs "
                        f"labelled cells (class folders, a manifest label column, or an .npz "
                        f"with labels)", param="split")
    return x[keep], y[keep], ids[keep]


def _provenance(emb) -> dict[str, Any]:
    return {"embeddings": emb.name, "identity": emb.identity, "subset": emb.subset or None}


def probe_embeddings(emb, device: str = "cpu", progress: bool | None = False,
                     cluster_seed: int | None = 0) -> dict[str, Any]:
    """Linear probe with train / val / test of an Embeddings object, and k-means cluster
    metrics of the test split (`cluster_seed=None` skips them)."""
    (tx, ty, _), (vx, vy, _), (sx, sy, _) = (labelled_split(emb, s) for s in ("train", "val", "test"))
    result = linear_probe(tx, ty, vx, vy, sx, sy, emb.class_names, device=device, progress=progress)
    if cluster_seed is not None:
        result["test_clusters"] = cluster_metrics(sx, sy, len(emb.class_names), cluster_seed)
    return {**_provenance(emb), **result}


def knn_embeddings(emb, k: int = KNN_K, temperature: float = KNN_TEMPERATURE, query_split: str = "test",
                   cluster_seed: int | None = 0) -> dict[str, Any]:
    """Weighted kNN: train is the gallery, `query_split` the queries (a train query never
    counts itself)."""
    gx, gy, gids = labelled_split(emb, "train")
    qx, qy, qids = labelled_split(emb, query_split)
    exclude = qids if query_split == "train" else None
    scores = knn_scores(gx, gy, qx, len(emb.class_names), k, temperature, exclude_ids=exclude,
                        gallery_ids=gids)
    metrics = classification_metrics(qy, scores, emb.class_names)
    result = {**_provenance(emb), "k": k, "temperature": temperature, "split": query_split,
              f"{query_split}_acc": metrics["acc"], f"{query_split}_auc": metrics["auc"], **metrics}
    if cluster_seed is not None:
        result[f"{query_split}_clusters"] = cluster_metrics(qx, qy, len(emb.class_names), cluster_seed)
    return result


def few_shot_embeddings(emb, progress: bool | None = False, **kwargs: Any) -> dict[str, Any]:
    """Few-shot heads: labelled sets from train, head chosen on val, accuracy on test."""
    (tx, ty, _), (vx, vy, _), (sx, sy, _) = (labelled_split(emb, s) for s in ("train", "val", "test"))
    rows = few_shot(tx, ty, vx, vy, sx, sy, len(emb.class_names), progress=progress, **kwargs)
    return {**_provenance(emb), "results": rows}

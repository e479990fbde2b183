"""Is a batch of cells (a slide) unlike the training lab's own? `predict`'s batch shift check.

A two-sample test against a reference pool of the training lab's unlabelled cells, made local so
that a slide's class mix does not count as a shift (a leukaemic slide is not another scanner):
each cell of the batch is compared with its `NEIGHBOURS` nearest pool cells in embedding space,
and the residual (the cell minus their mean, less the residual those neighbours show against
their own neighbours: each neighbourhood's own lean) is taken in two views:
- its features, projected on the pool's `FEATURE_DIMS` leading principal directions;
- its image statistics: per-channel mean and spread of the pixels (stain, exposure) and the mean
  absolute Laplacian and gradient of the grey image (focus, resolution), which a stain-invariant
  backbone may not see.
Without a shift the residuals average to about zero whatever cells the slide holds; a new stain,
blur or lamp moves every cell the same way. Per view the statistic is Hotelling's T² of the
mean residual (per dimension), against a threshold bootstrapped from the pool's own residuals
(leave-self-out) at the batch's size, each view at half of `FALSE_ALARM` (Bonferroni).
A classifier that labels were added to from another lab (`train-classifier --from`) knows every
lab it learned from (`KnownLabs`): a batch like any of them is not a shift, and a batch unlike
the first lab, whose cells set the backbone's BatchNorm statistics, is what AdaBN corrects.
Measured in docs/robustness.md. Hand-written: scipy/sklearn have no local two-sample test
calibrated on an unlabelled reference, and this one is a few lines of numpy around faiss.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ssl_blood.features.embeddings import l2_normalize

NEIGHBOURS = 10  # pool cells a batch cell is compared with
FEATURE_DIMS = 16  # leading principal directions of the pool's features tested
FALSE_ALARM = 0.01  # a clean batch warns this often (both views together)
BOOTSTRAP_DRAWS = 1000
BOOTSTRAP_MAX_CELLS = 2000  # T² per dimension is about chi²_d/d at any size; larger draws add little
KEYS = ("shift_pool_features", "shift_pool_images")  # what a classifier keeps (tensors): its latest lab's
EARLIER = "shift_earlier/{}/"  # prefix of the same for the labs known before the latest (0: the first)
VIEWS = ("features", "image_statistics")


def image_statistics(images: torch.Tensor | np.ndarray, chunk: int = 4096) -> np.ndarray:
    """(N, 2C + 2) per cell: per-channel pixel mean and standard deviation, and the mean absolute
    Laplacian and gradient of the channel-mean image, of uint8 (N, C, H, W) images in [0, 1]."""
    out = []
    for start in range(0, len(images), chunk):
        x = torch.as_tensor(images[start:start + chunk]).float() / 255
        g = x.mean(1)
        laplacian = (4 * g[:, 1:-1, 1:-1] - g[:, :-2, 1:-1] - g[:, 2:, 1:-1]
                     - g[:, 1:-1, :-2] - g[:, 1:-1, 2:]).abs().mean((1, 2))
        gradient = g.diff(dim=2).abs().mean((1, 2)) + g.diff(dim=1).abs().mean((1, 2))
        out.append(torch.cat([x.mean((2, 3)), x.std((2, 3)), laplacian[:, None], gradient[:, None]], 1))
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, 0))


def reference(features: np.ndarray, images: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
    """The tensors a classifier keeps to run the check: the pool's normalised features and its
    image statistics."""
    return {"shift_pool_features": torch.as_tensor(l2_normalize(features)),
            "shift_pool_images": torch.as_tensor(image_statistics(images), dtype=torch.float64)}


def earlier_references(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The references of the labs a classifier knew before its latest one, oldest first."""
    labs: list[dict[str, torch.Tensor]] = []
    while all(EARLIER.format(len(labs)) + k in tensors for k in KEYS):
        labs.append({k: tensors[EARLIER.format(len(labs)) + k] for k in KEYS})
    return labs


def kept_references(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors`' every known lab (its earlier ones, then its latest) as the earlier labs of a
    classifier that adds another lab's labels to it."""
    labs = earlier_references(tensors) + ([{k: tensors[k] for k in KEYS}] if all(k in tensors for k in KEYS) else [])
    return {EARLIER.format(i) + k: v for i, lab in enumerate(labs) for k, v in lab.items()}


class KnownLabs:
    """The check against every lab a classifier knows (one, unless labels were added from
    another lab): a batch is flagged when it is unlike each of them (the lowest score), and it
    is unlike the first lab (`unlike_first_lab`) when its own check against that lab warns."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.checks = [ShiftCheck(lab) for lab in earlier_references(tensors)] + [ShiftCheck(tensors)]

    def __call__(self, features: np.ndarray, images: torch.Tensor | np.ndarray) -> dict[str, Any]:
        """ShiftCheck's fields of the lab the batch is most like; with several labs also
        `shift_nearest_lab` (0: the first), `shift_lab_scores` and `shift_unlike_first_lab`."""
        results = [check(features, images) for check in self.checks]
        nearest = int(np.argmin([r["shift_score"] for r in results]))
        out = dict(results[nearest])
        if len(results) > 1:
            out.update(shift_nearest_lab=nearest, shift_lab_scores=[r["shift_score"] for r in results],
                       shift_unlike_first_lab=results[0]["shift_warning"])
        return out


def unlike_first_lab(result: dict[str, Any]) -> bool:
    """Does a `KnownLabs` result say the batch is unlike the lab whose cells set the backbone's
    BatchNorm statistics (what `predict --adapt auto` re-estimates for)?"""
    return bool(result.get("shift_unlike_first_lab", result["shift_warning"]))


class ShiftCheck:
    """The test of the module docstring, set up once from a classifier's tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        from ssl_blood.features.index import CellIndex

        pool = tensors["shift_pool_features"].numpy()
        self.k = max(1, min(NEIGHBOURS, len(pool) - 1))
        self.index = CellIndex.build(pool, kind="flat", use_gpu=False)
        dims = max(1, min(FEATURE_DIMS, pool.shape[1], len(pool) // 8))
        self.basis = np.linalg.svd(pool - pool.mean(0), full_matrices=False)[2][:dims].T
        self.pool_views = [pool @ self.basis, tensors["shift_pool_images"].numpy()]
        # leave-self-out: a pool cell's residual holds no sampling error of its own beyond its
        # neighbours', so bootstrap batches of pool residuals are the null at size n
        nearest, _ = self._nearest(pool, own=True)
        self.pool_raw = [v - v[nearest].mean(1) for v in self.pool_views]
        residuals = [r - r[nearest].mean(1) for r in self.pool_raw]
        self.centre = [r.mean(0) for r in residuals]
        self.pool_residuals = [r - c for r, c in zip(residuals, self.centre)]
        self.whiten = [_inverse_covariance(r) for r in self.pool_residuals]

    def _nearest(self, features: np.ndarray, own: bool = False) -> tuple[np.ndarray, float]:
        """Each cell's pool neighbours, and the batch's effective size: the pool is a sample
        too, so the neighbours' means carry its sampling error, shared by every batch cell that
        uses the same pool cells (a slide of one class leans on that class's pool cells alone).
        The mean residual's variance is about (1/n + sum of the pool cells' squared shares of the
        neighbour slots + 1/N for the centre) times a pool residual's."""
        from ssl_blood.features.neighbours import neighbours

        _, nearest = neighbours(self.index, features, self.k, np.arange(len(features)) if own else None)
        shares = np.bincount(nearest.ravel(), minlength=self.index.ntotal) / nearest.size
        return nearest, 1 / (1 / len(features) + float(np.sum(shares ** 2)) + 1 / self.index.ntotal)

    def residuals(self, features: np.ndarray, images: torch.Tensor | np.ndarray) -> tuple[list[np.ndarray], float]:
        """Per view, each cell minus its pool neighbours' mean, less what the same comparison
        gives those neighbours themselves (a neighbourhood's own lean: neighbours sit towards
        dense regions, and each class's cells lean their own way, which a slide of another
        class mix would otherwise add up), less the pool's mean; and the effective size."""
        features = l2_normalize(features)
        nearest, n_eff = self._nearest(features)
        views = [features @ self.basis, image_statistics(images)]
        return [v - pool[nearest].mean(1) - raw[nearest].mean(1) - centre for v, pool, raw, centre
                in zip(views, self.pool_views, self.pool_raw, self.centre)], n_eff

    def __call__(self, features: np.ndarray, images: torch.Tensor | np.ndarray) -> dict[str, Any]:
        """`shift_score` (the larger view's T² over its threshold: above 1 warns),
        `shift_threshold` (1), `shift_warning`, and each view's statistic and threshold."""
        residuals, n_eff = self.residuals(features, images)
        draws = np.random.default_rng(0).integers(
            0, self.index.ntotal, size=(BOOTSTRAP_DRAWS, min(len(features), BOOTSTRAP_MAX_CELLS)))
        views = {}
        for name, batch, pool, whiten in zip(VIEWS, residuals, self.pool_residuals, self.whiten):
            null = _hotelling(_bootstrap_means(pool, draws), whiten, draws.shape[1])
            views[name] = {"statistic": float(_hotelling(batch.mean(0)[None], whiten, n_eff)[0]),
                           "threshold": float(np.quantile(null, 1 - FALSE_ALARM / len(VIEWS)))}
        score = max(v["statistic"] / v["threshold"] for v in views.values())
        return {"shift_score": float(score), "shift_threshold": 1.0, "shift_warning": bool(score > 1),
                "shift_views": views}


def _inverse_covariance(residuals: np.ndarray) -> np.ndarray:
    cov = np.atleast_2d(np.cov(residuals, rowvar=False))
    return np.linalg.pinv(cov + 1e-9 * np.trace(cov) * np.eye(len(cov)))


def _bootstrap_means(pool: np.ndarray, draws: np.ndarray, chunk: int = 100) -> np.ndarray:
    """Mean pool residual of each draw (rows of `draws`), a few draws at a time (memory)."""
    return np.concatenate([pool[draws[i:i + chunk]].mean(1) for i in range(0, len(draws), chunk)])


def _hotelling(means: np.ndarray, whiten: np.ndarray, n: float) -> np.ndarray:
    """Hotelling's T² per dimension of mean residuals (B, d) of batches of (effective) size `n`."""
    return n * np.einsum("bi,ij,bj->b", means, whiten, means) / means.shape[1]

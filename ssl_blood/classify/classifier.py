"""`Classifier`: a pretrained backbone's frozen features and a logistic head, trained on a
lab's own labels, calibrated, saved as one folder, and applied to new cells.

Every choice is made by cross-validation on the labelled cells (they are all training labels;
nothing is held out from them): the head's weight decay, whether temperature scaling helps,
the probability below which a cell goes to review. The folder holds classifier.json (format,
classes, preprocessing via the embedder's spec: the checkpoint's path and SHA-256, refused if
it changed; the precision its features were made in, kept at predict; temperature;
thresholds; hashes), head.pt (tensors only, loaded with
weights_only), card.json and card.md; a head that trained the backbone adds backbone.pt, and an
ensemble its fold models' member0.pt, member1.pt, ... (each checked by SHA-256 at load).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ssl_blood import __version__
from ssl_blood.classify import shift
from ssl_blood.classify.calibration import (calibration_report, expected_calibration_error,
                                            fit_temperature, matching_temperature,
                                            negative_log_likelihood, softmax)
from ssl_blood.data.cells import CellData
from ssl_blood.data.sources import DataSource
from ssl_blood.errors import UserError
from ssl_blood.features.embeddings import Embedder, EmbedderSpec, l2_normalize
from ssl_blood.files import check_writable, sha256_bytes, write_bytes, write_json, write_text

FORMAT_VERSION = 2  # 2: dihedral views; AdaBN through a head of its own (1 mapped features into the head's)
CONFIG, WEIGHTS, CARD, CARD_MD = "classifier.json", "head.pt", "card.json", "card.md"
HEADS = ("logistic", "propagate", "fine-tune", "fixmatch")
TRAINED_BACKBONE_HEADS = ("fine-tune", "fixmatch")  # heads that train the backbone (minutes, not seconds)
BACKBONE = "backbone.pt"  # a classifier's own backbone (trained heads, or `self_contained`)
ADAPTATIONS = ("none", "adabn", "auto")  # what predict may do to a new slide first (auto: adabn where the slide is unlike the first lab)
ADAPTED = "adabn/"  # prefix of the AdaBN head's tensors (see _adapted_head)
SOURCE_BATCHNORM = "adabn/batchnorm/"  # the backbone's BatchNorm statistics re-estimated on the lab's own cells (the last added ones')
# Dihedral views averaged per cell (model.inference.DIHEDRAL): measured on BloodMNIST val (quick
# features, 3 label draws), 8 views lift the logistic head from 69.0/79.1/83.3 % to 70.4/80.7/85.6 %
# at 40/120/400 labels for 8x the embedding time; 2 views (a half turn) give about half the gain.
DEFAULT_VIEWS = 8
CONSISTENCY_STATE = "consistency-state.pt"  # a trained head's run while it trains (to resume)
# A trained-backbone head's own cross-validation is optimistic (its backbone saw every label):
# measured on BloodMNIST test (standard features, 120 labels), head fine-tune had ECE 0.09-0.12
# with a temperature that cross-validation judged needless. So the training is rerun on k folds
# of the labelled cells and each fold's model judged on the labels it never saw (cross-fitting):
# those out-of-fold logits set the temperature, the review threshold and the card's accuracy.
CALIBRATION_FOLDS = 3
PSEUDO_PER_LABEL = (0, 5, 20)  # pseudo-labelled cells per labelled cell; 0 is the plain logistic head
DEFAULT_REVIEW_RATE = 0.15  # share of the labelled cells (cross-validated; trained heads: of the unlabelled pool) sent to review
OOD_QUANTILE = 0.99  # a cell further from the known cells than 99 % of the labelled ones is out of distribution
MAX_FOLDS = 5
MIN_MATCHING_POOL = 50  # unlabelled cells to match a trained head's temperature to its fold models (fewer: the held-out fit)
SHIFT_POOL = 2000  # unlabelled cells of the source embedded to calibrate the shift check
MAX_SHIFT_COPIES = 16_000  # shifted copies in all: many labels get fewer copies each
COPY_FEATURES, COPY_ORIGIN = "shift_copies/features", "shift_copies/origin"  # tensors
# What a cell is sent to review by (`review_scores`): "top", its calibrated top probability, or
# "smoothed", the probability of its call averaged over the cell and its REVIEW_NEIGHBOURS
# nearest cells of the lab's unlabelled pool (the SHIFT_POOL cells a classifier keeps): a call
# its neighbourhood disagrees with is less sure than its own probability says; or "auto", the
# one of the two whose review leaves the labelled cells' out-of-fold calls more accurate. Why
# auto: neighbours help a weak head and hurt a strong one. BloodMNIST test, quick features,
# logistic head, 8 views, typiclust labels, 3 draws, accepted accuracy at 15 % review, top ->
# smoothed: 0.795 -> 0.806 at 40 labels, 0.817 -> 0.824 at 120, 0.940 -> 0.927 at 1,196; the
# cross-validated comparison on the labelled cells chose the better one in all 9 draws
# (standard features, score chosen on val: the same pattern, experiments/review_score.py).
REVIEW_SCORES = ("auto", "smoothed", "top")
DEFAULT_REVIEW_SCORE = "auto"
REVIEW_NEIGHBOURS = 5
POOL_LOGITS = "review_pool_logits"  # the head's logits of the kept pool cells (tensors)
# An ensemble classifier (`train(ensemble=True)`, heads that train the backbone) keeps the
# calibration folds' models and predicts with the average of their and the trained model's
# probabilities: MEMBER_FILE per fold model's backbone, its head's tensors under MEMBER_PREFIX,
# the ensemble's review pool under ENSEMBLE. Why: on BloodMNIST val (quick features, fine-tune
# head, 120 labels, 3 draws) the average had ECE 0.031 where the one model with its matched
# temperature had 0.040, and accepted accuracy at 15 % review 0.845 against 0.836
# (docs/classifier.md, trained-head temperature); the cost is k + 1 backbone passes per cell.
MEMBER_FILE, MEMBER_PREFIX, ENSEMBLE = "member{}.pt", "member{}/", "ensemble/"


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k / n (sound at 0, n and small n)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def top_two_margin(probabilities: np.ndarray) -> np.ndarray:
    """Per row: the highest probability minus the second (1 with a single class)."""
    if probabilities.shape[1] < 2:
        return np.ones(len(probabilities))
    top2 = np.sort(probabilities, 1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def smoothed_scores(probabilities: np.ndarray, features: np.ndarray, pool_features: np.ndarray,
                    pool_probabilities: np.ndarray, k: int = REVIEW_NEIGHBOURS,
                    pool_queries: bool = False) -> np.ndarray:
    """Per cell: the probability of its call (the argmax of `probabilities`) averaged over the
    cell and its `k` nearest pool cells (cosine on `features` against the normalised
    `pool_features`, probabilities `pool_probabilities`). `pool_queries`: the cells are the
    pool itself, in order (a cell is not its own neighbour)."""
    from ssl_blood.features.index import CellIndex
    from ssl_blood.features.neighbours import clamped_k, neighbours

    index = CellIndex.build(np.ascontiguousarray(pool_features, dtype=np.float32), kind="flat", use_gpu=False)
    k = clamped_k(index, k, pool_queries)
    _, nearest = neighbours(index, l2_normalize(features).astype(np.float32), k,
                            np.arange(len(features)) if pool_queries else None)
    call = probabilities.argmax(1)
    of_call = np.take_along_axis(pool_probabilities[nearest], call[:, None, None], axis=2)[:, :, 0]
    return (probabilities.max(1) + of_call.sum(1)) / (k + 1)


@dataclass
class Prediction:
    """Per cell: its name (path or id), predicted class, calibrated probabilities, the margin
    between the top two, the out-of-distribution score, the review score (`review_score`: the
    top probability, or the neighbour-smoothed one, see REVIEW_SCORES) and the review flag."""

    names: np.ndarray
    name_column: str
    class_names: tuple[str, ...]
    probabilities: np.ndarray
    ood: np.ndarray
    review: np.ndarray
    thresholds: dict[str, float]
    shift: dict[str, Any] | None = None
    adapted: str = "none"  # the adaptation applied: "adabn" where predict re-estimated BatchNorm
    scores: np.ndarray | None = None  # what `review` compares with min_probability (None: the top probability)
    review_score: str = "top"

    @property
    def review_scores(self) -> np.ndarray:
        return self.probabilities.max(1) if self.scores is None else self.scores

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(1)

    @property
    def margin(self) -> np.ndarray:
        return top_two_margin(self.probabilities)

    def differential(self) -> dict[str, Any]:
        """The differential count: cells and percentage per predicted class (95 % Wilson
        intervals), over all cells and over the accepted ones, and the review pile."""
        n, accepted = len(self.names), ~self.review
        rows = {}
        for c, name in enumerate(self.class_names):
            k, k_acc = int((self.predicted == c).sum()), int((self.predicted[accepted] == c).sum())
            low, high = wilson_interval(k, n)
            rows[name] = {"cells": k, "percent": 100 * k / max(n, 1),
                          "ci95": [100 * low, 100 * high], "accepted": k_acc}
        return {"cells": n, "review": int(self.review.sum()), "accepted": int(accepted.sum()),
                "thresholds": self.thresholds, "review_score": self.review_score,
                "adapted": self.adapted, "classes": rows,
                **(self.shift or {"shift_score": None, "shift_threshold": None, "shift_warning": None})}

    def to_csv(self, path: str | Path) -> Path:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([self.name_column, "predicted", "probability", "margin", "ood_score",
                         "review_score", "review"] + [f"p_{c}" for c in self.class_names])
        top, margin, predicted = self.probabilities.max(1), self.margin, self.predicted  # once, not per row
        score = self.review_scores
        for i, name in enumerate(self.names):
            writer.writerow([name, self.class_names[predicted[i]], f"{top[i]:.4f}",
                             f"{margin[i]:.4f}", f"{self.ood[i]:.3f}", f"{score[i]:.4f}", int(self.review[i])]
                            + [f"{p:.4f}" for p in self.probabilities[i]])
        return write_text(path, buffer.getvalue())


HEAD_TENSORS = ("weight", "bias", "mean", "std", "reference", "ood_scale")


@dataclass
class LinearHead:
    """A standardised logistic head on one feature space, read from a classifier's tensors under
    `prefix`: its calibration temperature, its review thresholds, the labelled cells'
    features it knows (`reference`, for the out-of-distribution score) and the score it sends
    cells to review by (REVIEW_SCORES; "smoothed" needs the pool's logits under `prefix`)."""

    tensors: dict[str, torch.Tensor]
    prefix: str
    temperature: float
    thresholds: dict[str, float]
    score: str = "top"

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[self.prefix + name]

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Uncalibrated scores (N, C) of the standardised features."""
        z = (torch.as_tensor(features, dtype=torch.float32) - self["mean"]) / self["std"]
        return (z @ self["weight"].T + self["bias"]).numpy()

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        return softmax(self.logits(features), self.temperature).astype(np.float32)

    def ood_scores(self, features: np.ndarray) -> np.ndarray:
        """Cosine distance to the nearest labelled cell, in units of the labelled cells' own
        median nearest-neighbour distance (1: as typical as a known cell)."""
        return _nearest_distance(l2_normalize(features), self["reference"].numpy()) / float(self["ood_scale"])

    @property
    def smooths(self) -> bool:
        return self.score == "smoothed" and self.prefix + POOL_LOGITS in self.tensors

    def review_scores(self, probabilities: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Per cell, how sure the call is (higher: surer): the top probability, or with score
        "smoothed" the call's probability averaged with its nearest pool cells' (`smoothed_scores`)."""
        if not self.smooths:
            return probabilities.max(1)
        return smoothed_scores(probabilities, features, self.tensors[shift.KEYS[0]].numpy(),
                               softmax(self[POOL_LOGITS].numpy(), self.temperature))

    def pool_threshold(self, review_rate: float) -> float:
        """The review score below which `review_rate` of the kept pool cells fall (each scored
        without itself as a neighbour)."""
        if not review_rate:
            return 0.0
        pool = softmax(self[POOL_LOGITS].numpy(), self.temperature)
        scores = pool.max(1) if not self.smooths else smoothed_scores(
            pool, self.tensors[shift.KEYS[0]].numpy(), self.tensors[shift.KEYS[0]].numpy(), pool,
            pool_queries=True)
        return float(np.quantile(scores, review_rate))

    def review_flags(self, probabilities: np.ndarray, ood: np.ndarray,
                     thresholds: dict[str, float] | None = None,
                     scores: np.ndarray | None = None) -> np.ndarray:
        """Cells for a person to look at: review score (`scores`; default the top probability)
        below the threshold, or out of distribution."""
        t = thresholds or self.thresholds
        scores = probabilities.max(1) if scores is None else scores
        return (scores < t["min_probability"]) | (ood > t["max_ood"])


@dataclass
class Member:
    """One fold model an ensemble classifier keeps: a backbone trained without one fold's
    labels (`embedder`, saved from `backbone_file`) and the logistic head fitted on its
    features of the other folds' cells (`head`, temperature 1)."""

    embedder: Embedder
    backbone_file: bytes
    head: LinearHead

    def probabilities(self, images: torch.Tensor, views: int, progress: bool | None = False) -> np.ndarray:
        return self.head.probabilities(self.embedder(images, progress=progress, views=views))


class Classifier:
    """A frozen embedder, a standardised logistic head and its calibration (see the module
    docstring). Build with `Classifier.train`, keep with `save`, get back with `load`."""

    def __init__(self, embedder: Embedder, class_names: Sequence[str], tensors: dict[str, torch.Tensor],
                 temperature: float, thresholds: dict[str, float], card: dict[str, Any],
                 backbone_file: bytes | None = None, views: int = 1,
                 adapted: dict[str, Any] | None = None, review_score: str = "top",
                 members: Sequence[Member] = (), ensemble: dict[str, Any] | None = None):
        self.embedder, self.class_names = embedder, tuple(class_names)
        self.tensors, self.temperature = tensors, float(temperature)
        self.thresholds, self.card = dict(thresholds), card
        self.backbone_file = backbone_file  # the checkpoint bytes saved as BACKBONE, if its own
        self.views = int(views)  # dihedral views averaged per cell, at training and predicting
        self.adapted = adapted  # the AdaBN head's temperature and thresholds (its tensors: ADAPTED)
        self.review_score = review_score  # REVIEW_SCORES; the AdaBN head reviews by the top probability
        self.members = list(members)  # an ensemble's fold models (MEMBER_FILE), else none
        self.ensemble = ensemble  # the ensemble's thresholds (its review pool: tensors under ENSEMBLE)
        self._shift: shift.KnownLabs | None = None  # set up on first use

    @property
    def head(self) -> LinearHead:
        """The head on the backbone's features as pretrained."""
        return LinearHead(self.tensors, "", self.temperature, self.thresholds, self.review_score)

    @property
    def adapted_head(self) -> LinearHead | None:
        """The head on the features of a backbone whose BatchNorm statistics were re-estimated
        on the cells it classifies (AdaBN), or None (trained without enough source cells)."""
        if self.adapted is None:
            return None
        return LinearHead(self.tensors, ADAPTED, self.adapted["temperature"], self.adapted["thresholds"])

    @property
    def ensemble_head(self) -> LinearHead | None:
        """The review of an ensemble's calls: its thresholds, and its pool's averaged
        probabilities stored as log-probabilities (temperature 1), so LinearHead's review score
        and pool threshold read them as they read a head's pool logits. Its own `logits` are
        not the ensemble's: `ensemble_probabilities` are. None for a single model."""
        if not self.members:
            return None
        return LinearHead(self.tensors, ENSEMBLE, 1.0, self.ensemble["thresholds"], self.review_score)

    def ensemble_probabilities(self, images: torch.Tensor, features: np.ndarray, views: int,
                               progress: bool | None = False) -> np.ndarray:
        """The average of the trained model's probabilities (its `features`, temperature 1) and
        each fold model's (embedding `images` again per member)."""
        each = [softmax(self.head.logits(features))]
        each += [m.probabilities(images, views, progress) for m in self.members]
        return np.mean(each, axis=0).astype(np.float32)

    # -- training ----------------------------------------------------------------------

    @classmethod
    def train(cls, embedder: Embedder, cells: CellData, head: str = "logistic", seed: int = 0,
              review_rate: float = DEFAULT_REVIEW_RATE,
              labels_file: dict[str, str] | None = None, progress: bool | None = False,
              base: "Classifier | None" = None, consistency: Any = None,
              state_path: str | Path | None = None, views: int = DEFAULT_VIEWS,
              calibration_folds: int = CALIBRATION_FOLDS,
              review_score: str = DEFAULT_REVIEW_SCORE, shift_copies: int = 0,
              ensemble: bool = False) -> "Classifier":
        """Fit on every labelled cell of `cells` with `embedder`'s features (e.g.
        `Embedder.from_checkpoint`), each averaged over `views` dihedral views; settings by
        stratified cross-validation. With `base`, its labelled cells are kept and these added (a
        review's corrections, a new lab's labels; its views are kept too). Heads 'fixmatch' and
        'fine-tune' first train the backbone, with or without the unlabelled cells
        (`consistency`: a `ConsistencyConfig`; `state_path`: where the run is kept to resume),
        see `classify.consistency`; their calibration and review threshold come from the
        training rerun on `calibration_folds` folds of the labelled cells (CALIBRATION_FOLDS; 0:
        from the trained backbone's own, optimistic, cross-validation). `review_score`: what
        cells are sent to review by (REVIEW_SCORES; "smoothed" needs unlabelled cells in
        `cells`, else the top probability is used). `shift_copies`: head logistic also learns
        from that many copies of each labelled cell under random stain, blur, resampling and
        brightness shifts (`data.shifts.shifted_copies`; at most MAX_SHIFT_COPIES in all), for
        slides from other stains and scanners (docs/robustness.md); an added-to classifier keeps
        its own. `ensemble`: a trained head keeps its calibration folds' models and predicts with
        the average of all k + 1 (better calibrated, k + 1 times the embedding time; MEMBER_FILE)."""
        from ssl_blood.model.inference import VIEWS

        if head not in HEADS:
            raise UserError(f"`head` {head}: choose one of {', '.join(HEADS)}", param="head")
        if not 0 <= review_rate < 1:
            raise UserError(f"`review_rate` {review_rate} must be in [0, 1)", param="review_rate")
        if views not in VIEWS:
            raise UserError(f"`views` {views} must be one of {', '.join(map(str, VIEWS))}", param="views")
        if review_score not in REVIEW_SCORES:
            raise UserError(f"`review_score` {review_score}: choose one of {', '.join(REVIEW_SCORES)}",
                            param="review_score")
        _check_shift_copies(shift_copies, head)
        _check_ensemble(ensemble, head, calibration_folds)
        views = base.views if base is not None else views
        shift_copies = base.shift_copies if base is not None else shift_copies
        unlabelled = clean = None
        rest_rows = np.flatnonzero(cells.labels.numpy() < 0)
        if head in ("propagate", "fixmatch") and not len(rest_rows):
            raise UserError(f"head '{head}' learns from unlabelled cells too and this data has "
                            f"none besides the labelled ones; give the whole folder, or use head "
                            f"logistic", param="head")
        if head in TRAINED_BACKBONE_HEADS:
            if base is not None:
                raise UserError(f"labels are added to a classifier with its own head; train a "
                                f"{head} classifier anew from `checkpoint`", param="head")
            return cls._train_backbone(head, embedder, cells, seed, review_rate, labels_file,
                                       progress, consistency, state_path, views, calibration_folds,
                                       review_score, ensemble)
        pool = _pool_rows(cells, seed)
        pool_images = cells.subset(pool).images if len(pool) else None
        if head == "propagate":
            rest = cells.subset(rest_rows)
            embedder.check_images(rest.images, "the unlabelled images")
            unlabelled = embedder(rest.images, progress=progress, views=views)
            clean = unlabelled[np.searchsorted(rest_rows, pool)]
        elif pool_images is not None:
            clean = embedder(pool_images, progress=progress, views=views)
        cells = cells.labelled()
        if base is None:
            _check_class_counts(cells.labels.numpy(), cells.class_names)
        elif not len(cells):
            raise UserError("no labelled cells to add; give labels (`labels`) for some cells",
                            param="labels")
        embedder.check_images(cells.images, "the labelled images")
        adapted = _adapted_features(embedder, cells.images, pool_images, base, views, progress)
        copies = None
        if shift_copies:
            from ssl_blood.data.shifts import shifted_copies

            per_cell = min(shift_copies, max(1, MAX_SHIFT_COPIES // len(cells)))
            images, origin = shifted_copies(cells.images.numpy(), per_cell, seed)
            copies = (embedder(torch.as_tensor(images), progress=progress, views=views), origin)
        classifier = cls.from_features(embedder, embedder(cells.images, progress=progress, views=views),
                                       cells, head, seed, review_rate, labels_file, base, unlabelled,
                                       clean, pool_images, views, adapted, review_score, copies)
        classifier.backbone_file = base.backbone_file if base is not None else None
        if base is not None and base.members:  # said once trained: a refusal stays one line
            from ssl_blood import ui

            ui.note(f"labels added to an ensemble give a single model on its trained backbone (its "
                    f"{len(base.members)} fold models learned without these labels); for an "
                    f"ensemble again, train anew from the checkpoint with `ensemble`")
        return classifier

    @classmethod
    def from_features(cls, embedder: Embedder, features: np.ndarray, cells: CellData,
                      head: str = "logistic", seed: int = 0,
                      review_rate: float = DEFAULT_REVIEW_RATE,
                      labels_file: dict[str, str] | None = None,
                      base: "Classifier | None" = None,
                      unlabelled: np.ndarray | None = None,
                      clean: np.ndarray | None = None,
                      clean_images: torch.Tensor | np.ndarray | None = None,
                      views: int = 1,
                      adapted: tuple[np.ndarray, dict[str, torch.Tensor]] | None = None,
                      review_score: str = DEFAULT_REVIEW_SCORE,
                      copies: tuple[np.ndarray, np.ndarray] | None = None) -> "Classifier":
        """`train` on features already computed by `embedder` (averaged over `views`) for the
        labelled `cells` (and, for head 'propagate', for the `unlabelled` cells). `clean`,
        `clean_images`: features and images of unlabelled cells of the same source, the
        reference of the batch shift check (classify.shift; else the labelled cells are).
        `adapted`: the labelled cells' features under BatchNorm statistics re-estimated on the
        lab's own cells, and those statistics (`_adapted_features`): the AdaBN head's.
        `review_score` "smoothed" (REVIEW_SCORES) leans on the `clean` cells; without them the
        classifier reviews by the top probability. `copies`: features of shifted copies of the
        labelled cells and each one's row in `features` (`train`'s `shift_copies`)."""
        labels = cells.labels.numpy()
        known_labels = np.zeros(0, dtype=np.int64)
        if base is not None:
            if tuple(cells.class_names) != base.class_names:
                raise UserError("the added labels use other classes than the classifier "
                                f"({', '.join(base.class_names)})", param="labels")
            known, known_labels = base.training_set()
            copies = _added_copies(base, len(known), copies)
            features, labels = np.concatenate([known, features]), np.concatenate([known_labels, labels])
        _check_class_counts(labels, cells.class_names)
        if head == "propagate":
            if unlabelled is None or not len(unlabelled):
                raise UserError("head 'propagate' needs the unlabelled cells' features", param="head")
            fit = _cross_validated_propagate(features, labels, unlabelled, len(cells.class_names), seed)
        else:
            fit = _cross_validated_logistic(features, labels, len(cells.class_names), seed, copies)
        tensors, calibration, thresholds, oof = _fitted_head(fit, features, labels, review_rate)
        if copies is not None:  # kept with the labelled cells, for labels added later
            tensors.update({COPY_FEATURES: torch.as_tensor(np.asarray(copies[0], dtype=np.float16)),
                            COPY_ORIGIN: torch.as_tensor(copies[1].astype(np.int64))})
        # what it learned from, so labels can be added later (`base`)
        tensors.update(features=torch.as_tensor(np.asarray(features, dtype=np.float32)),
                       labels=torch.as_tensor(labels.astype(np.int64)))
        has_pool = clean is not None and len(clean) > 0 and clean_images is not None
        # the training lab's own cells: what a clean batch looks like
        tensors.update(shift.reference(clean, clean_images) if has_pool
                       else shift.reference(features[-len(cells):], cells.images))
        if base is not None:  # the labs it knew stay known: their slides are not a shift
            tensors.update(shift.kept_references(base.tensors))
        main = LinearHead(tensors, "", calibration["temperature"], thresholds, "smoothed")
        if has_pool:  # the head's calls on the lab's own cells: the neighbours a review may lean on
            tensors[POOL_LOGITS] = torch.as_tensor(main.logits(clean))
        main.score, compared = _chosen_review_score(main, review_score, oof, labels, features, review_rate)
        if main.smooths:  # sends review_rate of the lab's own cells to review
            thresholds["min_probability"] = main.pool_threshold(review_rate)
        card = _card(embedder, cells, labels, fit, calibration, oof, thresholds, review_rate,
                     labels_file, head, main.review_scores(oof, features))
        card["review_score"] = _review_score_card(main, len(clean) if has_pool else 0, review_score, compared)
        if copies is not None:
            from ssl_blood.data.shifts import SHIFTS

            card["shift_copies"] = {"per_cell": int(np.bincount(copies[1]).max()), "copies": int(len(copies[1])),
                                    "shifts": list(SHIFTS), "severities": "1-5"}
        review_score = main.score
        card["views"] = views
        card["shift_check"] = {"calibrated_on": f"{len(clean)} unlabelled cells of the source" if has_pool
                               else f"the {len(cells)} labelled cells",
                               "false_alarm_rate": shift.FALSE_ALARM,
                               "test": "local two-sample test of features and image statistics (classify.shift)"}
        if base is not None:
            card["shift_check"]["known_labs"] = 1 + len(shift.earlier_references(tensors))
            card["shift_check"]["note"] = (
                "a batch like any known lab (the first, or one whose labels were added) does not "
                "warn; predict --adapt auto re-estimates BatchNorm for a batch unlike the first lab")
        if "propagation" in fit:
            card["propagation"] = fit["propagation"]
        if base is not None:
            card["added_to"] = {"classifier_labels": int(len(known_labels)),
                                "added_labels": int(len(cells)),
                                "created": base.card.get("created"), "labels_file": base.card.get("labels_file")}
        adapted_config = None
        if adapted is not None:
            adapted_config, card["adabn"] = _adapted_head(tensors, adapted, labels, base, seed,
                                                          review_rate, cells.class_names)
        return cls(embedder, cells.class_names, tensors, calibration["temperature"], thresholds, card,
                   views=views, adapted=adapted_config, review_score=review_score)

    @classmethod
    def _train_backbone(cls, head: str, embedder: Embedder, cells: CellData, seed: int,
                        review_rate: float, labels_file: dict[str, str] | None,
                        progress: bool | None, consistency: Any,
                        state_path: str | Path | None, views: int,
                        calibration_folds: int = CALIBRATION_FOLDS,
                        review_score: str = DEFAULT_REVIEW_SCORE, ensemble: bool = False) -> "Classifier":
        """Train the pretrained backbone (`_trained_backbone`), then the logistic head, its
        calibration and thresholds on the trained backbone's features as for head 'logistic';
        with `calibration_folds`, calibration and threshold again from the training rerun on
        that many folds (`_cross_fitted_logits`), whose models an `ensemble` keeps. A `minutes`
        budget covers all the runs. The trained backbone becomes the classifier's own (BACKBONE)."""
        from ssl_blood.classify.consistency import ConsistencyConfig

        _check_calibration_folds(calibration_folds)
        labelled = cells.labelled()
        labels = labelled.labels.numpy()
        _check_class_counts(labels, cells.class_names)
        embedder.check_images(labelled.images, "the labelled images")
        cfg = consistency or ConsistencyConfig(seed=seed)
        folds = _calibration_folds(labels, calibration_folds, seed)
        if ensemble and folds is None:
            raise UserError("`ensemble` keeps the calibration folds' models and a class has a "
                            "single labelled cell; label at least 2 cells per class", param="ensemble")
        k = len(np.unique(folds)) if folds is not None else 0
        if cfg.minutes is not None and k:
            cfg = dataclasses.replace(cfg, minutes=cfg.minutes / (k + 1))  # the budget is the command's
        data, trained, report, frozen_accuracy = _trained_backbone(head, embedder, cells, seed, cfg,
                                                                   state_path, progress)
        # the head that starts training sees single views, as training does; the final one `views`
        classifier = cls.train(trained, cells, "logistic", seed, review_rate, labels_file, progress,
                               views=views, review_score=review_score)
        classifier.backbone_file = data
        pretrained = {"checkpoint": embedder.spec.checkpoint, "checkpoint_sha256": embedder.identity}
        classifier.card.update(head=head, consistency={
            **report, "pretrained": pretrained, "frozen_head_cv_accuracy": frozen_accuracy,
            "note": "the backbone learned from these labels: the cross-validated accuracy and "
                    "calibration of the head on its features are optimistic"})
        if folds is not None:
            fold_cfg = dataclasses.replace(cfg, steps=report["steps"], minutes=None)
            rows = _pool_rows(cells, seed)
            pool = cells.subset(rows).images if len(rows) >= MIN_MATCHING_POOL else None
            oof, fold_pool_logits, members = _cross_fitted_logits(head, embedder, cells, folds, seed,
                                                                  fold_cfg, state_path, progress, views, pool)
            pooled = None
            if pool is not None:  # the final model's logits of the same cells (kept by `train`), then the folds'
                pooled = (classifier.tensors[POOL_LOGITS].numpy(), fold_pool_logits)
            classifier.recalibrate(oof, labels, folds, review_rate, pooled)
            if ensemble:
                classifier.keep_members(members, oof, review_rate, pooled)
            classifier.card["consistency"]["note"] = (
                f"accuracy, calibration and review threshold cross-fitted: the training rerun on "
                f"{k} folds, each fold's cells judged by a model that never saw their labels")
        return classifier

    def recalibrate(self, oof_logits: np.ndarray, labels: np.ndarray, folds: np.ndarray,
                    review_rate: float,
                    ensemble: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Temperature, review threshold and the card's cross-validated figures from held-out
        logits `oof_logits` of the labelled cells (e.g. `_cross_fitted_logits`).

        With `ensemble` (this model's logits of unlabelled cells of the lab, and each fold
        model's logits (k, P, C) of the same cells) the temperature is the one that brings this
        model's probabilities there closest to the average of all k + 1 models', and the review
        threshold sends `review_rate` of those cells to review. Why: the temperature fitted on
        the held-out logits describes the fold models (trained on fewer labels) from 120 cells;
        on BloodMNIST val (quick preset, fine-tune head, 120 labels, 3 draws; half of val as the
        unlabelled cells, the other half scored) it was 2.05 / 1.68 / 2.84 where the trained
        model's best was 1.66 / 1.93 / 0.89 (ECE 0.109 / 0.038 / 0.391, uncalibrated 0.099 /
        0.103 / 0.071), while the matched one was 1.49 / 1.91 / 0.80 (ECE 0.037 / 0.034 /
        0.048): fitted on thousands of cells, it may sharpen as well as cool. An average of
        models trained on different labels is calibrated where each is over-confident (deep
        ensembles, Lakshminarayanan et al. 2017): 0.036 / 0.035 / 0.022 there, but at k + 1
        times the cost of every prediction."""
        calibration = {**calibration_report(oof_logits, labels, folds, cross_fitted=True), "cross_fitted": True}
        if ensemble is not None:
            final, members = ensemble
            average = np.mean([softmax(z) for z in (final, *members)], axis=0)
            matched = matching_temperature(final, average)
            held = softmax(oof_logits, matched)
            calibration.update(
                held_out_temperature=calibration["temperature"], temperature=matched, kept=True,
                method=f"matched to the average of the trained model and its {len(members)} fold "
                       f"models on {len(final)} unlabelled cells",
                ece_after=expected_calibration_error(held, labels),
                nll_after=negative_log_likelihood(held, labels))
        self.temperature = float(calibration["temperature"])
        oof = softmax(oof_logits, self.temperature)
        known = self.tensors["features"].numpy()[-len(labels):] if "features" in self.tensors else None
        if self.card.get("review_score", {}).get("asked") == "auto" and POOL_LOGITS in self.tensors:
            # chosen again on the cross-fitted calls: the trained backbone's own are optimistic
            probe = LinearHead(self.tensors, "", self.temperature, self.thresholds, "smoothed")
            self.review_score, compared = _chosen_review_score(probe, "auto", oof, labels, known, review_rate)
            self.card["review_score"] = _review_score_card(self.head, len(self.tensors[POOL_LOGITS]),
                                                           "auto", compared)
        head = self.head
        if head.smooths:  # the labelled cells' neighbours: in the trained backbone's features
            self.thresholds["min_probability"] = head.pool_threshold(review_rate)
            scores = head.review_scores(oof, known)
        else:
            scored = softmax(ensemble[0], self.temperature) if ensemble is not None else oof
            self.thresholds["min_probability"] = float(np.quantile(scored.max(1), review_rate)) if review_rate else 0.0
            scores = oof.max(1)
            if ensemble is not None and "review_score" in self.card:
                self.card["review_score"]["threshold"] = "sends review_rate_target of the lab's unlabelled cells to review"
        correct, accepted = oof.argmax(1) == labels, scores >= self.thresholds["min_probability"]
        self.card["calibration"] = calibration
        self.card["thresholds"] = dict(self.thresholds)
        self.card["cross_validation"].update(
            folds=int(len(np.unique(folds))), cross_fitted=True, **cv_metrics(labels, oof, self.class_names),
            accepted_accuracy=float(correct[accepted].mean()) if accepted.any() else None,
            review_rate=float(1 - accepted.mean()))

    def keep_members(self, members: Sequence[tuple[bytes, Embedder, dict[str, Any]]],
                     oof_logits: np.ndarray, review_rate: float,
                     pooled: tuple[np.ndarray, np.ndarray] | None) -> None:
        """Make this trained model an ensemble with its fold models `members` ((backbone bytes,
        embedder, logistic fit) per fold, `_cross_fitted_logits`). The review threshold sends
        `review_rate` of the lab's unlabelled cells to review by the ensemble's averaged
        probabilities (`pooled`: this model's and the folds' logits of those cells), or, without
        them, of the labelled cells by the fold models' held-out calls."""
        kept = []
        for i, (data, embedder, fit) in enumerate(members):
            prefix = MEMBER_PREFIX.format(i)
            self.tensors.update({prefix + "weight": fit["head"].weight.detach().clone(),
                                 prefix + "bias": fit["head"].bias.detach().clone(),
                                 prefix + "mean": torch.as_tensor(fit["mean"]),
                                 prefix + "std": torch.as_tensor(fit["std"])})
            kept.append(Member(embedder, data, LinearHead(self.tensors, prefix, 1.0, {})))
        self.members = kept
        self.ensemble = {"thresholds": dict(self.thresholds)}
        if pooled is not None:
            final, folds = pooled
            average = np.mean([softmax(z) for z in (final, *folds)], axis=0)
            self.tensors[ENSEMBLE + POOL_LOGITS] = torch.as_tensor(np.log(np.clip(average, 1e-12, None)))
            rate = self.ensemble_head.pool_threshold(review_rate)
        else:
            rate = float(np.quantile(softmax(oof_logits).max(1), review_rate)) if review_rate else 0.0
        self.ensemble["thresholds"]["min_probability"] = rate
        reviewed = "the lab's unlabelled cells" if pooled is not None else "the labelled cells"
        self.card["ensemble"] = {
            "models": len(kept) + 1, "thresholds": dict(self.ensemble["thresholds"]),
            "note": f"predictions average the probabilities of the trained model and its "
                    f"{len(kept)} calibration-fold models (temperature 1: an average of models "
                    f"trained on different labels is calibrated where each is over-confident); "
                    f"its review threshold sends {review_rate:.0%} of {reviewed} to review. The "
                    f"calibration and threshold figures above are the trained model's, which "
                    f"AdaBN (adapt) applies alone"}

    def own_backbone(self) -> None:
        """Keep the backbone inside the classifier's folder (BACKBONE, weights only), so the
        folder runs without the pretraining run beside it."""
        if self.backbone_file is not None:
            return
        from ssl_blood.model.checkpoint import backbone_only

        self.backbone_file, self.embedder = _own_backbone(
            backbone_only(_pretrained_checkpoint(self.embedder)), self.embedder.device)

    @property
    def shift_copies(self) -> int:
        """Shifted copies per labelled cell its head learned from (0: none)."""
        return int(self.card.get("shift_copies", {}).get("per_cell", 0))

    def training_set(self) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of the cells this classifier learned from."""
        if "features" not in self.tensors:
            raise UserError("this classifier keeps no record of its labelled cells (saved by an "
                            "earlier ssl-blood); train it again from its labels file",
                            param="from_classifier")
        return self.tensors["features"].numpy(), self.tensors["labels"].numpy()

    # -- applying ----------------------------------------------------------------------

    def logits(self, features: np.ndarray) -> np.ndarray:
        """The head's uncalibrated scores (N, C) of features (as `features` computes them)."""
        return self.head.logits(features)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        return self.head.probabilities(features)

    def ood_scores(self, features: np.ndarray) -> np.ndarray:
        return self.head.ood_scores(features)

    def features(self, images: torch.Tensor, progress: bool | None = False,
                 views: int | None = None) -> np.ndarray:
        """The features the head reads: the embedder's, averaged over the classifier's views
        (or `views`: fewer is faster, and a little less accurate)."""
        return self.embedder(images, progress=progress, views=self.views if views is None else views)

    def shift_check(self, features: np.ndarray, images: torch.Tensor | np.ndarray) -> dict[str, Any] | None:
        """Is this batch (its unadapted `features` and its `images`) unlike the cells of every
        lab the classifier learned from? See classify.shift. None for a classifier saved without
        that reference (an earlier ssl-blood)."""
        if not self.has_shift_reference or not len(features):
            return None
        if self._shift is None:
            self._shift = shift.KnownLabs(self.tensors)
        return self._shift(features, images)

    @property
    def has_shift_reference(self) -> bool:
        return all(k in self.tensors for k in shift.KEYS)

    def review_scores(self, probabilities: np.ndarray, features: np.ndarray) -> np.ndarray:
        return self.head.review_scores(probabilities, features)

    def review_flags(self, probabilities: np.ndarray, ood: np.ndarray,
                     thresholds: dict[str, float] | None = None,
                     scores: np.ndarray | None = None) -> np.ndarray:
        return self.head.review_flags(probabilities, ood, thresholds, scores)

    def predict(self, cells: "CellData | DataSource", min_probability: float | None = None,
                max_ood: float | None = None, progress: bool | None = False,
                adapt: str = "none", views: int | None = None) -> Prediction:
        """Every cell of `cells` (loaded cells, or a source: its test split, or its only one, read
        at the backbone's side unless a side was chosen, `EmbedderSpec.reads`): class,
        probabilities, OOD score, review flag (probability below `min_probability` or OOD score
        above `max_ood`; defaults: the head's own). `adapt` 'adabn': the backbone's BatchNorm
        statistics re-estimated on these cells and the AdaBN head applied (`adapted_head`);
        'auto': so only where the batch is unlike the first lab the classifier learned from,
        whose cells set the backbone's statistics (the batch shift check; it always measures the
        cells as the classifier sees them unadapted; a batch like a lab whose labels were added
        with `base` is adapted without a warning). `views`: fewer dihedral views than the
        classifier's, for speed."""
        if isinstance(cells, DataSource):
            from ssl_blood.data import default_split, load_split

            source = self.embedder.spec.reads(cells)
            cells = load_split(source, default_split(source))
        return self.predict_each(cells, (adapt,), min_probability, max_ood, progress, views)[adapt]

    def predict_each(self, cells: CellData, adapts: Sequence[str] = ("none",),
                     min_probability: float | None = None, max_ood: float | None = None,
                     progress: bool | None = False, views: int | None = None) -> dict[str, Prediction]:
        """`predict` under each adaptation of `adapts`, embedding the cells once per feature
        space (as they are, and re-estimated) rather than once per adaptation."""
        from ssl_blood.features.embeddings import ADABN_MIN_CELLS

        wrong = [a for a in adapts if a not in ADAPTATIONS]
        if wrong or not adapts:
            raise UserError(f"`adapt` {', '.join(wrong) or '(none)'}: choose one of "
                            f"{', '.join(ADAPTATIONS)}", param="adapt")
        if set(adapts) - {"none"} and self.adapted_head is None:
            raise UserError("this classifier has no AdaBN head (a backbone without BatchNorm, or "
                            "fewer than 32 cells of the lab to estimate from); train it again on "
                            "the whole folder, or classify without `adapt`", param="adapt")
        if min_probability is not None and not 0 <= min_probability <= 1:  # nan fails too
            raise UserError(f"`min_probability` {min_probability} must be in [0, 1]", param="min_probability")
        if max_ood is not None and not max_ood >= 0:
            raise UserError(f"`max_ood` {max_ood} must be a number >= 0", param="max_ood")
        if not len(cells):
            raise UserError("no cells to classify; give data that holds images", param="image_dir")
        self.embedder.check_images(cells.images, "the images to classify")
        views = self.views if views is None else views
        features = {"none": self.features(cells.images, progress, views)}
        batch_shift = self.shift_check(features["none"], cells.images)
        # auto re-estimates where the backbone's statistics (the first lab's) do not fit the
        # batch, even when labels added from a lab like it keep it from warning
        unlike_first = bool(batch_shift and shift.unlike_first_lab(batch_shift))
        if "path" in cells.metadata:
            names, column = np.asarray(cells.metadata["path"]).astype(str), "path"
        else:
            names, column = cells.ids.numpy(), "id"
        out = {}
        for adapt in adapts:
            applied = "adabn" if adapt == "adabn" or (
                adapt == "auto" and unlike_first and len(cells) >= ADABN_MIN_CELLS) else "none"
            if applied not in features:
                slide = self.embedder.adapted(cells.images, progress)
                features[applied] = slide(cells.images, progress=progress, views=views)
            head = self.adapted_head if applied == "adabn" else self.head
            ood = head.ood_scores(features[applied])
            if applied == "none" and self.members:
                probabilities = self.ensemble_probabilities(cells.images, features["none"], views, progress)
                head = self.ensemble_head
            else:
                probabilities = head.probabilities(features[applied])
            thresholds = {"min_probability": head.thresholds["min_probability"] if min_probability is None else float(min_probability),
                          "max_ood": head.thresholds["max_ood"] if max_ood is None else float(max_ood)}
            scores = head.review_scores(probabilities, features[applied])
            out[adapt] = Prediction(names, column, self.class_names, probabilities, ood,
                                    head.review_flags(probabilities, ood, thresholds, scores), thresholds,
                                    batch_shift, applied, scores, "smoothed" if head.smooths else "top")
        return out

    # -- keeping -----------------------------------------------------------------------

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        out = _check_out(out, overwrite)
        buffer = io.BytesIO()
        torch.save({k: v.contiguous() for k, v in self.tensors.items()}, buffer)
        weights = buffer.getvalue()
        spec = self.embedder.spec
        if self.backbone_file is not None:  # named relative to the folder, which may move
            spec = dataclasses.replace(spec, checkpoint=BACKBONE)
        config = {"format_version": FORMAT_VERSION, "ssl_blood_version": __version__,
                  "class_names": list(self.class_names), "embedder": spec.to_dict(),
                  "temperature": self.temperature, "thresholds": self.thresholds,
                  "views": self.views, "adabn": self.adapted, "review_score": self.review_score,
                  # the head and its thresholds were fitted on features in this precision; bf16
                  # and fp32 features moved 0.4-0.6 % of a slide's calls (quick preset, 120 labels)
                  "precision": self.embedder.feature_precision,
                  "weights_sha256": sha256_bytes(weights)}
        if self.members:
            config["ensemble"] = {**self.ensemble, "members": [
                {"file": MEMBER_FILE.format(i), "sha256": sha256_bytes(m.backbone_file)}
                for i, m in enumerate(self.members)]}
        out.mkdir(parents=True, exist_ok=True)
        if self.backbone_file is not None:
            write_bytes(out / BACKBONE, self.backbone_file)
        for i, member in enumerate(self.members):
            write_bytes(out / MEMBER_FILE.format(i), member.backbone_file)
        write_bytes(out / WEIGHTS, weights)
        write_json(self.card, out / CARD)
        write_text(out / CARD_MD, card_markdown(self.card))
        write_json(config, out / CONFIG)  # last: a folder without it holds no classifier
        return out

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> "Classifier":
        path = Path(path)
        for name in (CONFIG, WEIGHTS, CARD):
            if not (path / name).is_file():
                raise UserError(f"`classifier` {path} has no {name}; give a folder written by "
                                f"ssl-blood train-classifier", param="classifier")
        try:
            config = json.loads((path / CONFIG).read_text())
            version = int(config["format_version"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"`classifier` {path / CONFIG} is damaged ({type(exc).__name__}); "
                            f"train the classifier again", param="classifier") from None
        if version != FORMAT_VERSION:
            newer = "a newer" if version > FORMAT_VERSION else "an older"
            raise UserError(f"`classifier` {path} has format {version}, from {newer} ssl-blood "
                            f"(this one reads format {FORMAT_VERSION}); train it again with this "
                            f"version", param="classifier")
        weights = (path / WEIGHTS).read_bytes()  # read once: the bytes checked are the bytes loaded
        if sha256_bytes(weights) != config.get("weights_sha256"):
            raise UserError(f"`classifier` {path / WEIGHTS} was altered since it was written "
                            f"(SHA-256 differs); train the classifier again", param="classifier")
        tensors = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        spec, backbone_file = EmbedderSpec.from_dict(config["embedder"]), None
        if spec.checkpoint == BACKBONE:  # its own backbone, in the folder
            own = path / BACKBONE
            backbone_file = own.read_bytes() if own.is_file() else b""
            if f"sha256:{sha256_bytes(backbone_file)}" != spec.identity:
                raise UserError(f"`classifier` {own} is missing or was altered since it was "
                                f"written (SHA-256 differs); train the classifier again",
                                param="classifier")
            embedder = Embedder.from_checkpoint(own, device, backbone_file)
        else:
            embedder = Embedder.from_spec(spec, device)
        if config.get("precision"):  # as its features were made, whatever "auto" says today
            embedder = embedder.in_precision(config["precision"])
        ensemble = config.get("ensemble")
        members = _load_members(path, ensemble, tensors, device, config.get("precision"))
        return cls(embedder, config["class_names"], tensors, config["temperature"],
                   config["thresholds"], json.loads((path / CARD).read_text()), backbone_file,
                   int(config.get("views", 1)), config.get("adabn"), config.get("review_score", "top"),
                   members, ensemble)


def _load_members(path: Path, ensemble: dict[str, Any] | None, tensors: dict[str, torch.Tensor],
                  device: str, precision: str | None) -> list[Member]:
    """An ensemble classifier's fold models from its folder, each file checked by SHA-256."""
    members = []
    for i, entry in enumerate((ensemble or {}).get("members", [])):
        file = path / entry["file"]
        data = file.read_bytes() if file.is_file() else b""
        if sha256_bytes(data) != entry["sha256"]:
            raise UserError(f"`classifier` {file} is missing or was altered since it was written "
                            f"(SHA-256 differs); train the classifier again", param="classifier")
        embedder = Embedder.from_checkpoint(file, device, data)
        if precision:
            embedder = embedder.in_precision(precision)
        members.append(Member(embedder, data, LinearHead(tensors, MEMBER_PREFIX.format(i), 1.0, {})))
    return members


# ----------------------------------------------------------------------------- fitting


def _trained_backbone(head: str, embedder: Embedder, cells: CellData, seed: int, cfg: Any,
                      state_path: str | Path | None,
                      progress: bool | None) -> tuple[bytes, Embedder, dict[str, Any], float]:
    """The pretrained backbone trained with the labelled cells of `cells` (head initialised as
    the cross-validated logistic head of the frozen features): 'fixmatch' with the unlabelled
    ones too, 'fine-tune' without them (the same recipe without the unlabelled loss). Returns
    the trained checkpoint's bytes, its embedder, the training report and the frozen head's
    cross-validated accuracy."""
    from torch import nn

    from ssl_blood.classify.consistency import HeadedBackbone, train_consistency
    from ssl_blood.model.checkpoint import backbone_from_checkpoint, backbone_only

    labelled = cells.labelled()
    labels = labelled.labels.numpy()
    ckpt = _pretrained_checkpoint(embedder)
    fit = _cross_validated_logistic(embedder(labelled.images, progress=progress), labels,
                                    len(cells.class_names), seed)
    model = HeadedBackbone(backbone_from_checkpoint(ckpt),
                           nn.Linear(fit["head"].in_features, len(cells.class_names)))
    # calibrated_start: the head divided by the temperature that fits its cross-validated
    # logits, so that a pseudo-label's probability means what the threshold assumes (a
    # logistic head on 40 cells is over-confident: most cells pass 0.95 from the first step)
    temperature = fit_temperature(fit["oof_logits"], labels) if cfg.calibrated_start else 1.0
    with torch.no_grad():  # the standardised head on raw features: w.(x - m)/s + b
        w = fit["head"].weight.detach() / torch.as_tensor(fit["std"]) / temperature
        model.head.weight.copy_(w)
        model.head.bias.copy_(fit["head"].bias.detach() / temperature - w @ torch.as_tensor(fit["mean"]))
    if head == "fine-tune":
        cfg = dataclasses.replace(cfg, unlabelled_weight=0.0)
    ds = ckpt["dataset"]
    rest = cells.subset(np.flatnonzero(cells.labels.numpy() < 0))
    ema, report = train_consistency(model, labelled.images, labels, rest.images, ds["mean"],
                                    ds["std"], int(ds["input_size"]), cfg, embedder.device,
                                    state_path, progress)
    pretrained = {"checkpoint": embedder.spec.checkpoint, "checkpoint_sha256": embedder.identity}
    own = backbone_only(ckpt, ema.backbone.state_dict(), kind=head,
                        note={"head": head, "pretrained": pretrained,
                              "steps": report["steps"], "config": report["config"]})
    data, trained = _own_backbone(own, embedder.device)
    return data, trained, report, float((fit["oof_logits"].argmax(1) == labels).mean())


def _pool_rows(cells: CellData, seed: int) -> np.ndarray:
    """Rows of up to SHIFT_POOL unlabelled cells of `cells` (sorted): a sample of the lab's own
    cells that calibrates the shift check, AdaBN and a trained head's temperature."""
    rest_rows = np.flatnonzero(cells.labels.numpy() < 0)
    return rest_rows[np.sort(np.random.default_rng(seed).permutation(len(rest_rows))[:SHIFT_POOL])]


def _calibration_folds(labels: np.ndarray, requested: int, seed: int) -> np.ndarray | None:
    """Stratified folds (k = `requested`, at most the smallest class's cells) for cross-fitting,
    or None where `requested` is 0 or a class has a single labelled cell (said in a note)."""
    from sklearn.model_selection import StratifiedKFold

    from ssl_blood import ui

    counts = np.bincount(labels)
    k = min(requested, int(counts[counts > 0].min()))
    if requested and k < 2:
        ui.note("a class has a single labelled cell: the trained head's calibration comes from "
                "its own cross-validation (optimistic); label at least 2 cells per class")
    if k < 2:
        return None
    folds = np.zeros(len(labels), dtype=np.int64)
    splitter = StratifiedKFold(k, shuffle=True, random_state=seed)
    for f, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        folds[held] = f
    return folds


def _check_shift_copies(shift_copies: int, head: str) -> None:
    if shift_copies < 0 or (shift_copies and head != "logistic"):
        raise UserError(f"`shift_copies` {shift_copies}: a whole number of copies, for head "
                        f"logistic (the heads that train the backbone augment their own "
                        f"views: `stain`)", param="shift_copies")


def _check_ensemble(ensemble: bool, head: str, calibration_folds: int) -> None:
    if ensemble and (head not in TRAINED_BACKBONE_HEADS or calibration_folds < 2):
        raise UserError(f"`ensemble` keeps the models a trained head's calibration reruns make: "
                        f"give `head` {' or '.join(TRAINED_BACKBONE_HEADS)} with `calibration_folds` "
                        f">= 2 (head {head}, {calibration_folds} folds)", param="ensemble")


def _check_calibration_folds(calibration_folds: int) -> None:
    if calibration_folds < 0:
        raise UserError(f"`calibration_folds` {calibration_folds} must be 0 or more (0: no rerun)",
                        param="calibration_folds")


def fold_state_path(state_path: str | Path, fold: int) -> Path:
    """Where fold `fold`'s rerun of a trained head is kept to resume, beside the main run's."""
    path = Path(state_path)
    return path.with_name(f"{path.stem}.fold{fold}{path.suffix}")


def remove_run_states(state_path: str | Path, calibration_folds: int = CALIBRATION_FOLDS) -> None:
    """Delete a trained head's resume states (its run's and its folds'): once the classifier
    holds their result there is nothing left to resume."""
    for path in [Path(state_path), *(fold_state_path(state_path, f) for f in range(calibration_folds))]:
        path.unlink(missing_ok=True)


def _cross_fitted_logits(head: str, embedder: Embedder, cells: CellData, folds: np.ndarray,
                         seed: int, cfg: Any, state_path: str | Path | None,
                         progress: bool | None, views: int,
                         pool: torch.Tensor | None = None,
                         ) -> tuple[np.ndarray, np.ndarray | None, list[tuple[bytes, Embedder, dict[str, Any]]]]:
    """Held-out logits (N labelled, C) of the whole recipe rerun per fold: the backbone trained
    on the other folds' labels (this fold's cells join the unlabelled ones), then the logistic
    head on those cells' features, scoring this fold's cells; each fold model's logits
    (k, P, C) of the images `pool` (e.g. unlabelled cells of the lab; None without); and the
    fold models themselves (backbone bytes, embedder, logistic fit), for an ensemble."""
    from ssl_blood import ui

    all_labels = cells.labels.numpy()
    rows = np.flatnonzero(all_labels >= 0)
    labels = all_labels[rows]
    k = len(np.unique(folds))
    ui.note(f"calibrating: the training runs again on {k} folds of the labelled cells "
            f"({cfg.steps} steps each), each fold judged by a model that never saw its labels")
    oof = np.zeros((len(rows), len(cells.class_names)), dtype=np.float32)
    pooled, models = [], []
    for f in range(k):
        held = folds == f
        hidden = all_labels.copy()
        hidden[rows[held]] = -1
        fold_state = fold_state_path(state_path, f) if state_path is not None else None
        data, trained, _, _ = _trained_backbone(head, embedder, cells.with_labels(hidden, cells.class_names),
                                                seed, cfg, fold_state, progress)
        known = trained(cells.subset(rows[~held]).images, progress=progress, views=views)
        fit = _cross_validated_logistic(known, labels[~held], len(cells.class_names), seed)
        unseen = trained(cells.subset(rows[held]).images, progress=progress, views=views)
        oof[held] = _fit_logits(fit, unseen)
        if pool is not None:
            pooled.append(_fit_logits(fit, trained(pool, progress=progress, views=views)))
        models.append((data, trained, fit))
    return oof, (np.stack(pooled) if pool is not None else None), models


def _fit_logits(fit: dict[str, Any], features: np.ndarray) -> np.ndarray:
    """Logits of a cross-validated logistic fit (`_cross_validated_logistic`) on raw features."""
    z = torch.as_tensor((features - fit["mean"]) / fit["std"], dtype=torch.float32)
    with torch.no_grad():
        return fit["head"](z).numpy()


def _own_backbone(own: dict[str, Any], device: torch.device) -> tuple[bytes, Embedder]:
    """A classifier's own checkpoint `own` as the bytes saved as BACKBONE and its embedder
    (named BACKBONE, identified by the SHA-256 of those bytes)."""
    from ssl_blood.model.checkpoint import trained_backbone

    buffer = io.BytesIO()
    torch.save(own, buffer)
    data = buffer.getvalue()
    return data, Embedder.from_trained(trained_backbone(own, sha256_bytes(data)), BACKBONE, str(device))


def _pretrained_checkpoint(embedder: Embedder) -> dict[str, Any]:
    """The checkpoint `embedder` was made from, checked to be unchanged."""
    from ssl_blood.model.checkpoint import load_checkpoint

    path = Path(embedder.spec.checkpoint or "")
    if embedder.spec.kind != "checkpoint" or not path.is_file():
        raise UserError("training a backbone or keeping a copy of it needs the pretrained "
                        "checkpoint file (`checkpoint`)", param="checkpoint")
    data = path.read_bytes()  # read once: the bytes checked are the bytes loaded
    if f"sha256:{sha256_bytes(data)}" != embedder.identity:
        raise UserError(f"`checkpoint` {path} changed since it was loaded; give it again",
                        param="checkpoint")
    return load_checkpoint(path, data)


def _check_out(out: str | Path, overwrite: bool) -> Path:
    """A folder a classifier may be written to: writable, not holding one unless `overwrite`."""
    out = check_writable(out, folder=True)
    if (out / CONFIG).exists() and not overwrite:
        raise UserError(f"`out` {out} already holds a classifier; set `overwrite` or choose "
                        f"another folder", param=("out", "overwrite"))
    return out


def _fitted_head(fit: dict[str, Any], features: np.ndarray, labels: np.ndarray,
                 review_rate: float) -> tuple[dict[str, torch.Tensor], dict, dict[str, float], np.ndarray]:
    """A cross-validated fit (`_cross_validated_logistic` / `_propagate`) made into a head:
    its tensors (HEAD_TENSORS), calibration, review thresholds and calibrated out-of-fold
    probabilities. The review threshold sends `review_rate` of the labelled cells (out of fold)
    to review; a cell further from the labelled cells than OOD_QUANTILE of them is out of
    distribution."""
    calibration = calibration_report(fit["oof_logits"], labels, fit["folds"])
    oof = softmax(fit["oof_logits"], calibration["temperature"])
    reference = l2_normalize(features).astype(np.float32)
    own = _nearest_distance(reference, reference, exclude_self=True)
    scale = float(np.median(own)) or 1e-6
    thresholds = {"min_probability": float(np.quantile(oof.max(1), review_rate)) if review_rate else 0.0,
                  "max_ood": float(np.quantile(own / scale, OOD_QUANTILE))}
    tensors = {"weight": fit["head"].weight.detach().float(), "bias": fit["head"].bias.detach().float(),
               "mean": torch.as_tensor(fit["mean"]), "std": torch.as_tensor(fit["std"]),
               "reference": torch.as_tensor(reference), "ood_scale": torch.tensor(scale)}
    return tensors, calibration, thresholds, oof


def _adapted_features(embedder: Embedder, labelled: torch.Tensor, pool: torch.Tensor | None,
                      base: "Classifier | None", views: int,
                      progress: bool | None) -> tuple[np.ndarray, dict[str, torch.Tensor]] | None:
    """The labelled cells' features under BatchNorm statistics re-estimated on the lab's own
    cells (its unlabelled `pool`, else the labelled cells themselves), and those statistics.
    With `base` (labels added), under statistics re-estimated on the added cells' own `pool`
    where it has ADABN_MIN_CELLS cells, else under the statistics `base` kept. None where there
    is nothing to re-estimate (no trained backbone with BatchNorm, too few cells, a base
    without an AdaBN head).

    Why a head of its own for AdaBN: pretraining's statistics come from augmented views, so
    re-estimating them on any cells, even the lab's own clean ones, moves every feature
    (measured on the quick checkpoint: a head fitted under pretraining's statistics fell from
    79.0 to 66.9 % on clean val cells). A head fitted under statistics of the lab's own cells
    meets a new slide's re-estimated features in the space it was fitted in (77.4 % clean, and
    under shifts at severity 3, 73.3 % on average against 71.2 % unadapted; BloodMNIST val)."""
    from ssl_blood.features.embeddings import ADABN_MIN_CELLS

    has_pool = pool is not None and len(pool) >= ADABN_MIN_CELLS
    if base is not None:
        kept = {k[len(SOURCE_BATCHNORM):]: v for k, v in base.tensors.items() if k.startswith(SOURCE_BATCHNORM)}
        if not kept or base.adapted is None:
            return None
        if not has_pool:
            source = base.embedder.with_batchnorm(kept)
            return source(labelled, progress=progress, views=views), kept
        # Why the added cells' own statistics: predict --adapt adabn normalises each slide by its
        # own, so a new lab's labelled cells must sit where its re-estimated slides will (on
        # BloodMNIST, 10-40 labels from a stain / JPEG / defocus-shifted lab: +0.8 points on
        # average with --adapt adabn, -0.6 to +3.3; docs/robustness.md, "A new lab's own labels").
    cells = pool if has_pool else labelled
    if embedder.trained is None or len(cells) < ADABN_MIN_CELLS:
        return None
    try:
        source = embedder.adapted(cells, progress)
    except UserError:  # no BatchNorm to re-estimate
        return None
    return source(labelled, progress=progress, views=views), source.batchnorm_statistics()


def _adapted_head(tensors: dict[str, torch.Tensor], adapted: tuple[np.ndarray, dict[str, torch.Tensor]],
                  labels: np.ndarray, base: "Classifier | None", seed: int, review_rate: float,
                  class_names: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The AdaBN head (a cross-validated logistic head on the `adapted` features of every
    labelled cell, `base`'s included), put into `tensors` under ADAPTED with the statistics it
    was fitted under (SOURCE_BATCHNORM); returns its config (temperature, thresholds) and its
    card entry."""
    features, statistics = adapted
    if base is not None:
        features = np.concatenate([base.tensors[ADAPTED + "features"].numpy(), features])
    fit = _cross_validated_logistic(features, labels, len(class_names), seed)
    head, calibration, thresholds, oof = _fitted_head(fit, features, labels, review_rate)
    tensors.update({ADAPTED + k: v for k, v in head.items()})
    tensors[ADAPTED + "features"] = torch.as_tensor(np.asarray(features, dtype=np.float32))
    tensors.update({SOURCE_BATCHNORM + k: v for k, v in statistics.items()})
    card = {"cross_validation": {"weight_decay": fit["weight_decay"], **cv_metrics(labels, oof, class_names)},
            "calibration": calibration, "thresholds": thresholds,
            "note": "used by predict --adapt adabn (and auto, where the shift check warns): the "
                    "backbone's BatchNorm statistics re-estimated on the slide, this head fitted "
                    "under statistics re-estimated on the lab's own cells"}
    return {"temperature": calibration["temperature"], "thresholds": thresholds}, card


def _check_class_counts(labels: np.ndarray, class_names: Sequence[str]) -> None:
    if len(labels) == 0:
        raise UserError("no labelled cells; give labels (`labels`) for some cells", param="labels")
    present = np.flatnonzero(np.bincount(labels, minlength=len(class_names)))
    if len(present) < 2:
        raise UserError(f"the labels name one class ({class_names[present[0]]}); a "
                        f"classifier needs cells of at least 2 classes", param="labels")


def _folds(labels: np.ndarray, seed: int) -> tuple[np.ndarray, int]:
    """Stratified k-fold (k = min(5, smallest class)); with a class of a single cell, plain
    k-fold, said in a note: that cell is then judged by a head that never saw its class."""
    from sklearn.model_selection import KFold, StratifiedKFold

    from ssl_blood import ui

    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min())
    if smallest >= 2:
        k = min(MAX_FOLDS, smallest)
        splitter = StratifiedKFold(k, shuffle=True, random_state=seed)
    else:
        k = min(MAX_FOLDS, len(labels))
        splitter = KFold(k, shuffle=True, random_state=seed)
        ui.note(f"{int((counts == 1).sum())} class(es) have a single labelled cell: cross-validated "
                f"numbers count it as a miss; label at least 2 cells per class")
    folds = np.zeros(len(labels), dtype=np.int64)
    for f, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        folds[held] = f
    return folds, k


def cv_log_loss(oof_logits: np.ndarray, labels: np.ndarray) -> float:
    """What the head's settings are chosen by: the log loss of the out-of-fold probabilities,
    the proper scoring rule of a probabilistic classifier. Measured on BloodMNIST val (quick
    features, 8 views, 40-400 labels, typiclust and random): against choosing by accuracy, the
    same accuracy on average (-0.7 to +1.6 points) and ECE 0.022-0.104 instead of 0.035-0.167
    (accuracy picked weak penalties whose heads were over-confident)."""
    return negative_log_likelihood(softmax(oof_logits), labels)


def chosen_weight_decay(log_loss: dict[float, float]) -> float:
    """The weight decay whose cross-validated log loss (`cv_log_loss`) is smallest; ties: the
    stronger penalty. (experiments/weight_decay_rule.py found no rule that calibrates better.)"""
    return min(log_loss, key=lambda wd: (log_loss[wd], -wd))


def _added_copies(base: "Classifier", known: int,
                  copies: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The shifted copies of a classifier's labelled cells followed by those of the cells added
    to them (rows after its `known` cells)."""
    if COPY_FEATURES not in base.tensors:
        return copies
    kept = (base.tensors[COPY_FEATURES].float().numpy(), base.tensors[COPY_ORIGIN].numpy())
    if copies is None:
        return kept
    return np.concatenate([kept[0], copies[0]]), np.concatenate([kept[1], copies[1] + known])


def _cross_validated_logistic(features: np.ndarray, labels: np.ndarray, num_classes: int,
                              seed: int, copies: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Weight decay by k-fold CV log loss (`_folds`, `cv_log_loss`); the head is then fitted on
    all cells. Out-of-fold logits of the chosen setting feed calibration. `copies`: features of
    shifted copies of the labelled cells and each one's row (`shifted_copies`), learned from
    with their cell's label; a fold trains on the copies of its training cells only."""
    from ssl_blood.evaluation.frozen import PROBE_WEIGHT_DECAYS, fit_logistic

    def training_set(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if copies is None:
            return features[rows], labels[rows]
        copy_features, origin = copies
        kept = np.isin(origin, rows)
        return (np.concatenate([features[rows], copy_features[kept]]),
                np.concatenate([labels[rows], labels[origin[kept]]]))

    folds, k = _folds(labels, seed)
    oof = _cv_logits(training_set, features, labels, folds, k, num_classes)
    accuracy = {wd: float((oof[wd].argmax(1) == labels).mean()) for wd in PROBE_WEIGHT_DECAYS}
    loss = {wd: cv_log_loss(oof[wd], labels) for wd in PROBE_WEIGHT_DECAYS}
    best = chosen_weight_decay(loss)
    x, y = training_set(np.arange(len(labels)))
    mean, std = x.mean(0), x.std(0) + 1e-6
    head = fit_logistic(torch.as_tensor((x - mean) / std), torch.as_tensor(y), num_classes, best)
    return {"head": head, "mean": mean.astype(np.float32), "std": std.astype(np.float32),
            "weight_decay": best, "accuracy_by_weight_decay": accuracy, "log_loss_by_weight_decay": loss,
            "folds": folds,
            "oof_logits": oof[best], "k": k}


def _cross_validated_propagate(features: np.ndarray, labels: np.ndarray, unlabelled: np.ndarray,
                               num_classes: int, seed: int) -> dict[str, Any]:
    """The logistic head on the labelled cells plus pseudo-labels spread over the kNN graph of
    labelled + unlabelled cells (propagation.py). Every setting by k-fold CV on the labelled
    cells, a fold's held-out cells never seeding the spread nor taking a pseudo-label: first the
    graph's k and alpha (accuracy of the spread labels on the held-out cells), then how many
    pseudo-labels per labelled cell (0, the plain logistic head, included) with the weight decay
    (the head's log loss, `cv_log_loss`). Returns what `_cross_validated_logistic` returns, plus the choices."""
    from ssl_blood.classify.propagation import (ALPHAS, GRAPH_KS, affinity, neighbour_table,
                                                pseudo_labels, spread)

    n_lab = len(labels)
    everything = np.concatenate([features, unlabelled]).astype(np.float32)
    similarity, position = neighbour_table(everything, max(GRAPH_KS))
    graphs = {k: affinity(similarity, position, k) for k in GRAPH_KS}
    folds, k_folds = _folds(labels, seed)
    spread_accuracy = {}
    for k in GRAPH_KS:
        for alpha in ALPHAS:
            hits = 0
            for f in range(k_folds):
                seeds = np.flatnonzero(folds != f)
                scores = spread(graphs[k], seeds, labels[seeds], num_classes, alpha)
                hits += int((scores[:n_lab][folds == f].argmax(1) == labels[folds == f]).sum())
            spread_accuracy[(k, alpha)] = hits / n_lab
    graph_k, alpha = max(spread_accuracy, key=lambda s: (spread_accuracy[s], -s[0], -s[1]))
    graph = graphs[graph_k]
    candidates = np.arange(n_lab, len(everything))

    def augmented(seed_rows: np.ndarray, ratio: int) -> tuple[np.ndarray, np.ndarray]:
        if ratio == 0:
            return features[seed_rows], labels[seed_rows]
        scores = spread(graph, seed_rows, labels[seed_rows], num_classes, alpha)
        per_class = ratio * np.bincount(labels[seed_rows], minlength=num_classes)
        rows, pseudo = pseudo_labels(scores, candidates, per_class)
        return np.concatenate([features[seed_rows], everything[rows]]), np.concatenate([labels[seed_rows], pseudo])

    results = {r: _cv_logits(lambda train_rows, r=r: augmented(train_rows, r), features, labels,
                             folds, k_folds, num_classes) for r in PSEUDO_PER_LABEL}
    accuracy = {(r, wd): float((oof.argmax(1) == labels).mean())
                for r, by_wd in results.items() for wd, oof in by_wd.items()}
    loss = {(r, wd): cv_log_loss(oof, labels) for r, by_wd in results.items() for wd, oof in by_wd.items()}
    ratio, best = min(loss, key=lambda s: (loss[s], s[0], -s[1]))  # ties: fewer pseudo, stronger penalty
    x, y = augmented(np.arange(n_lab), ratio)
    mean, std = x.mean(0), x.std(0) + 1e-6
    from ssl_blood.evaluation.frozen import fit_logistic

    head = fit_logistic(torch.as_tensor((x - mean) / std), torch.as_tensor(y), num_classes, best)
    return {"head": head, "mean": mean.astype(np.float32), "std": std.astype(np.float32),
            "weight_decay": best, "folds": folds, "oof_logits": results[ratio][best], "k": k_folds,
            "accuracy_by_weight_decay": {wd: accuracy[(ratio, wd)] for wd in results[ratio]},
            "propagation": {"graph_k": graph_k, "alpha": alpha, "pseudo_per_label": ratio,
                            "pseudo_labels": int(len(y) - n_lab), "unlabelled_cells": int(len(unlabelled)),
                            "spread_cv_accuracy": {f"k{k}-alpha{a}": v for (k, a), v in spread_accuracy.items()},
                            "head_cv_accuracy_by_pseudo_per_label":
                                {str(r): max(accuracy[(r, wd)] for wd in results[r]) for r in results},
                            "head_cv_log_loss_by_pseudo_per_label":
                                {str(r): min(loss[(r, wd)] for wd in results[r]) for r in results}}}


def _cv_logits(training_set, features: np.ndarray, labels: np.ndarray, folds: np.ndarray, k: int,
               num_classes: int, weight_decays: Sequence[float] | None = None) -> dict[float, np.ndarray]:
    """Out-of-fold logits per weight decay (`weight_decays`, else PROBE_WEIGHT_DECAYS) of a
    logistic head fitted on `training_set(rows)` (the fold's training rows, plus whatever it
    adds) and scored on the held-out rows."""
    from ssl_blood.evaluation.frozen import PROBE_WEIGHT_DECAYS, fit_logistic

    weight_decays = PROBE_WEIGHT_DECAYS if weight_decays is None else weight_decays
    oof = {wd: np.zeros((len(labels), num_classes), np.float32) for wd in weight_decays}
    for f in range(k):
        x, y = training_set(np.flatnonzero(folds != f))
        mean, std = x.mean(0), x.std(0) + 1e-6
        xt = torch.as_tensor((x - mean) / std)
        held = torch.as_tensor((features[folds == f] - mean) / std)
        previous = None
        for wd in sorted(weight_decays, reverse=True):  # strong to weak, warm-started
            previous = fit_logistic(xt, torch.as_tensor(y), num_classes, wd, start=previous)
            with torch.no_grad():
                oof[wd][folds == f] = previous(held).numpy()
    return oof


def _nearest_distance(queries: np.ndarray, reference: np.ndarray,
                      exclude_self: bool = False) -> np.ndarray:
    """Cosine distance (1 - similarity) of each query to its nearest reference row, through the
    neighbour service (which owns "a cell is not its own neighbour")."""
    from ssl_blood.features.index import CellIndex
    from ssl_blood.features.neighbours import neighbours

    index = CellIndex.build(reference, kind="flat", use_gpu=False)
    similarity, _ = neighbours(index, queries, 1, np.arange(len(queries)) if exclude_self else None)
    return np.clip(1 - similarity[:, 0], 0, None)

def cv_metrics(labels: np.ndarray, oof: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy (95 % Wilson interval), balanced accuracy and per-class recall of out-of-fold
    scores `oof` (N, C)."""
    from sklearn.metrics import balanced_accuracy_score, recall_score

    predicted = oof.argmax(1)
    correct = predicted == labels
    low, high = wilson_interval(int(correct.sum()), len(labels))
    recall = recall_score(labels, predicted, average=None, labels=range(len(class_names)), zero_division=0)
    return {"accuracy": float(correct.mean()), "accuracy_ci95": [low, high],
            "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
            "recall": {n: float(r) for n, r in zip(class_names, recall)}}


def _own_labelled_features(checkpoint: str | Path, labels: str | Path, source: Any, split: str | None,
                           device: str, progress: bool | None) -> tuple[CellData, np.ndarray, dict[str, Any]]:
    """A person's labelled cells (`labels` applied to `split` of `source`, default the
    checkpoint's data), their frozen features and what the report says about where they came
    from."""
    from ssl_blood.classify.labels import apply_labels, read_labels
    from ssl_blood.data import default_split, load_split

    table = read_labels(labels)
    embedder = Embedder.from_checkpoint(checkpoint, device)
    source = embedder.spec.reads(source)
    cells = apply_labels(load_split(source, split or default_split(source, "train")), table).labelled()
    y = cells.labels.numpy()
    _check_class_counts(y, cells.class_names)
    embedder.check_images(cells.images, "the labelled images")
    about = {"checkpoint": str(checkpoint), "labels_file": {"path": table.path, "sha256": table.sha256},
             "data": source.to_dict(), "split": cells.split,
             "labels_per_class": {n: int((y == c).sum()) for c, n in enumerate(cells.class_names)}}
    return cells, embedder(cells.images, progress=progress), about


def cross_validated_probe(checkpoint: str | Path, labels: str | Path, source: Any = None,
                          split: str | None = None, seed: int = 0, device: str = "auto",
                          progress: bool | None = False) -> dict[str, Any]:
    """`ssl-blood linear-probe --labels`: how well a logistic head on the checkpoint's frozen
    features separates a person's labelled cells, by stratified k-fold cross-validation on
    them (they are all training labels: no split of them is held out for good)."""
    cells, features, about = _own_labelled_features(checkpoint, labels, source, split, device, progress)
    y = cells.labels.numpy()
    fit = _cross_validated_logistic(features, y, len(cells.class_names), seed)
    return {"protocol": f"{fit['k']}-fold stratified cross-validation on the labelled cells",
            **about, "weight_decay": fit["weight_decay"],
            **cv_metrics(y, fit["oof_logits"], cells.class_names)}


def cross_validated_few_shot(checkpoint: str | Path, labels: str | Path, source: Any = None,
                             split: str | None = None, heads: Sequence[str] | None = None,
                             seed: int = 0, device: str = "auto",
                             progress: bool | None = False) -> dict[str, Any]:
    """`ssl-blood few-shot --labels`: the few-shot heads (prototype, kNN, logistic regression;
    evaluation.frozen) on a person's labelled cells, each scored by the same stratified k-fold
    cross-validation on them; `head` is the best by accuracy (its figure is slightly
    optimistic: the choice saw the same folds)."""
    from ssl_blood.evaluation.frozen import FEW_SHOT_HEADS, FEW_SHOT_PREDICTORS

    heads = list(FEW_SHOT_HEADS if heads is None else heads)
    unknown = [h for h in heads if h not in FEW_SHOT_PREDICTORS] or ([] if heads else ["(none)"])
    if unknown:
        raise UserError(f"unknown few-shot `heads` entry '{unknown[0]}'; choose from "
                        f"{', '.join(FEW_SHOT_PREDICTORS)}", param="heads")
    cells, features, about = _own_labelled_features(checkpoint, labels, source, split, device, progress)
    y, num_classes = cells.labels.numpy(), len(cells.class_names)
    folds, k = _folds(y, seed)
    results = {}
    for head in heads:
        oof = np.zeros((len(y), num_classes), dtype=np.float32)
        for fold in range(k):
            held, kept = folds == fold, folds != fold
            # the heads take classes 0..C-1, each with cells: a class absent from this fold's
            # training cells (or from the labels) is left out, not given an empty prototype
            present, support = np.unique(y[kept], return_inverse=True)
            predicted = FEW_SHOT_PREDICTORS[head](features[kept], support, [features[held]], len(present))[0]
            oof[np.flatnonzero(held), present[predicted]] = 1  # one-hot: these heads give classes
        results[head] = cv_metrics(y, oof, cells.class_names)
    best = max(heads, key=lambda h: results[h]["accuracy"])
    return {"protocol": f"{k}-fold stratified cross-validation on the labelled cells", **about,
            "head": best, "heads": results}


def _card(embedder: Embedder, cells: CellData, labels: np.ndarray, fit: dict, calibration: dict,
          oof: np.ndarray, thresholds: dict, review_rate: float, labels_file: dict | None,
          head: str, scores: np.ndarray) -> dict:
    """The model card (card.json); `scores`: the labelled cells' review scores, out of fold."""
    correct = oof.argmax(1) == labels
    accepted = scores >= thresholds["min_probability"]
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"ssl_blood": __version__, "torch": torch.__version__},
        "head": head, "classes": list(cells.class_names),
        "labels_per_class": {n: int((labels == c).sum()) for c, n in enumerate(cells.class_names)},
        "labels_file": labels_file, "labelled_from": cells.source.to_dict(),
        "pretrained_on": embedder.spec.source, "checkpoint": embedder.spec.checkpoint,
        "checkpoint_sha256": embedder.spec.identity,
        "cross_validation": {"folds": fit["k"], "weight_decay": fit["weight_decay"],
                             **cv_metrics(labels, oof, cells.class_names),
                             "accepted_accuracy": float(correct[accepted].mean()) if accepted.any() else None,
                             "review_rate": float(1 - accepted.mean())},
        "calibration": calibration, "thresholds": thresholds, "review_rate_target": review_rate,
    }


def _chosen_review_score(head: LinearHead, asked: str, oof: np.ndarray, labels: np.ndarray,
                         features: np.ndarray, review_rate: float) -> tuple[str, dict[str, float] | None]:
    """The review score `asked` for (REVIEW_SCORES) as `head` (score "smoothed") can give it:
    "top" without a kept pool; for "auto", "smoothed" where sending `review_rate` (at least
    DEFAULT_REVIEW_RATE) of the labelled cells to review by it leaves their out-of-fold calls
    (`oof`, calibrated) more accurate than by the top probability. Returns the score and, for
    "auto", the accepted accuracy of each."""
    if asked == "top" or POOL_LOGITS not in head.tensors:
        return "top", None
    if asked == "smoothed":
        return "smoothed", None
    correct = oof.argmax(1) == labels
    rate = max(review_rate, DEFAULT_REVIEW_RATE)
    compared = {name: review_at_rate(scores, correct, rate)["accepted_accuracy"] for name, scores in
                (("top", oof.max(1)), ("smoothed", head.review_scores(oof, features)))}
    return ("smoothed" if compared["smoothed"] > compared["top"] else "top"), compared


def review_at_rate(scores: np.ndarray, correct: np.ndarray, rate: float) -> dict[str, float]:
    """Send the `rate` cells of lowest score (least sure) to review: the accuracy of the cells
    left (0 when none is) and the error enrichment (error rate of the flagged cells over that of
    the accepted ones). How a review score is judged, here and in the experiments."""
    order = np.argsort(scores, kind="stable")
    flagged = np.zeros(len(correct), bool)
    flagged[order[:int(round(rate * len(correct)))]] = True
    if flagged.all():
        return {"accepted_accuracy": 0.0, "error_enrichment": float("nan")}
    err_flagged, err_accepted = 1 - correct[flagged].mean(), 1 - correct[~flagged].mean()
    return {"accepted_accuracy": float(correct[~flagged].mean()),
            "error_enrichment": float(err_flagged / max(err_accepted, 1e-9))}


def _review_score_card(head: LinearHead, pool: int, asked: str,
                       compared: dict[str, float] | None = None) -> dict[str, Any]:
    """The card's account of what cells are sent to review by, why, and where its threshold
    came from."""
    chosen = {"asked": asked, **({"cv_accepted_accuracy": compared,
                                  "chosen_by": "cross-validation on the labelled cells"} if compared else {})}
    if head.smooths:
        return {"score": "smoothed", "neighbours": REVIEW_NEIGHBOURS, "pool_cells": pool, **chosen,
                "meaning": f"the call's probability averaged over the cell and its {REVIEW_NEIGHBOURS} "
                           f"nearest of {pool} unlabelled cells of the lab",
                "threshold": "sends review_rate_target of those unlabelled cells to review"}
    why = ("asked for" if asked == "top" else "no unlabelled cells to lean on" if not pool else
           "cross-validation on the labelled cells preferred it")
    return {"score": "top", **chosen, "meaning": f"the calibrated top probability ({why})",
            "threshold": "sends review_rate_target of the labelled cells (out of fold) to review"}


def _review_score_lines(card: dict) -> list[str]:
    review = card.get("review_score")
    if not review:
        return []
    # card.json names the rate by its key; the page gives its value
    threshold = review["threshold"].replace("review_rate_target", f"{card.get('review_rate_target', 0):.0%}")
    return [f"Cells go to review when {review['meaning']} is below "
            f"{card['thresholds']['min_probability']:.2f} (the threshold {threshold}), or when "
            f"they are out of distribution.", ""]


def _temperature_verdict(calibration: dict) -> str:
    """Why the card's temperature is used or not, in the words of `calibration_report`'s rule."""
    if calibration.get("method"):
        return (f"{calibration['method']}; the held-out cells alone gave "
                f"{calibration['held_out_temperature']:.2f}")
    if calibration.get("cross_fitted"):
        return "kept: the held-out cells showed an over-confident head" if calibration["kept"] else \
            "not used: the held-out cells showed no over-confidence"
    return "kept: it helped" if calibration["kept"] else "not used: it did not help"


def card_markdown(card: dict) -> str:
    cv, cal = card["cross_validation"], card["calibration"]
    lines = [f"# Classifier: {len(card['classes'])} classes, {sum(card['labels_per_class'].values())} labelled cells",
             "", f"Created {card['created']} with ssl-blood {card['versions']['ssl_blood']}; "
             f"backbone {card['checkpoint']} ({card['checkpoint_sha256']}).", "",
             f"Cross-validated ({cv['folds']}-fold) accuracy on the labelled cells: "
             f"{cv['accuracy']:.1%} (95 % CI {cv['accuracy_ci95'][0]:.1%}-{cv['accuracy_ci95'][1]:.1%}); "
             f"{cv['review_rate']:.0%} sent to review, accepted cells {cv['accepted_accuracy'] or 0:.1%} right.", "",
             *_review_score_lines(card),
             f"Calibration ({'cross-fitted' if cal.get('cross_fitted') else 'cross-validated'}): "
             f"ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f}, "
             f"NLL {cal['nll_before']:.3f} -> {cal['nll_after']:.3f}; temperature {cal['temperature']:.2f} "
             f"({_temperature_verdict(cal)}).", ""]
    if "consistency" in card:
        run = card["consistency"]
        how = "consistency-trained with the unlabelled cells" if card["head"] == "fixmatch" else \
            "trained on the labelled cells"
        shifted = run.get("config", {}).get("shift_augment", 0)
        if shifted:
            how += f" ({shifted:.0%} of their views under a random stain or scanner shift)"
        lines += [f"Head {card['head']}: the backbone was {how} for {run['steps']} steps "
                  f"({run['seconds'] / 60:.1f} min); the frozen features' head "
                  f"cross-validated at {run['frozen_head_cv_accuracy']:.1%}. "
                  + ("The figures above are cross-fitted: the training ran again on "
                     f"{cv['folds']} folds, each fold judged by a model that never saw its labels."
                     if cv.get("cross_fitted") else
                     "The backbone learned from these labels, so the figures above are optimistic."), ""]
    if "ensemble" in card:
        ensemble = card["ensemble"]
        lines += [f"Ensemble of {ensemble['models']} models (review below "
                  f"{ensemble['thresholds']['min_probability']:.2f}): {ensemble['note']}.", ""]
    if "shift_copies" in card:
        sc = card["shift_copies"]
        lines += [f"The head also learned from {sc['per_cell']} shifted copies of each labelled cell "
                  f"({sc['copies']} in all: {', '.join(sc['shifts'])}, severity {sc['severities']}).", ""]
    if "adabn" in card:
        adabn = card["adabn"]["cross_validation"]
        lines += [f"Features averaged over {card.get('views', 1)} dihedral view(s) per cell. For "
                  f"slides from another stain or scanner (predict --adapt adabn / auto), a second "
                  f"head on features with BatchNorm re-estimated on the lab's own cells: "
                  f"cross-validated accuracy {adabn['accuracy']:.1%}.", ""]
    if "added_to" in card:
        added, labs = card["added_to"], card.get("shift_check", {}).get("known_labs", 1)
        lines += [f"{added['added_labels']} labels added to a classifier of {added['classifier_labels']} "
                  f"(train-classifier --from); slides like any of the {labs} labs it learned from do not "
                  f"warn, and predict --adapt auto re-estimates BatchNorm for slides unlike the first.", ""]
    recall = cv.get("recall", {})
    lines += ["| class | labelled cells | cross-validated recall |", "|---|---|---|"]
    lines += [f"| {name.replace('|', '/')} | {n} | "
              f"{format(recall[name], '.0%') if name in recall else 'n/a'} |"
              for name, n in card["labels_per_class"].items()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the two commands


def train_classifier(checkpoint: str | Path | None, out: str | Path, source: Any = None,
                     labels: str | Path | None = None, split: str | None = None,
                     fraction: float | None = None, shots: int | None = None,
                     head: str = "logistic", seed: int = 0,
                     review_rate: float = DEFAULT_REVIEW_RATE, device: str = "auto",
                     overwrite: bool = False, progress: bool | None = False,
                     from_classifier: str | Path | None = None, minutes: float | None = None,
                     steps: int | None = None, self_contained: bool = False,
                     stain: float = 0.0, views: int | None = None,
                     calibration_folds: int = CALIBRATION_FOLDS,
                     review_score: str = DEFAULT_REVIEW_SCORE, shift_copies: int = 0,
                     ensemble: bool = False, shift_augment: float = 0.0) -> Classifier:
    """`ssl-blood train-classifier`: the labelled cells of `split` (default train, or the only
    split) of `source` (default: the checkpoint's data), labelled by the `labels` CSV (overriding
    the source's labels) or by the source itself (optionally a `fraction` / `shots` subset),
    a classifier trained on them and saved to `out`. With `from_classifier` (instead of
    `checkpoint`), these labels are added to that classifier's: same backbone, same classes.
    Heads 'fixmatch' and 'fine-tune' train the backbone for `steps` or `minutes` (resumable: its
    state is kept in `out` until the classifier is written); `self_contained` copies the backbone
    into `out`. `views`: dihedral views averaged per cell (default DEFAULT_VIEWS; an added-to
    classifier keeps its own). `review_score`: what sends a cell to review (REVIEW_SCORES).
    `shift_copies`, `ensemble`: see `Classifier.train` (an added-to classifier keeps its
    copies, and refuses others). `stain`, `shift_augment`: see `ConsistencyConfig`."""
    from ssl_blood.classify.labels import apply_labels, read_labels
    from ssl_blood.data import default_split, load_split

    out = _check_out(out, overwrite)  # before minutes of embedding
    if (checkpoint is None) == (from_classifier is None):
        raise UserError("give `checkpoint` (a new classifier) or `from_classifier` (add labels to "
                        "one), one of them", param=("checkpoint", "from_classifier"))
    if labels is not None and (fraction is not None or shots is not None):
        raise UserError("give `labels` or `fraction` / `shots`, not both", param="labels")
    _check_calibration_folds(calibration_folds)  # before minutes of embedding
    _check_shift_copies(shift_copies, head)
    _check_ensemble(ensemble, head, calibration_folds)
    if (minutes is not None or steps is not None or stain) and head not in TRAINED_BACKBONE_HEADS:
        raise UserError("`minutes`, `steps` and `stain` set the training of heads fixmatch and "
                        "fine-tune; the other heads take seconds", param=("minutes", "head"))
    if shift_augment and head != "fixmatch":
        raise UserError("`shift_augment` shifts the unlabelled cells' training views, which only head "
                        "fixmatch learns from; give `head` fixmatch", param=("shift_augment", "head"))
    from ssl_blood.model.inference import VIEWS

    if views is not None and views not in VIEWS:
        raise UserError(f"`views` {views} must be one of {', '.join(map(str, VIEWS))}", param="views")
    table = read_labels(labels) if labels is not None else None
    base = Classifier.load(from_classifier, device) if from_classifier is not None else None
    if base is not None and views not in (None, base.views):
        raise UserError(f"the classifier labels are added to averages {base.views} views per cell; "
                        f"its views stay (leave `views` out)", param="views")
    if base is not None and shift_copies not in (0, base.shift_copies):
        raise UserError(f"the classifier labels are added to learned from {base.shift_copies} shifted "
                        f"copies per cell; its copies stay (leave `shift_copies` out)", param="shift_copies")
    embedder = base.embedder if base is not None else Embedder.from_checkpoint(checkpoint, device)
    source = embedder.spec.reads(source)
    cells = load_split(source, split or default_split(source, "train"))
    if table is not None:
        cells = apply_labels(cells, table, base.class_names if base is not None else None)
    elif fraction is not None or shots is not None:
        from ssl_blood.evaluation.supervised import labelled_subset

        rows = labelled_subset(cells.labels.numpy(), cells.num_classes, seed, fraction, shots)
        cells = cells.labelled_only_at(rows)  # the other cells stay, unlabelled
    labels_file = {"path": table.path, "sha256": table.sha256} if table is not None else None
    consistency = state_path = None
    if head in TRAINED_BACKBONE_HEADS:
        from ssl_blood.classify.consistency import ConsistencyConfig

        consistency = ConsistencyConfig(seed=seed, minutes=minutes, stain=stain, shift_augment=shift_augment,
                                        **({"steps": steps} if steps is not None else {}))
        consistency.check()  # before minutes of embedding
        state_path = out / CONSISTENCY_STATE
    classifier = Classifier.train(embedder, cells, head, seed, review_rate, labels_file, progress,
                                  base, consistency, state_path, views or DEFAULT_VIEWS,
                                  calibration_folds, review_score, shift_copies, ensemble)
    if self_contained:
        classifier.own_backbone()
    classifier.save(out, overwrite)
    if state_path is not None:
        remove_run_states(state_path, calibration_folds)
    return classifier


def predict_cells(classifier: str | Path, source: Any, out: str | Path, split: str | None = None,
                  min_probability: float | None = None, max_ood: float | None = None,
                  device: str = "auto", overwrite: bool = False,
                  progress: bool | None = False, adapt: str = "none",
                  views: int | None = None) -> tuple[Prediction, dict[str, Any]]:
    """`ssl-blood predict`: one CSV row per cell of `split` (default: test, or the only split)
    of `source`, and beside it (OUT.counts.json) the differential count; returns both."""
    from ssl_blood.data import default_split, load_split
    from ssl_blood.files import refuse_existing

    out = check_writable(refuse_existing(out, overwrite), folder=False)
    counts_path = out.with_suffix(".counts.json")
    refuse_existing(counts_path, overwrite)
    model = Classifier.load(classifier, device)
    if source is None:
        raise UserError("give the cells to classify (`image_dir`, `manifest` or `npz`)",
                        param="image_dir")
    source = model.embedder.spec.reads(source)
    cells = load_split(source, split or default_split(source))
    prediction = model.predict(cells, min_probability, max_ood, progress, adapt, views)
    batch_shift = prediction.shift
    if batch_shift and batch_shift["shift_warning"]:
        from ssl_blood import ui

        moved = " and ".join(v.replace("_", " ") for v, r in batch_shift["shift_views"].items()
                             if r["statistic"] > r["threshold"])
        done = ("BatchNorm was re-estimated on them (AdaBN); review more of them"
                if prediction.adapted == "adabn" else "Review more of them, try --adapt auto")
        ui.note(f"these {len(cells)} cells look unlike the cells the classifier knows (their {moved} "
                f"moved: shift score {batch_shift['shift_score']:.2f}, clean batches stay below "
                f"{batch_shift['shift_threshold']:.2f}): "
                f"another stain, scanner or focus (or a class mix far from the training lab's)? "
                f"{done}, or add labels from this slide with ssl-blood train-classifier --from")
    elif batch_shift and prediction.adapted == "adabn" and batch_shift.get("shift_nearest_lab", 0) > 0:
        from ssl_blood import ui

        ui.note(f"these {len(cells)} cells look like those of a lab whose labels were added "
                f"(train-classifier --from), not the first lab's: BatchNorm was re-estimated on "
                f"them (AdaBN), as for that lab's labelled cells")
    counts = {"classifier": str(classifier), "data": source.to_dict(), "split": cells.split,
              "adapt": adapt, "views": model.views if views is None else views,
              "models": 1 + len(model.members),  # an ensemble's, averaged (adapt: the trained one alone)
              **prediction.differential()}
    prediction.to_csv(out)
    write_json(counts, counts_path)
    return prediction, counts

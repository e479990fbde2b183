"""`ssl-blood robustness`: a classifier on labelled cells under stain, scanner and imaging shifts,
severity by severity, with and without adaptation (AdaBN), as the table a lab reads before it
trusts the classifier on another microscope.

Per corruption x severity x adaptation: accuracy, balanced accuracy, recall of every class, ECE,
the share of cells sent to review and whether predict's batch shift check fires (the whole set
is one batch). The shifts are ssl-blood's own (`data.shifts`: stain colour, blur, resampling,
brightness); MedMNIST-C's BloodMNIST corruptions join them when `medmnistc` (with Wand and
ImageMagick) is installed. Writes OUT/robustness.csv, OUT/robustness.json and
OUT/robustness.png (accuracy heat map, corruption x severity, one panel per adaptation).
"""

from __future__ import annotations

import csv
import functools
import io
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ssl_blood import ui
from ssl_blood.analysis.plots import robustness_heat_map_png
from ssl_blood.classify.calibration import expected_calibration_error
from ssl_blood.classify.classifier import ADAPTATIONS, Classifier
from ssl_blood.data.cells import CellData
from ssl_blood.data.shifts import SEVERITIES, SHIFTS
from ssl_blood.errors import UserError
from ssl_blood.files import check_writable, write_json, write_text

FILES = ("robustness.csv", "robustness.json", "robustness.png")
REPORTED_SEVERITY = 3  # the summary's severity, as the MedMNIST-C and ImageNet-C papers report


@functools.lru_cache(maxsize=1)
def medmnistc_corruptions() -> dict[str, Callable[..., np.ndarray]]:
    """MedMNIST-C's BloodMNIST corruptions as `shifts`-style functions, or none when medmnistc
    (or Wand / ImageMagick under it) cannot be imported. Each is tried once on a 28-px image
    and left out if it fails there: medmnistc 0.1.0's motion blur calls numpy's removed
    `fromstring`, and its stain deposit needs images larger than 28 px (its parameters are
    set for MedMNIST+'s 224-px images, so at 28 px every corruption is relatively stronger)."""
    try:
        from medmnistc.corruptions.registry import CORRUPTIONS_DS
    except Exception:  # ImportError, or Wand's own error when ImageMagick is missing
        return {}

    def wrap(corruption) -> Callable[..., np.ndarray]:
        def apply(images: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
            from PIL import Image

            np.random.seed(seed)  # medmnistc draws from numpy's and Python's global generators
            random.seed(seed)
            out = np.empty_like(images)
            for i, chw in enumerate(images):
                hwc = chw[0] if chw.shape[0] == 1 else chw.transpose(1, 2, 0)
                new = np.asarray(corruption.apply(Image.fromarray(hwc), severity - 1), dtype=np.uint8)
                new = new[..., :images.shape[1]] if new.ndim == 3 else new[..., None]
                out[i] = new.transpose(2, 0, 1)
            return out
        return apply

    probe = np.random.default_rng(0).integers(0, 256, (1, 3, 28, 28), dtype=np.uint8)
    working = {}
    for name, corruption in CORRUPTIONS_DS["bloodmnist"].items():
        try:
            wrap(corruption)(probe, 3)
        except Exception:  # a corruption medmnistc cannot apply here (see the docstring)
            continue
        working[f"medmnistc-{name}"] = wrap(corruption)
    return working


def available_corruptions() -> dict[str, Callable[..., np.ndarray]]:
    return {**SHIFTS, **medmnistc_corruptions()}


def check_request(corruptions: Sequence[str] | None, severities: Sequence[int],
                  adapt: Sequence[str]) -> list[str]:
    """The corruption names to run (all available by default); refuses unknown names,
    severities outside 1-5 and unknown adaptations."""
    known = available_corruptions()
    names = list(corruptions) if corruptions else list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        extra = "" if medmnistc_corruptions() else " (MedMNIST-C's need medmnistc with Wand/ImageMagick)"
        raise UserError(f"unknown `corruptions` {', '.join(unknown)}; choose from "
                        f"{', '.join(known)}{extra}", param="corruptions")
    bad = [s for s in severities if s not in SEVERITIES]
    if bad or not severities:
        raise UserError(f"`severities` {list(severities)} must be within 1-5, e.g. 1-5 or 3",
                        param="severities")
    wrong = [a for a in adapt if a not in ADAPTATIONS]
    if wrong or not adapt:
        raise UserError(f"`adapt` {', '.join(wrong) or '(none)'}: choose from {', '.join(ADAPTATIONS)}",
                        param="adapt")
    return names


def score(classifier: Classifier, cells: CellData, adapts: Sequence[str],
          progress: bool | None = False) -> list[dict[str, Any]]:
    """How `classifier` does on labelled `cells`, one row per adaptation of `adapts`."""
    from sklearn.metrics import balanced_accuracy_score, recall_score

    y, rows = cells.labels.numpy(), []
    for adapt, prediction in classifier.predict_each(cells, adapts, progress=progress).items():
        predicted, accepted = prediction.predicted, ~prediction.review
        recall = recall_score(y, predicted, average=None, labels=range(len(classifier.class_names)),
                              zero_division=0)
        rows.append({"adapt": adapt, "adapted": prediction.adapted,
                     "accuracy": float((predicted == y).mean()),
                     "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
                     "ece": expected_calibration_error(prediction.probabilities, y),
                     "review_share": float(prediction.review.mean()),
                     "accepted_accuracy": float((predicted[accepted] == y[accepted]).mean()) if accepted.any() else None,
                     "shift_warning": bool(prediction.shift["shift_warning"]) if prediction.shift else None,
                     "shift_score": prediction.shift["shift_score"] if prediction.shift else None,
                     "recall": {n: float(r) for n, r in zip(classifier.class_names, recall)}})
    return rows


def run_robustness(classifier: Classifier, cells: CellData, corruptions: Sequence[str] | None = None,
                   severities: Sequence[int] = SEVERITIES, adapt: Sequence[str] = ("none",),
                   seed: int = 0, progress: bool | None = False) -> dict[str, Any]:
    """Every corruption x severity x adaptation on the labelled `cells` (see the module
    docstring), the clean rows first; returns the rows and a summary per adaptation. A
    corruption is left out at the severities it cannot apply at (`left_out`: name -> severities;
    `skipped`: name -> the reason)."""
    names = check_request(corruptions, severities, adapt)
    if not classifier.has_shift_reference:
        raise UserError("this classifier has no calibration data for the shift score (saved by an "
                        "earlier ssl-blood); train it again with ssl-blood train-classifier",
                        param="classifier")
    cells = cells.labelled()
    if not len(cells):
        raise UserError("robustness measures accuracy and needs labelled cells; give data with "
                        "labels (class folders, a label column) or `labels`", param="labels")
    classifier.embedder.check_images(cells.images, "the images")
    rows = [{"corruption": "clean", "severity": 0, **row} for row in score(classifier, cells, adapt)]
    bar = ui.bar(total=len(names) * len(severities), desc="robustness", unit="shift", enabled=progress)
    done, skipped, left_out = [], {}, {}
    for name in names:
        shifted, failed = {}, {}
        for s in severities:
            try:
                shifted[s] = _corrupt(name, cells.images.numpy(), s, seed)
            except _CannotApply as exc:  # a MedMNIST-C corruption these images do not admit
                failed[s] = str(exc)
        if failed:  # only the severities it cannot apply at are left out
            where = f"at severity {', '.join(map(str, failed))}: " if shifted else ""
            skipped[name] = where + next(iter(failed.values()))
            left_out[name] = list(failed)
            ui.note(f"left out {name} {skipped[name]}")
            bar.update(len(failed))
        if not shifted:
            continue
        for severity, images in shifted.items():
            rows += [{"corruption": name, "severity": severity, **row}
                     for row in score(classifier, cells.with_images(images), adapt)]
            bar.update(1)
        done.append(name)
    bar.close()
    return {"cells": len(cells), "corruptions": done, "skipped": skipped, "left_out": left_out,
            "severities": list(severities),
            "adapt": list(adapt), "rows": rows, "summary": summarise(rows, adapt)}


class _CannotApply(Exception):
    pass


def _corrupt(name: str, images: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """`images` under corruption `name`; a MedMNIST-C corruption that fails on them (its
    parameters are set for 224-px images) raises _CannotApply with its reason."""
    function = available_corruptions()[name]
    if name in SHIFTS:
        return function(images, severity, seed)
    try:
        return function(images, severity, seed)
    except Exception as exc:  # medmnistc's own errors (e.g. randrange on a too-small image)
        raise _CannotApply(f"medmnistc cannot apply it to {images.shape[-1]}-px images at "
                           f"severity {severity} ({type(exc).__name__}: {exc})") from None


def summarise(rows: list[dict], adapt: Sequence[str]) -> dict[str, Any]:
    """Per adaptation: clean accuracy; mean accuracy at REPORTED_SEVERITY (when it was run),
    its drop from the clean accuracy *without* adaptation (what the lab gets on its own cells,
    so an adaptation that costs clean accuracy is charged for it) and the worst corruption."""
    def clean_of(a: str) -> float:
        return next(r["accuracy"] for r in rows if r["corruption"] == "clean" and r["adapt"] == a)

    reference = clean_of("none") if "none" in adapt else None
    out = {}
    for a in adapt:
        clean = clean_of(a)
        at = [r for r in rows if r["severity"] == REPORTED_SEVERITY and r["adapt"] == a]
        out[a] = {"clean_accuracy": clean}
        if at:
            worst = min(at, key=lambda r: r["accuracy"])
            mean = float(np.mean([r["accuracy"] for r in at]))
            out[a].update({f"mean_accuracy_severity{REPORTED_SEVERITY}": mean,
                           f"mean_drop_severity{REPORTED_SEVERITY}": (reference if reference is not None else clean) - mean,
                           "worst": {"corruption": worst["corruption"], "accuracy": worst["accuracy"]},
                           "warning_rate": float(np.mean([bool(r["shift_warning"]) for r in at]))})
    return out


def _csv(result: dict) -> str:
    classes = list(result["rows"][0]["recall"])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["corruption", "severity", "adapt", "adapted", "accuracy", "balanced_accuracy", "ece",
                     "review_share", "accepted_accuracy", "shift_warning"] + [f"recall_{c}" for c in classes])
    for r in result["rows"]:
        writer.writerow([r["corruption"], r["severity"], r["adapt"], r["adapted"], f"{r['accuracy']:.4f}",
                         f"{r['balanced_accuracy']:.4f}", f"{r['ece']:.4f}", f"{r['review_share']:.4f}",
                         "" if r["accepted_accuracy"] is None else f"{r['accepted_accuracy']:.4f}",
                         "" if r["shift_warning"] is None else int(r["shift_warning"])]
                        + [f"{r['recall'][c]:.4f}" for c in classes])
    return buffer.getvalue()


def robustness_report(classifier: str | Path, source: Any, out: str | Path, split: str | None = None,
                      corruptions: Sequence[str] | None = None, severities: Sequence[int] = SEVERITIES,
                      adapt: Sequence[str] = ("none",), labels: str | Path | None = None,
                      device: str = "auto", overwrite: bool = False, seed: int = 0,
                      progress: bool | None = False) -> dict[str, Any]:
    """`ssl-blood robustness`: the labelled cells of `split` (default test, or the only split)
    of `source` (default: the data the classifier's backbone was pretrained on), labelled by the
    source or a `labels` CSV, under every requested shift; writes FILES into `out`."""
    from ssl_blood.classify.labels import apply_labels, read_labels
    from ssl_blood.data import default_split, load_split

    out = check_writable(out, folder=True)
    existing = [f for f in FILES if (out / f).exists()]
    if existing and not overwrite:
        raise UserError(f"`out` {out} already holds {', '.join(existing)}; set `overwrite` or "
                        f"choose another folder", param=("out", "overwrite"))
    check_request(corruptions, severities, adapt)  # before minutes of loading
    table = read_labels(labels) if labels is not None else None
    model = Classifier.load(classifier, device)
    source = model.embedder.spec.reads(source)
    cells = load_split(source, split or default_split(source))
    if table is not None:
        cells = apply_labels(cells, table, model.class_names)
    elif tuple(cells.class_names) != model.class_names and cells.has_labels:
        raise UserError(f"the data's classes ({', '.join(cells.class_names)}) are not the "
                        f"classifier's ({', '.join(model.class_names)}); give `labels` in its classes",
                        param="labels")
    result = {"classifier": str(classifier), "data": source.to_dict(), "split": cells.split,
              **run_robustness(model, cells, corruptions, severities, adapt, seed, progress)}
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / FILES[0], _csv(result))
    robustness_heat_map_png(result, out / FILES[2])
    write_json(result, out / FILES[1])
    return result

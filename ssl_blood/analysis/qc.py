"""Checking a cell dataset with its embeddings: duplicates, outliers, label suspects.

- near-duplicates: pairs of cells whose features have cosine similarity >= a threshold, within
  and across splits, counted per split pair; a pair across train and test is leakage and is
  listed first. The default threshold adapts to the features: a pair is a near-duplicate when
  its cosine distance is under a tenth of the dataset's median nearest-neighbour distance
  (self-supervised features of look-alike cells sit close together, at a distance that differs
  between checkpoints, so no fixed cosine works for all; on BloodMNIST's quick SimCLR features
  the rule separates re-used images from distinct look-alike platelets: docs/data-checks.md).
  Exact pixel duplicates (identical uint8 images, by SHA-1) likewise.
- outliers: per cell, the mean cosine distance to its k nearest train cells (itself excluded);
  the top of each split.
- label suspects: labelled cells whose k nearest train cells (itself excluded) vote for another
  class with at least `min_confidence` of the weight (DINO's kNN weights, confidence = that
  class's share of the votes; 0.8 by default: a strong majority, not a tie); the top of each
  class.
Everything goes into qc.json; montages show the cells when the images can be loaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from ssl_blood import ui
from ssl_blood.features.embeddings import Embeddings
from ssl_blood.errors import UserError
from ssl_blood.features.index import CellIndex
from ssl_blood.features.neighbours import KNN_TEMPERATURE, neighbours, weighted_vote
from ssl_blood.files import write_json

SPLIT_ORDER = ("train", "val", "test")
AUTO_THRESHOLD_FRACTION = 0.1  # of the median nearest-neighbour cosine distance


def _pair_key(a: str, b: str) -> str:
    a, b = sorted((a, b), key=lambda s: SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 9)
    return f"{a}/{b}"


def _leakage_first(pairs: list[dict]) -> list[dict]:
    """Cross-split pairs with test or val first (leakage), then the rest; most similar first."""
    rank = {"train/test": 0, "val/test": 1, "train/val": 2}
    return sorted(pairs, key=lambda p: (rank.get(p["splits"], 3), -p.get("similarity", 1.0)))


def near_duplicates(emb: Embeddings, threshold: float | None = None, k: int = 10) -> dict[str, Any]:
    """Pairs with cosine similarity >= threshold among each cell's k nearest cells; threshold
    None: 1 - AUTO_THRESHOLD_FRACTION x the median nearest-neighbour cosine distance."""
    if threshold is not None and not 0 < threshold <= 1:
        raise UserError(f"`threshold` {threshold} must be in (0, 1]", param="threshold")
    rows = np.arange(len(emb.features))
    index = CellIndex.build(emb.features, ids=rows, use_gpu=False)

    similarity, position = neighbours(index, emb.features, min(k, len(rows) - 1), exclude_ids=rows)
    median_nn_distance = float(np.median(1 - similarity[:, 0]))
    rule = "given"
    if threshold is None:
        threshold = round(1 - AUTO_THRESHOLD_FRACTION * median_nn_distance, 6)
        rule = f"auto: 1 - {AUTO_THRESHOLD_FRACTION} x the median nearest-neighbour cosine distance"
    pairs = {}
    for i, j in zip(*np.nonzero((similarity >= threshold) & (position >= 0))):
        a, b = sorted((int(i), int(position[i, j])))
        pairs[(a, b)] = float(similarity[i, j])
    listed = [{"a": {"split": str(emb.split[a]), "id": int(emb.ids[a])},
               "b": {"split": str(emb.split[b]), "id": int(emb.ids[b])},
               "splits": _pair_key(str(emb.split[a]), str(emb.split[b])),
               "similarity": round(s, 6)} for (a, b), s in pairs.items()]
    return {"threshold": threshold, "threshold_rule": rule, "median_nn_distance": round(median_nn_distance, 6),
            "neighbours_searched": k, "pairs": len(listed), **_split_pair_counts(listed),
            "list": _leakage_first(listed)}


def _split_pair_counts(pairs: list[dict]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for p in pairs:
        counts[p["splits"]] = counts.get(p["splits"], 0) + 1
    return {"by_split_pair": counts, "leakage_pairs": counts.get("train/test", 0) + counts.get("val/test", 0)}


def add_pixel_differences(pairs: list[dict], images: dict[str, np.ndarray]) -> None:
    """Each pair gains `pixel_mad`: the mean absolute difference of its uint8 pixels (0: the
    same image; a re-saved or slightly shifted copy stays small)."""
    for p in pairs:
        a, b = images[p["a"]["split"]][p["a"]["id"]], images[p["b"]["split"]][p["b"]["id"]]
        p["pixel_mad"] = round(float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()), 3)


def exact_duplicates(images: dict[str, np.ndarray],
                     ids: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Identical images (uint8 bytes) within and across splits; `images[split][id]`. With `ids`
    (split -> ids), only those cells are compared: embeddings of a subset (`embed --limit`)
    check the cells they hold, not the rest of the split."""
    seen: dict[str, list[tuple[str, int]]] = {}
    for split, array in images.items():
        for i in (ids[split] if ids is not None else range(len(array))):
            i, image = int(i), array[int(i)]
            seen.setdefault(hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest(), []).append((split, i))
    groups = [cells for cells in seen.values() if len(cells) > 1]
    pairs = [{"a": {"split": a[0], "id": a[1]}, "b": {"split": b[0], "id": b[1]},
              "splits": _pair_key(a[0], b[0])}
             for cells in groups for n, a in enumerate(cells) for b in cells[n + 1:]]
    return {"groups": len(groups), "pairs": len(pairs), **_split_pair_counts(pairs), "list": _leakage_first(pairs)}


def _train_neighbours(emb: Embeddings, k: int) -> tuple[np.ndarray, np.ndarray, CellIndex]:
    """Every cell's k nearest train cells (a train cell never finds itself)."""

    index = CellIndex.from_embeddings(emb, "train", kind="flat", use_gpu=False)
    if index.ntotal <= k:
        raise UserError(f"the train split has {index.ntotal} cells; qc needs more than `k`={k}",
                        param="k")
    sims = np.empty((len(emb.features), k), dtype=np.float32)
    pos = np.empty((len(emb.features), k), dtype=np.int64)
    for split in emb.splits():
        mask = emb.split == split
        s, p = neighbours(index, emb.features[mask], k, emb.ids[mask] if split == "train" else None)
        sims[mask], pos[mask] = s, p
    return sims, pos, index


def _mean_distance(similarity: np.ndarray, position: np.ndarray) -> np.ndarray:
    distance = np.where(position >= 0, 1 - similarity, np.nan)
    return np.nanmean(distance, axis=1)


def outlier_scores(emb: Embeddings, k: int = 10) -> np.ndarray:
    """Per cell of the embeddings: mean cosine distance to its k nearest train cells."""
    similarity, position, _ = _train_neighbours(emb, k)
    return _mean_distance(similarity, position)


def outliers(emb: Embeddings, similarity: np.ndarray, position: np.ndarray,
             top: int = 20) -> dict[str, Any]:
    """Mean cosine distance to the k nearest train cells, per cell; the top of each split."""
    score = _mean_distance(similarity, position)
    per_split = {}
    for split in emb.splits():
        rows = np.flatnonzero(emb.split == split)
        order = rows[np.argsort(-score[rows], kind="stable")][:top]
        per_split[split] = {
            "median_score": float(np.median(score[rows])),
            "top": [{"id": int(emb.ids[r]), "score": round(float(score[r]), 6),
                     "label": int(emb.labels[r])} for r in order]}
    return {"k": similarity.shape[1], "score": "mean cosine distance to the k nearest train cells",
            "per_split": per_split}


def label_suspects(emb: Embeddings, similarity: np.ndarray, position: np.ndarray,
                   index: CellIndex, top: int = 20, temperature: float = KNN_TEMPERATURE,
                   min_confidence: float = 0.8) -> dict[str, Any]:
    """Labelled cells whose neighbourhood votes for another class with at least
    `min_confidence` of the weight; the top of each class by that confidence."""
    share = weighted_vote(similarity, position, index.gallery_labels, len(emb.class_names), temperature)
    voted = share.argmax(1)
    confidence = share.max(1)
    labelled = emb.labels >= 0
    suspect = labelled & (voted != emb.labels) & (confidence >= min_confidence)
    per_class, by_class = {}, {}
    for c, name in enumerate(emb.class_names):
        rows = np.flatnonzero(suspect & (emb.labels == c))
        said = np.bincount(voted[rows], minlength=len(emb.class_names))
        by_class[name] = {"suspects": int(len(rows)), "labelled": int((labelled & (emb.labels == c)).sum()),
                          "neighbours_say": {emb.class_names[v]: int(n) for v, n in enumerate(said) if n}}
        rows = rows[np.argsort(-confidence[rows], kind="stable")][:top]
        per_class[name] = [{"split": str(emb.split[r]), "id": int(emb.ids[r]),
                            "label": name, "neighbours_say": emb.class_names[voted[r]],
                            "confidence": round(float(confidence[r]), 4)} for r in rows]
    return {"k": similarity.shape[1], "min_confidence": min_confidence,
            "suspects": int(suspect.sum()), "labelled_cells": int(labelled.sum()),
            "by_split": {s: int((suspect & (emb.split == s)).sum()) for s in emb.splits()},
            "by_class": by_class, "per_class": per_class}


def add_labels(pairs: list[dict], emb: Embeddings) -> int:
    """Each cell of each pair gains its class name (None when unlabelled); returns how many
    pairs carry two different labels: the same cell (or image) labelled twice, differently."""
    row = {(str(s), int(i)): r for r, (s, i) in enumerate(zip(emb.split, emb.ids))}
    conflicts = 0
    for p in pairs:
        for side in ("a", "b"):
            label = int(emb.labels[row[(p[side]["split"], p[side]["id"])]])
            p[side]["label"] = emb.class_names[label] if label >= 0 else None
        conflicts += p["a"]["label"] is not None and p["b"]["label"] is not None and p["a"]["label"] != p["b"]["label"]
    return conflicts


def _split_images(emb: Embeddings) -> dict[str, np.ndarray] | None:
    """uint8 images of every split, indexed by id; None when the data cannot be loaded."""
    images = {s: emb.split_images(s) for s in emb.splits()}
    if any(v is None for v in images.values()):
        ui.note("the images of these embeddings cannot be loaded; no pixel duplicates or montages")
        return None
    return images  # type: ignore[return-value]


def run_qc(emb: Embeddings, out_dir: str | Path | None = None, threshold: float | None = None,
           k: int = 10, top: int = 20, min_confidence: float = 0.8) -> dict[str, Any]:
    """Every check; with `out_dir`, qc.json and montages there. `threshold` None: adaptive
    (see the module docstring)."""
    from ssl_blood.analysis import plots

    if not 0 < min_confidence <= 1:
        raise UserError(f"`min_confidence` {min_confidence} must be in (0, 1]", param="min_confidence")
    if "train" not in emb.splits():
        raise UserError("qc compares every cell with the train split; these embeddings have "
                        "none: embed the train split too", param="embeddings")
    for split in emb.splits():
        if int((emb.split == split).sum()) < 5:
            raise UserError(f"the '{split}' split has fewer than 5 cells; qc needs more",
                            param="embeddings")
    bar = ui.bar(total=4, desc="qc: neighbours", unit="check")
    similarity, position, index = _train_neighbours(emb, k)
    images = _split_images(emb)
    result: dict[str, Any] = {
        "embeddings": emb.name, "identity": emb.identity, "subset": emb.subset or None,
        "cells": {s: int((emb.split == s).sum()) for s in emb.splits()}}
    bar.set_description("qc: near duplicates")
    result["near_duplicates"] = near_duplicates(emb, threshold, k)
    result["near_duplicates"]["label_conflicts"] = add_labels(result["near_duplicates"]["list"], emb)
    if images is not None:
        add_pixel_differences(result["near_duplicates"]["list"], images)
    bar.update(1)
    bar.set_description("qc: pixel duplicates")
    held = {s: np.sort(emb.ids[emb.split == s]) for s in emb.splits()}
    result["exact_duplicates"] = exact_duplicates(images, held) if images is not None else None
    if result["exact_duplicates"] is not None:
        result["exact_duplicates"]["label_conflicts"] = add_labels(result["exact_duplicates"]["list"], emb)
    bar.update(1)
    bar.set_description("qc: outliers and label suspects")
    result["outliers"] = outliers(emb, similarity, position, top)
    result["label_suspects"] = (label_suspects(emb, similarity, position, index, top, min_confidence=min_confidence)
                                if (emb.labels >= 0).any() else None)
    _add_paths(result, emb)
    bar.update(1)
    bar.set_description("qc: montages")
    if out_dir is not None:
        out = Path(out_dir)
        if images is not None:
            result["montages"] = [str(p) for p in _montages(result, emb, images, out, plots)]
        write_json(result, out / "qc.json")
    bar.update(1)
    bar.close()
    return result


def _conflict(pair: dict, side: str) -> str:
    """The cell's label in a caption, only where the two cells of a pair are labelled differently."""
    a, b = pair["a"].get("label"), pair["b"].get("label")
    return f" {pair[side]['label'][:10]}" if a and b and a != b else ""


def _unique_pairs(pairs: list[dict]) -> list[dict]:
    """One entry per pair of cells (a pair found both by its pixels and by its features once)."""
    seen: dict[tuple, dict] = {}
    for p in pairs:
        key = tuple(sorted(((p["a"]["split"], p["a"]["id"]), (p["b"]["split"], p["b"]["id"]))))
        seen.setdefault(key, p)
    return list(seen.values())


def _add_paths(result: dict, emb: Embeddings) -> None:
    """Every listed cell of a folder or manifest also named by its file's relative path (what
    a person looks up), beside its split and id."""
    if "path" not in emb.metadata:
        return
    path = {(str(s), int(i)): str(p) for s, i, p in zip(emb.split, emb.ids, emb.metadata["path"])}
    for part in ("near_duplicates", "exact_duplicates"):
        for pair in (result.get(part) or {}).get("list", []):
            for side in ("a", "b"):
                pair[side]["path"] = path.get((pair[side]["split"], pair[side]["id"]))
    for split, part in result["outliers"]["per_split"].items():
        for cell in part["top"]:
            cell["path"] = path.get((split, cell["id"]))
    for cells in ((result.get("label_suspects") or {}).get("per_class") or {}).values():
        for cell in cells:
            cell["path"] = path.get((cell["split"], cell["id"]))


def _name(cell: dict, split: str | None = None) -> str:
    """A montage caption's name of a cell: its file name, else split and id."""
    if cell.get("path"):
        name = Path(cell["path"]).name
        return name if len(name) <= 18 else name[:8] + "…" + name[-9:]
    return f"{cell.get('split', split)} #{cell['id']}"


def _montages(result: dict, emb: Embeddings, images: dict[str, np.ndarray], out: Path, plots) -> list[Path]:
    files = []
    pairs = _leakage_first(_unique_pairs(result["near_duplicates"]["list"]
                                         + (result["exact_duplicates"] or {}).get("list", [])))[:24]
    if pairs:
        cells = [[images[p["a"]["split"]][p["a"]["id"]], images[p["b"]["split"]][p["b"]["id"]]] for p in pairs]
        captions = [[_name(p["a"]) + _conflict(p, "a"),
                     _name(p["b"]) + _conflict(p, "b") + "\n"
                     + (f"cos {p['similarity']:.4f}" if "similarity" in p else "same pixels")
                     + (f" Δpx {p['pixel_mad']:.1f}" if "pixel_mad" in p else "")] for p in pairs]
        per_row = 4  # pairs side by side, four to a row
        files.append(plots.cell_grid(
            [sum(cells[i:i + per_row], []) for i in range(0, len(cells), per_row)],
            out / "duplicates.png", "Duplicate pairs (leakage across splits first)",
            captions=[sum(captions[i:i + per_row], []) for i in range(0, len(captions), per_row)], dpi=150))
    groups, titles, captions = [], [], []
    for split, part in result["outliers"]["per_split"].items():
        top = part["top"][:12]
        groups.append([images[split][t["id"]] for t in top])
        titles.append(f"{split}: most isolated cells (median score {part['median_score']:.3f})")
        captions.append([f"{_name(t, split)} {t['score']:.2f}" for t in top])
    files.append(plots.cell_grid(groups, out / "outliers.png", "Outliers per split", titles, captions, dpi=150))
    suspects = result["label_suspects"]
    if suspects and suspects["suspects"]:
        rows = [(name, cells[:10]) for name, cells in suspects["per_class"].items() if cells]
        files.append(plots.cell_grid(
            [[images[c["split"]][c["id"]] for c in cells] for _, cells in rows],
            out / "label_suspects.png", "Label suspects: labelled as the row's class, the "
            "neighbours say otherwise", [f"labelled {name}" for name, _ in rows],
            [[f"{_name(c)}\n{c['neighbours_say'][:12]} {c['confidence']:.2f}" for c in cells]
             for _, cells in rows], dpi=150))
    return files

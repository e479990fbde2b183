"""Figures: confusion matrix, retrieval montage, training curves, UMAP panels, cell grids.

Matplotlib with the Agg backend (no screen needed). Classes get the Okabe-Ito palette, which
stays distinguishable under the common colour-vision deficiencies; more than eight classes fall
back to tab20.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000")
DPI = 300  # publication resolution for PNGs


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def class_colors(n: int) -> list[str]:
    if n <= len(OKABE_ITO):
        return list(OKABE_ITO[:n])
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return [matplotlib.colors.to_hex(cmap(i % 20)) for i in range(n)]


def _save(fig, path: str | Path, svg: bool = False) -> list[Path]:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = [path]
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    if svg:
        fig.savefig(path.with_suffix(".svg"), bbox_inches="tight")
        written.append(path.with_suffix(".svg"))
    plt.close(fig)
    return written


def to_hwc(image: np.ndarray) -> np.ndarray:
    """(C, H, W) uint8 -> (H, W, C) or (H, W) for imshow."""
    image = np.asarray(image)
    return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)


# ----------------------------------------------------------------------------- evaluation


def confusion_matrix_png(confusion: Sequence[Sequence[int]], class_names: Sequence[str],
                         path: str | Path, title: str = "Confusion matrix (test)") -> Path:
    """Row-normalised confusion matrix with counts, class names on both axes."""
    plt = _pyplot()
    cm = np.asarray(confusion, dtype=np.float64)
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * n, 0.8 + 0.8 * n))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{int(cm[i, j])}\n{rates[i, j]:.0%}", ha="center", va="center",
                    fontsize=7, color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), class_names, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)[0]


def training_curves_png(history: Sequence[dict], path: str | Path) -> Path:
    """Loss per epoch and, where measured, kNN val accuracy."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(epochs, [h["loss"] for h in history], color=OKABE_ITO[4], label="loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss", color=OKABE_ITO[4])
    knn = [(h["epoch"], h["knn_val_acc"]) for h in history if "knn_val_acc" in h]
    if knn:
        ax2 = ax.twinx()
        ax2.plot(*zip(*knn), "o-", color=OKABE_ITO[5], label="kNN val acc")
        ax2.set_ylabel("kNN val accuracy", color=OKABE_ITO[5])
    ax.set_title("Pretraining")
    return _save(fig, path)[0]


# ----------------------------------------------------------------------------- retrieval


def retrieval_montage(rows: Sequence[dict], class_names: Sequence[str], path: str | Path) -> Path:
    """One row per query: the query cell, then its neighbours, each captioned with class and
    cosine similarity and framed in its class colour.

    Each row is a dict with `query` (C, H, W) uint8, `caption`, `neighbours` (list of images),
    `labels` and `similarities`.
    """
    plt = _pyplot()
    colors = class_colors(max(len(class_names), 1))
    columns = 1 + max(len(r["neighbours"]) for r in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.2 * columns, 1.55 * len(rows)),
                             squeeze=False)
    for ax_row, row in zip(axes, rows):
        panels = [(row["query"], row["caption"], None)] + [
            (img, f"{_short(class_names, lab)}\n{sim:.3f}", lab)
            for img, lab, sim in zip(row["neighbours"], row["labels"], row["similarities"])]
        for ax in ax_row:
            ax.axis("off")
        for ax, (img, caption, label) in zip(ax_row, panels):
            ax.axis("on")
            ax.imshow(to_hwc(img), cmap="gray" if np.asarray(img).shape[0] == 1 else None,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            color = "#444444" if label is None or label < 0 else colors[label]
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(2 if label is None else 4)
            ax.set_title(caption, fontsize=7)
    return _save(fig, path)[0]


def _short(class_names: Sequence[str], label: int) -> str:
    if label < 0 or label >= len(class_names):
        return "unlabelled"
    name = class_names[label]
    return "IG" if name.startswith("immature granulocyte") else name


def cell_grid(images: Sequence[np.ndarray], path: str | Path, title: str = "",
              row_titles: Sequence[str] | None = None, columns: int = 8) -> Path:
    """Rows of cell thumbnails (each row a group when `row_titles` is given)."""
    plt = _pyplot()
    rows = int(np.ceil(len(images) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 0.9, rows * 0.95 + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(to_hwc(images[i]), interpolation="nearest",
                      cmap="gray" if np.asarray(images[i]).shape[0] == 1 else None)
    if row_titles:
        for r, t in enumerate(row_titles):
            axes[r, 0].set_title(t, fontsize=7, loc="left")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)[0]

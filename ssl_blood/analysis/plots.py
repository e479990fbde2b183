"""Figures: confusion matrix, retrieval montage, training curves, UMAP panels, cell grids.

Matplotlib with the Agg backend (no screen needed). Classes get the Okabe-Ito palette, which
stays distinguishable under the common colour-vision deficiencies; more than eight classes fall
back to tab20. Text is never parsed as mathtext: a class or file named `$\\x$` is drawn as typed.
Figures are written atomically (`runs.save_figure`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

# Okabe-Ito, reordered so the weak yellow comes last (least used, never a highlight by default)
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7", "#000000", "#F0E442")
DPI = 300  # publication resolution for PNGs


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False  # names are data, not TeX
    import matplotlib.pyplot as plt

    return plt


def class_colors(n: int) -> list[str]:
    if n <= len(OKABE_ITO):
        return list(OKABE_ITO[:n])
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return [matplotlib.colors.to_hex(cmap(i % 20)) for i in range(n)]


def _save(fig, path: str | Path, svg: bool = False, dpi: int = DPI) -> list[Path]:
    from ssl_blood.files import save_figure

    plt = _pyplot()
    path = Path(path)
    try:
        written = [save_figure(fig, path, dpi=dpi, bbox_inches="tight")]
        if svg:
            written.append(save_figure(fig, path.with_suffix(".svg"), bbox_inches="tight"))
    finally:
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


def robustness_heat_map_png(result: dict, path: str | Path) -> Path:
    """Accuracy per corruption (rows) and severity (columns, clean first), a panel per adaptation."""
    plt = _pyplot()
    names, severities, adapt = result["corruptions"], result["severities"], result["adapt"]
    fig, axes = plt.subplots(1, len(adapt), figsize=(1.6 + 0.8 * (len(severities) + 1) * len(adapt),
                                                      1.0 + 0.4 * len(names)), squeeze=False)
    for ax, a in zip(axes[0], adapt):
        clean = next(r["accuracy"] for r in result["rows"] if r["corruption"] == "clean" and r["adapt"] == a)
        grid = np.array([[clean] + [next((r["accuracy"] for r in result["rows"] if r["corruption"] == n
                                          and r["severity"] == s and r["adapt"] == a), np.nan)
                                    for s in severities] for n in names])  # nan: left out there
        ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                ax.text(j, i, "n/a" if np.isnan(grid[i, j]) else f"{grid[i, j]:.0%}", ha="center",
                        va="center", fontsize=7, color="black" if grid[i, j] > 0.6 else "white")
        ax.set_xticks(range(len(severities) + 1), ["clean"] + [str(s) for s in severities], fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("severity")
        ax.set_title(f"accuracy, adapt: {a}", fontsize=9)
    return _save(fig, path)[0]


def training_curves_png(history: Sequence[dict], path: str | Path) -> Path:
    """Loss per epoch and, where measured, kNN val accuracy."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(epochs, [h["loss"] for h in history], color=OKABE_ITO[4], label="loss")
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
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
    """A class name that fits under a thumbnail: long multi-word names become their initials
    ("immature granulocytes" -> "IG")."""
    if label < 0 or label >= len(class_names):
        return "unlabelled"
    name = class_names[label]
    words = name.split()
    return "".join(w[0] for w in words).upper() if len(name) > 12 and len(words) > 1 else name


def cell_grid(groups: Sequence[Sequence[np.ndarray]], path: str | Path, title: str = "",
              row_titles: Sequence[str] | None = None,
              captions: Sequence[Sequence[str]] | None = None, dpi: int = DPI) -> Path:
    """One row of cell thumbnails per group (e.g. the cells nearest each sub-cluster centre),
    optionally a caption under each cell."""
    plt = _pyplot()
    columns = max(1, max(len(g) for g in groups))
    height = 1.0 + (0.3 if captions else 0.0)
    fig, axes = plt.subplots(len(groups), columns, figsize=(columns * 0.9, len(groups) * height + 0.4),
                             squeeze=False)
    for r, group in enumerate(groups):
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < len(group):
                ax.imshow(to_hwc(group[c]), interpolation="nearest",
                          cmap="gray" if np.asarray(group[c]).shape[0] == 1 else None)
                if captions:
                    ax.text(0.5, -0.05, captions[r][c], transform=ax.transAxes, ha="center",
                            va="top", fontsize=5)
        if row_titles:
            axes[r, 0].set_title(row_titles[r], fontsize=7, loc="left")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path, dpi=dpi)[0]


# ----------------------------------------------------------------------------- UMAP / IG


def umap_panels_png(maps: Sequence[dict], class_names: Sequence[str], highlight: int,
                    path: str | Path) -> list[Path]:
    """Per embedding one row: the map coloured by class, then the same map with the highlighted
    class in colour, the rest grey, and a thumbnail of each sub-cluster's most central cell.
    Writes PNG and SVG. Each map is a dict with `title`, `coords` (N, 2), `labels` (N,) and
    `thumbnails` [(xy, image)]."""
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    plt = _pyplot()
    colors = class_colors(len(class_names))
    fig, axes = plt.subplots(len(maps), 2, figsize=(12, 5.2 * len(maps)), squeeze=False)
    for (ax_class, ax_target), m in zip(axes, maps):
        xy, labels = np.asarray(m["coords"]), np.asarray(m["labels"])
        for c, name in enumerate(class_names):
            sel = labels == c
            ax_class.scatter(xy[sel, 0], xy[sel, 1], s=3, color=colors[c], alpha=0.75,
                             label=f"{name} ({int(sel.sum())})", linewidths=0, rasterized=True)
        ax_class.legend(markerscale=4, fontsize=7, loc="best", frameon=False)
        ax_class.set_title(f"{m['title']}: classes", fontsize=10)
        others = labels != highlight
        ax_target.scatter(xy[others, 0], xy[others, 1], s=3, color="#d0d0d0", linewidths=0,
                          rasterized=True, label="other classes")
        ax_target.scatter(xy[~others, 0], xy[~others, 1], s=5, color=colors[highlight],
                          linewidths=0, rasterized=True, label=class_names[highlight])
        ax_target.legend(markerscale=3, fontsize=7, loc="best", frameon=False)
        ax_target.set_title(f"{m['title']}: {class_names[highlight]} highlighted", fontsize=10)
        spread = xy.max(0) - xy.min(0)
        for number, (point, image) in enumerate(m.get("thumbnails", [])):
            box = OffsetImage(to_hwc(image), zoom=1.6, cmap="gray" if image.shape[0] == 1 else None)
            # alternate the offsets so thumbnails of nearby sub-clusters do not cover each other
            offset = np.array([0.18 if number % 2 == 0 else -0.18, 0.16 if number % 4 < 2 else -0.16])
            ab = AnnotationBbox(box, point, xybox=point + offset * spread, xycoords="data",
                                arrowprops={"arrowstyle": "-", "color": "#333333", "lw": 0.8},
                                bboxprops={"edgecolor": colors[highlight], "linewidth": 1.5})
            ax_target.add_artist(ab)
        for ax in (ax_class, ax_target):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel("UMAP 1")
            ax.set_ylabel("UMAP 2")
    fig.tight_layout()
    return _save(fig, path, svg=True)


def neighbour_composition_png(compositions: dict[str, dict[str, dict[str, float]]],
                              class_names: Sequence[str], highlight: int, path: str | Path) -> Path:
    """Stacked bars: the class make-up of each class's nearest neighbours, one panel per
    embedding, the highlighted class first."""
    plt = _pyplot()
    colors = class_colors(len(class_names))
    order = [class_names[highlight]] + [c for i, c in enumerate(class_names) if i != highlight]
    fig, axes = plt.subplots(1, len(compositions), figsize=(6.5 * len(compositions), 3.6),
                             squeeze=False)
    for ax, (title, comp) in zip(axes[0], compositions.items()):
        rows = [r for r in order if r in comp]
        left = np.zeros(len(rows))
        for j, name in enumerate(class_names):
            share = np.array([comp[r][name] for r in rows])
            ax.barh(range(len(rows)), share, left=left, color=colors[j], label=name, height=0.7)
            left += share
        ax.set_yticks(range(len(rows)), [_short(class_names, class_names.index(r)) for r in rows],
                      fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of nearest neighbours")
        ax.set_title(title, fontsize=9)
    axes[0][-1].legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left", frameon=False)
    return _save(fig, path)[0]


# ----------------------------------------------------------------------------- curves


def curves_png(series: Sequence[dict], path: str | Path, xlabel: str, ylabel: str, title: str,
               log_x: bool = False) -> Path:
    """Lines with shaded bands: each series a dict with `label`, `x`, `y` and optional `std`
    (band = mean +- std) and `style` ("o-", "s--", ...)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for number, s in enumerate(series):
        color = OKABE_ITO[number % len(OKABE_ITO)]
        x, y = np.asarray(s["x"], dtype=float), np.asarray(s["y"], dtype=float)
        ax.plot(x, y, s.get("style", "o-"), color=color, label=s["label"], markersize=4)
        if s.get("std") is not None:
            std = np.asarray(s["std"], dtype=float)
            ax.fill_between(x, y - std, y + std, color=color, alpha=0.18, linewidth=0)
    if log_x:
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_xscale("log")
        # the default log labels are TeX ($10^{2}$), which parse_math=False would print raw
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
    return _save(fig, path)[0]

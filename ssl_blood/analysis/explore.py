"""The interactive cell map: one self-contained HTML page, no network at view time.

Made with bokeh (inline resources, as umap-learn's own interactive plot): the 2-D UMAP of one
split, one scatter renderer per class (legend click hides a class), colouring switchable to the
predicted class, probe right/wrong or outlier score, pan / zoom / box and lasso selection.
Hover shows the cell's thumbnail, id, class, prediction and metadata; click lists its k nearest
cells (cosine) with thumbnails, class and similarity; a selection lists its class counts and
downloads its ids as CSV; one button highlights immature granulocytes.

bokeh provides the plot, widgets and the inline bundle; the few lines of JavaScript here only
wire its models together (CustomJS). Thumbnails are one JPEG sprite sheet (each cell padded to
a multiple of 8 px so JPEG blocks never mix two cells) shown as CSS backgrounds, which keeps the
3,421-cell test split of BloodMNIST near 2 MB; above `max_thumbnails` cells a stratified sample
keeps a thumbnail and the rest show none (docs/benchmarks.md has the measured sizes).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np

from ssl_blood import ui
from ssl_blood.data.cells import cell_names
from ssl_blood.features.embeddings import Embeddings
from ssl_blood.errors import UserError
from ssl_blood.features.index import CellIndex
from ssl_blood.files import write_text

COLOURINGS = ("class", "predicted class", "probe right / wrong", "outlier score")
SPRITE_COLUMNS = 64
THUMB_DISPLAY = 64  # px a thumbnail is shown at


def _tile(side: int) -> int:
    """Sprite tile side: the image side (at most 64) rounded up to a multiple of 8."""
    return int(np.ceil(min(side, 64) / 8) * 8)


def sprite_sheet(images: np.ndarray) -> tuple[str, int, int]:
    """(JPEG data URI, tile side, columns) of uint8 images (N, C, H, W), row-major tiles."""
    from PIL import Image

    n, c, side = len(images), images.shape[1], images.shape[-1]
    tile = _tile(side)
    columns = min(SPRITE_COLUMNS, max(1, n))
    rows = max(1, int(np.ceil(n / columns)))
    sheet = np.full((rows * tile, columns * tile, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        hwc = np.repeat(image, 3, 0).transpose(1, 2, 0) if c == 1 else image.transpose(1, 2, 0)
        if side > 64:
            hwc = np.asarray(Image.fromarray(hwc).resize((tile, tile), Image.Resampling.BILINEAR))
        r, q = divmod(i, columns)
        sheet[r * tile:r * tile + hwc.shape[0], q * tile:q * tile + hwc.shape[1]] = hwc
    buffer = io.BytesIO()
    Image.fromarray(sheet).save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode(), tile, columns


def _thumbnail_sample(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    from ssl_blood.data import stratified_indices

    return stratified_indices(labels, limit, seed) if len(labels) > limit else np.arange(len(labels))


def _check_probe(probe: dict | None, emb: Embeddings, split: str, labelled: int) -> np.ndarray | None:
    """The probe's test predictions, if they belong to these embeddings' test split."""
    if probe is None:
        return None
    if split != "test":
        raise UserError("`probe` predictions are for the test split; use split test or drop probe",
                        param="probe")
    predictions = probe.get("test_predictions")
    if probe.get("identity") != emb.identity or not isinstance(predictions, list) or len(predictions) != labelled:
        raise UserError("`probe` comes from other embeddings (its identity or number of test cells "
                        "differs); give the linear_probe.json made from these embeddings",
                        param="probe")
    return np.asarray(predictions, dtype=np.int64)


def _neighbour_table(emb: Embeddings, split: str, index_dir: str | None, k: int,
                     x: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, CellIndex]:
    """(similarities, gallery positions (-1: none found)) of each cell's k nearest cells, and
    the index: the given one (same embedder), else an exact index over the split."""
    from ssl_blood.features.neighbours import neighbours

    if index_dir is not None:
        index = CellIndex.load(index_dir, expected_identity=emb.identity, expected_dim=emb.dim,
                               use_gpu=False)
    else:
        index = CellIndex.from_embeddings(emb, split, kind="flat", use_gpu=False)
    exclude = ids if index.meta["gallery_split"] == split else None
    k = min(k, index.ntotal - (exclude is not None))
    similarity, position = neighbours(index, x, k, exclude)
    return similarity, position, index


def _outlier_scores(emb: Embeddings, split: str, k: int = 10) -> np.ndarray:
    from ssl_blood.analysis.qc import outlier_scores

    return outlier_scores(emb, k)[emb.mask(split)]


def explore_page(emb: Embeddings, out: str | Path, split: str | None = None, probe: dict | None = None,
                 index_dir: str | None = None, k: int = 8, max_thumbnails: int = 20_000,
                 seed: int = 0) -> dict[str, Any]:
    """Write the map of `split` (default: test, or all the cells of a source without splits)
    to `out` (one HTML file); returns what it holds."""
    split = split or emb.default_split()
    page, info = explore_html(emb, split, probe, index_dir, k, max_thumbnails, seed)
    write_text(out, page)
    return {**info, "split": split, "bytes": len(page.encode())}


def explore_html(emb: Embeddings, split: str = "test", probe: dict | None = None,
                 index_dir: str | None = None, k: int = 8, max_thumbnails: int = 20_000,
                 seed: int = 0) -> tuple[str, dict[str, Any]]:
    """The page as a string (the report embeds it) and what it holds."""
    from ssl_blood.analysis.umap_ig import IG, class_index, fit_umap, has_class

    mask = emb.mask(split)
    x, y, ids = emb.features[mask], emb.labels[mask], emb.ids[mask]
    if len(x) < 5:
        raise UserError(f"the '{split}' split has {len(x)} cells; a map needs at least 5", param="split")
    if k < 1 or max_thumbnails < 0:
        raise UserError(f"`k` {k} must be >= 1 and max_thumbnails {max_thumbnails} >= 0", param="k")
    predicted = _check_probe(probe, emb, split, int((y >= 0).sum()))
    bar = ui.bar(total=4, desc="map: UMAP", unit="stage")
    stored = emb.coords[mask] if emb.coords is not None else None
    coords = stored if stored is not None and np.isfinite(stored).all() else fit_umap(x, seed)[0]
    bar.update(1)
    bar.set_description("map: neighbours and outlier scores")
    sims, positions, index = _neighbour_table(emb, split, index_dir, k, x, ids)
    gallery_split = index.meta["gallery_split"]
    outlier = _outlier_scores(emb, split) if "train" in emb.splits() else np.zeros(len(x))
    bar.update(1)
    bar.set_description("map: thumbnails")
    images = emb.split_images(split)
    gallery_images = images if gallery_split == split else emb.split_images(gallery_split)
    thumbs = _thumbnail_sample(y, max_thumbnails, seed) if images is not None else np.array([], int)
    sheet = _sprites(images, ids, thumbs, gallery_images,
                     index.gallery_ids[positions[positions >= 0]], gallery_split == split)
    bar.update(1)
    bar.set_description("map: page")
    cells = _cell_columns(emb, mask, coords, y, ids, predicted, outlier, sims, positions, sheet)
    gallery_mask = emb.mask(gallery_split)
    gallery_names = dict(zip(emb.ids[gallery_mask].tolist(), _display_names(
        {k: v[gallery_mask] for k, v in emb.metadata.items()}, emb.ids[gallery_mask])))
    gallery = _gallery_columns(index, sheet, gallery_names)
    highlight = emb.class_names[class_index(emb.class_names, IG)] if has_class(emb.class_names, IG) else None
    page = _render(cells, gallery, emb, split, sheet, highlight, predicted is not None, gallery_split,
                   len(x), sims.shape[1])
    bar.update(1)
    bar.close()
    return page, {"cells": int(len(x)), "thumbnails": int(len(thumbs)), "neighbours": int(sims.shape[1]),
                  "gallery_split": gallery_split, "umap": "stored" if coords is stored else "computed"}


def _sprites(images: np.ndarray | None, ids: np.ndarray, thumbs: np.ndarray,
             gallery_images: np.ndarray | None, nbr_ids: np.ndarray, same_split: bool) -> dict[str, Any]:
    """One sheet: the sampled map cells (rows `thumbs` of the map, `ids` their ids), then
    gallery cells shown as neighbours (when the gallery is another split). Returns the data URI,
    tile, columns and the sprite slot of each map row and each gallery id."""
    if images is None:
        return {"uri": "", "tile": 0, "columns": 1, "row_slot": {}, "gallery_slot": {}}
    tiles = [images[ids[r]] for r in thumbs]
    row_slot = {int(r): s for s, r in enumerate(thumbs)}
    gallery_slot: dict[int, int] = {}
    if same_split:
        gallery_slot = {int(ids[r]): slot for r, slot in row_slot.items()}
    elif gallery_images is not None:
        for gid in np.unique(nbr_ids[nbr_ids >= 0]):
            gallery_slot[int(gid)] = len(tiles)
            tiles.append(gallery_images[gid])
    if not tiles:
        return {"uri": "", "tile": 0, "columns": 1, "row_slot": {}, "gallery_slot": {}}
    uri, tile, columns = sprite_sheet(np.stack(tiles))
    return {"uri": uri, "tile": tile, "columns": columns, "row_slot": row_slot,
            "gallery_slot": gallery_slot, "count": len(tiles)}


def _offset(slot: int | None, sheet: dict) -> tuple[int, int]:
    """Background offset (px at display size) of a sprite slot; (1, 1) means none."""
    if slot is None or not sheet["tile"]:
        return 1, 1
    r, q = divmod(slot, sheet["columns"])
    scale = THUMB_DISPLAY / sheet["tile"]
    return -int(q * sheet["tile"] * scale), -int(r * sheet["tile"] * scale)


def _cell_columns(emb, mask, coords, y, ids, predicted, outlier, sims, positions,
                  sheet) -> dict[str, Any]:
    """Per map cell: position, labels, colours per colouring, thumbnail offset, metadata, and
    its neighbours as k numeric columns (n0.. gallery row, -1 none; s0.. similarity), which
    bokeh ships as compact binary arrays."""
    from ssl_blood.analysis.plots import class_colors

    names = list(emb.class_names) + ["unlabelled"]
    colours = class_colors(len(emb.class_names)) + ["#999999"]
    pred = np.full(len(y), -1)
    if predicted is not None:
        pred[y >= 0] = predicted
    quantile = np.argsort(np.argsort(outlier)) / max(1, len(outlier) - 1)
    ramp = ["#2c7bb6", "#abd9e9", "#ffffbf", "#fdae61", "#d7191c"]
    offsets = np.array([_offset(sheet["row_slot"].get(r), sheet) for r in range(len(y))], dtype=np.int32)
    metadata = {k: v[mask] for k, v in emb.metadata.items()}
    # plain text: the tooltip's @meta is escaped by bokeh (escaping here too showed &quot;)
    meta_text = [" · ".join(f"{k}: {v[r]}" for k, v in metadata.items())
                 for r in range(len(y))]
    right = np.where((pred == y) & (y >= 0), 1, np.where(y >= 0, 0, -1)) if predicted is not None else np.full(len(y), -1)
    columns: dict[str, Any] = {
        "x": coords[:, 0].astype(np.float32), "y": coords[:, 1].astype(np.float32),
        "id": ids.astype(np.int32), "label": y.astype(np.int32), "cls": [names[v] for v in y],
        "name": _display_names(metadata, ids),
        "pred": [names[v] if predicted is not None else "–" for v in pred],
        "right": [{1: "right", 0: "wrong", -1: "–"}[int(v)] for v in right],
        "outlier": np.round(outlier, 4).astype(np.float32),
        "c_class": [colours[v] for v in y],
        "c_pred": [colours[v] if predicted is not None else "#999999" for v in pred],
        "c_right": [{1: "#0072B2", 0: "#D55E00", -1: "#999999"}[int(v)] for v in right],
        "c_outlier": [ramp[min(4, int(q * 5))] for q in quantile],
        "bx": offsets[:, 0], "by": offsets[:, 1],
        "has_thumb": ["block" if tuple(o) != (1, 1) else "none" for o in offsets],
        "meta": meta_text,
    }
    for j in range(sims.shape[1]):
        columns[f"n{j}"] = positions[:, j].astype(np.int32)
        columns[f"s{j}"] = np.where(positions[:, j] >= 0, sims[:, j], 0).astype(np.float32)
    return columns


def _display_names(metadata: dict[str, np.ndarray], ids: np.ndarray) -> list[str]:
    """What the map shows for a cell: its file's relative path, else '#id'."""
    if "path" in metadata:
        return cell_names(metadata, ids).tolist()
    return [f"#{int(i)}" for i in ids]


def _gallery_columns(index: CellIndex, sheet: dict, names: dict[int, str]) -> dict[str, Any]:
    """Per gallery cell (the neighbours' side): id, name (path or id), label, thumbnail offset."""
    offsets = np.array([_offset(sheet["gallery_slot"].get(int(g)), sheet) for g in index.gallery_ids],
                       dtype=np.int32).reshape(-1, 2)
    return {"gid": index.gallery_ids.astype(np.int32),
            "gname": [names.get(int(g), str(int(g))) for g in index.gallery_ids],
            "glabel": index.gallery_labels.astype(np.int32),
            "gbx": offsets[:, 0], "gby": offsets[:, 1]}


_TOOLTIP = """<div class="cell-tip" style="max-width:260px">
<div style="display:@has_thumb;background-position:@bx{0}px @by{0}px;THUMB_STYLE"></div>
<div><b class="tip-class">@cls</b> · @name</div>
<div>predicted: @pred (@right)</div><div>outlier score: @outlier{0.000}</div>
<div style="font-size:11px;color:#555">@meta</div></div>"""

# Bokeh's Div.text is HTML: every value from the data (class names come from folder names and
# manifest cells) goes through esc() before it is put into a string of HTML.
_ESC_JS = """
const esc = (v) => String(v).replace(/[&<>"']/g, (c) => ({'&': '&amp;', '<': '&lt;', '>': '&gt;',
                                                         '"': '&quot;', "'": '&#39;'})[c]);
"""

_TAP_JS = _ESC_JS + """
const src = cb_data.source;
const i = src.inspected.indices.length ? src.inspected.indices[0] : null;
if (i === null) return;
const d = src.data, g = gallery.data;
let rows = '';
let found = 0;
for (let j = 0; j < k; j++) {
  const n = d['n' + j][i];
  if (n < 0) continue;
  found += 1;
  const label = g.glabel[n], bx = g.gbx[n], by = g.gby[n];
  const cls = label >= 0 ? names[label] : 'unlabelled';
  const img = (bx === 1 && by === 1) ? '' :
    `<div class="thumb" style="background-position:${bx}px ${by}px"></div>`;
  rows += `<div class="nb">${img}<div class="nb-text">${esc(g.gname[n])}<br>${esc(cls)}<br>${esc(d['s' + j][i].toFixed(3))}</div></div>`;
}
panel.text = `<div class="nb-title">${esc(d.name[i])} (${esc(d.cls[i])}): ${found} nearest ${esc(gallery_split)} cells</div>` + rows;
"""

_SELECT_JS = _ESC_JS + """
const counts = {}; const picked = [];
for (const src of sources) {
  const d = src.data;
  for (const i of src.selected.indices) {
    counts[d.cls[i]] = (counts[d.cls[i]] || 0) + 1;
    picked.push([d.id[i], d.name[i], d.cls[i]]);
  }
}
window.sslBloodSelection = picked;
const parts = Object.entries(counts).sort((a, b) => b[1] - a[1]).map(([c, n]) => `${esc(c)}: ${n}`);
summary.text = picked.length ? `<b>${picked.length} cells selected</b><br>` + parts.join('<br>')
                             : 'Select cells with the box or lasso tool.';
"""

_DOWNLOAD_JS = """
const picked = window.sslBloodSelection || [];
// RFC 4180 quoting; a leading = + - @ is defused so a spreadsheet shows it as text
const field = (v) => { let t = String(v); if (/^[=+\\-@]/.test(t)) t = "'" + t;
                       return '"' + t.replace(/"/g, '""') + '"'; };
// a path is quoted but never altered: `ssl-blood sheet --labels` reads it back
const quoted = (v) => '"' + String(v).replace(/"/g, '""') + '"';
const csv = (has_paths ? 'split,id,path,class\\n' : 'split,id,class\\n') +
  picked.map(([id, name, c]) => `${split},${id},` + (has_paths ? `${quoted(name)},` : '') + field(c)).join('\\n') + '\\n';
const a = document.createElement('a');
a.href = URL.createObjectURL(new Blob([csv], {type: 'text/csv'}));
a.download = 'selected_cells.csv';
document.body.appendChild(a); a.click(); a.remove();
"""

_COLOUR_JS = """
const field = {'class': 'c_class', 'predicted class': 'c_pred', 'probe right / wrong': 'c_right',
               'outlier score': 'c_outlier'}[this.value];
for (const r of renderers) { r.glyph.fill_color = {field: field}; r.glyph.line_color = {field: field}; }
key.text = keys[this.value];
"""

_HIGHLIGHT_JS = """
const on = this.active;
for (const r of renderers) {
  const target = r.name === target_name;
  r.glyph.fill_alpha = on && !target ? 0.08 : 0.8;
  r.glyph.line_alpha = on && !target ? 0.08 : 0.8;
  r.glyph.size = on && target ? 7 : 5;
}
"""


def _render(cells: dict[str, Any], gallery: dict[str, np.ndarray], emb: Embeddings, split: str,
            sheet: dict, highlight: str | None, has_probe: bool, gallery_split: str, n: int,
            k: int) -> str:
    from bokeh.embed import file_html
    from bokeh.layouts import row
    from bokeh.models import (ColumnDataSource, CustomJS, Div, GlobalInlineStyleSheet, HoverTool,
                              InlineStyleSheet, TapTool)
    from bokeh.plotting import figure
    from bokeh.resources import INLINE

    # The sprite is defined once, as a custom property on the page's root: custom properties
    # inherit into every shadow root (bokeh draws tooltips and divs in shadow DOM), so the
    # tooltip template and the neighbour panel both use it without repeating the image.
    thumb_style = "display:none"
    if sheet["tile"]:
        scale = THUMB_DISPLAY / sheet["tile"]
        width = int(sheet["columns"] * sheet["tile"] * scale)
        height = int(np.ceil(sheet["count"] / sheet["columns"]) * sheet["tile"] * scale)
        thumb_style = (f"width:{THUMB_DISPLAY}px;height:{THUMB_DISPLAY}px;"
                       f"background-image:var(--ssl-blood-sprite);background-size:{width}px {height}px;"
                       f"image-rendering:pixelated;border:1px solid #ccc")
    sprite = GlobalInlineStyleSheet(css=f":root{{--ssl-blood-sprite:url({sheet['uri']})}}"
                                    if sheet["tile"] else ":root{}")
    style = InlineStyleSheet(css=f".thumb{{{thumb_style}}}"
                                 ".nb{display:inline-flex;gap:6px;margin:3px 8px 3px 0;"
                                 "font-size:11px;align-items:center;width:150px}"
                                 ".nb-title{font-weight:bold;margin-bottom:4px}")
    plot = figure(width=760, height=640, tools="pan,wheel_zoom,box_select,lasso_select,reset,save",
                  active_scroll="wheel_zoom", title=f"{emb.name}: {split} split, {n} cells (UMAP)",
                  output_backend="webgl" if n > 20_000 else "canvas", stylesheets=[sprite, style],
                  name="map")
    plot.xaxis.visible = plot.yaxis.visible = False
    plot.grid.visible = False
    labels = np.asarray(cells["label"])
    names = list(emb.class_names) + ["unlabelled"]
    renderers, sources = [], []
    for c in sorted(set(labels.tolist()), key=lambda v: (v < 0, v)):
        rows = np.flatnonzero(labels == c)
        source = ColumnDataSource({key: values[rows] if isinstance(values, np.ndarray)
                                   else [values[r] for r in rows] for key, values in cells.items()},
                                  name=f"cells:{names[c]}")
        renderer = plot.scatter("x", "y", source=source, size=5, fill_color="c_class",
                                line_color="c_class", fill_alpha=0.8, line_alpha=0.8,
                                legend_label=f"{names[c]} ({len(rows)})", name=names[c])
        renderers.append(renderer)
        sources.append(source)
    plot.legend.click_policy = "hide"
    plot.legend.label_text_font_size = "9pt"
    plot.legend.location = "top_left"
    plot.add_tools(HoverTool(renderers=renderers, tooltips=_TOOLTIP.replace("THUMB_STYLE", thumb_style)))
    panel = Div(text="Click a cell to list its nearest cells.", width=340, stylesheets=[style],
                name="neighbours")
    gallery_source = ColumnDataSource(gallery, name="gallery")
    plot.add_tools(TapTool(renderers=renderers, behavior="inspect",
                           callback=CustomJS(args={"panel": panel, "gallery": gallery_source,
                                                   "gallery_split": gallery_split, "k": k,
                                                   "names": list(emb.class_names)},
                                             code=_TAP_JS)))
    side = _controls(renderers, sources, split, has_probe, highlight, panel, "path" in emb.metadata)
    return file_html(row(plot, side), resources=INLINE, title=f"ssl-blood map: {emb.name}, {split}")


def _controls(renderers: list, sources: list, split: str, has_probe: bool, highlight: str | None,
              panel, has_paths: bool) -> Any:
    """The side column: colouring, its key, the highlight toggle, the selection summary, the
    CSV download and the neighbour panel, wired with CustomJS."""
    from bokeh.layouts import column
    from bokeh.models import Button, CustomJS, Div, Select, Toggle

    summary = Div(text="Select cells with the box or lasso tool.", width=340, name="selection")
    on_select = CustomJS(args={"sources": sources, "summary": summary}, code=_SELECT_JS)
    for source in sources:
        source.selected.js_on_change("indices", on_select)
    download = Button(label="Download selected cells (CSV)", width=240, name="download")
    download.js_on_event("button_click", CustomJS(args={"split": split, "has_paths": has_paths},
                                                  code=_DOWNLOAD_JS))
    keys = {"class": "Colour: true class (click the legend to hide a class).",
            "predicted class": "Colour: class predicted by the linear probe." if has_probe
            else "No probe given: predicted class unknown (grey).",
            "probe right / wrong": "Blue: the probe is right; orange: wrong." if has_probe
            else "No probe given (grey).",
            "outlier score": "Blue (typical) to red (isolated): mean cosine distance to the 10 "
                             "nearest train cells, by quantile."}
    key = Div(text=keys["class"], width=340, name="colour-key")
    colouring = Select(title="Colour by", value="class", options=list(COLOURINGS), width=240,
                       name="colouring")
    colouring.js_on_change("value", CustomJS(args={"renderers": renderers, "key": key, "keys": keys},
                                             code=_COLOUR_JS))
    controls = [colouring, key]
    if highlight:
        toggle = Toggle(label=f"Highlight {highlight}", width=240, name="highlight")
        toggle.js_on_change("active", CustomJS(args={"renderers": renderers,
                                                     "target_name": highlight}, code=_HIGHLIGHT_JS))
        controls.append(toggle)
    return column(*controls, summary, download, panel)

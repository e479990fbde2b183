"""The labelling sheet: one offline HTML page where a person gives each picked cell a class and
downloads labels.csv, which `train-classifier --labels` reads as it is.

Each cell is shown large (small crops upscaled without smoothing), with its name (the file's
relative path, or its id in an npz) and what `select` knew of it; on demand its nearest labelled
cells (with their classes) or, before any label exists, its nearest cells of the pool. A person
answers with a class, "unsure" or "not a cell"; keys: digits for the first nine classes, u, x,
arrows to move, n for neighbours. Work is kept in the browser across reloads. The CSV has the
cell's name column (`path` or `id`), `label` (empty unless a class was chosen) and `status`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ssl_blood.analysis.pages import (NOT_A_CELL, UNSURE, check_classes, page_key, render_page,
                                      thumbnails)
from ssl_blood.data.cells import CellData
from ssl_blood.errors import UserError
from ssl_blood.files import write_text

NEIGHBOURS = 6


def sheet_html(cells: CellData, rows: Sequence[int], classes: Sequence[str], title: str,
               details: Sequence[str] | None = None, labels: Sequence[str] | None = None,
               neighbours: list[list[tuple[int, str]]] | None = None) -> str:
    """The page for `rows` of `cells`. `details`: a line per row (e.g. rank and cluster);
    `labels`: a class already given per row ("" for none); `neighbours`: per row, (row of
    `cells`, caption) of the cells to show beside it."""
    classes = check_classes(classes)
    rows = [int(r) for r in rows]
    if not rows:
        raise UserError("the sheet would hold no cell; give a labels file or picks with cells",
                        param="labels")
    names = cells.cell_names
    key = "path" if "path" in cells.metadata else "id"
    shown = list(dict.fromkeys(rows + [r for row in neighbours or [] for r, _ in row]))
    slot = {r: i for i, r in enumerate(shown)}
    given = list(labels) if labels is not None else [""] * len(rows)
    data = {
        "title": title, "key": key, "classes": list(classes), "unsure": UNSURE, "not_a_cell": NOT_A_CELL,
        "storage": "ssl-blood-sheet:" + page_key(title, classes, [str(names[r]) for r in rows]),
        "images": thumbnails(cells, shown),
        "cells": [{"name": str(names[r]), "img": slot[r], "detail": details[i] if details else "",
                   "label": given[i] if given[i] in classes else "",
                   "nbrs": [[slot[n], caption] for n, caption in (neighbours[i] if neighbours else [])]}
                  for i, r in enumerate(rows)],
    }
    return render_page(title, _CSS, _BODY, data, _SCRIPT)


def nearest_cells(features: np.ndarray, rows: Sequence[int], labelled: np.ndarray,
                  class_of: Sequence[str], k: int = NEIGHBOURS) -> list[list[tuple[int, str]]]:
    """Per row: its k nearest labelled rows with their class, or, with no labelled row, its k
    nearest other rows ("similar cell"), cosine, through the neighbour service."""
    from ssl_blood.features.index import CellIndex
    from ssl_blood.features.neighbours import neighbours

    rows = np.asarray(rows, dtype=np.int64)
    gallery = np.flatnonzero(labelled) if labelled.any() else np.arange(len(features))
    index = CellIndex.build(features[gallery], ids=gallery, use_gpu=False)
    k = min(k, len(gallery) - 1)  # a cell is never its own neighbour
    if k < 1:
        return [[] for _ in rows]
    similarity, position = neighbours(index, features[rows], k, rows)
    out = []
    for sims, found in zip(similarity, position):
        row = []
        for s, p in zip(sims, found):
            if p < 0:
                continue
            g = int(gallery[p])
            row.append((g, f"{class_of[g]} · {s:.2f}" if labelled.any() else f"similar · {s:.2f}"))
        out.append(row)
    return out


def picks_sheet(result: dict[str, Any], emb: Any, out: str | Path, classes: Sequence[str],
                table: Any = None) -> Path:
    """The sheet of `select`'s picks: each with what select knew of it and, on demand, its
    nearest labelled cells (from `table`, a LabelTable) or its nearest cells of the pool."""
    from ssl_blood.data import load_split

    split = result["picks"][0]["split"]
    cells = load_split(emb.source, split)
    features = np.asarray(emb.select(split)[0], dtype=np.float32)
    position = {int(i): r for r, i in enumerate(cells.ids.tolist())}
    rows = [position[p["id"]] for p in result["picks"]]
    labelled, class_of = _labelled_rows(cells, table)
    details = [f"rank {p['rank']} ({result['strategy']})"
               + (f" · cluster {p['cluster']}" if p.get("cluster") is not None else "")
               + (f" · margin {p['margin']:.2f}" if p.get("margin") is not None else "")
               for p in result["picks"]]
    title = f"Label {len(rows)} cells ({result['strategy']}, {result['embeddings']})"
    return write_sheet(out, cells, rows, classes, title, details,
                       neighbours=nearest_cells(features, rows, labelled, class_of))


def sheet_for_file(labels: str | Path, out: str | Path, source: Any = None, split: str | None = None,
                   embeddings: str | Path | None = None, classes: Sequence[str] | None = None,
                   classifier: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """`ssl-blood sheet`: the sheet of every cell a CSV names (picks.csv, labels.csv, a
    review's corrections), labels already given filled in. The cells come from `source` or the
    data `embeddings` were made from; with `embeddings`, neighbours are shown too."""
    from ssl_blood.analysis.select import read_cells
    from ssl_blood.classify.labels import read_labels
    from ssl_blood.data import default_split, load_split
    from ssl_blood.features.embeddings import Embeddings
    from ssl_blood.files import refuse_existing

    refuse_existing(out, overwrite)
    names = list(dict.fromkeys(read_cells(labels, "labels")))
    if not names:
        raise UserError(f"`labels` {labels} names no cell; a sheet needs at least one", param="labels")
    table = read_labels(labels, allow_empty=True)
    emb = Embeddings.load(embeddings) if embeddings else None
    if source is None and emb is None:
        raise UserError("give the cells' data (`image_dir`, `manifest` or `npz`) or the "
                        "`embeddings` made from it", param="image_dir")
    source = source or emb.source
    cells = load_split(source, split or default_split(source, "train"))
    position = {str(n): r for r, n in enumerate(cells.cell_names)}
    missing = [n for n in names if n not in position]
    if missing:
        raise UserError(f"`labels` {labels} names {len(missing)} cell(s) that are not in the "
                        f"{cells.split} split of {source.path} (first: '{missing[0]}'); give the "
                        f"data the file was made from (or `split`)", param="labels")
    rows = [position[n] for n in names]
    class_list = sheet_classes(classes, classifier, table, cells.class_names)
    given = dict(zip(table.keys, table.labels))
    labelled, class_of = _labelled_rows(cells, table)
    neighbours = None
    if emb is not None:
        features = np.asarray(emb.select(cells.split)[0], dtype=np.float32)
        if len(features) != len(cells):
            raise UserError(f"`embeddings` {embeddings} hold another number of {cells.split} cells "
                            f"than the data; give the embeddings of this data", param="embeddings")
        neighbours = nearest_cells(features, rows, labelled, class_of)
    title = f"Label {len(rows)} cells ({Path(labels).name})"
    write_sheet(out, cells, rows, class_list, title, labels=[given.get(n, "") for n in names],
                neighbours=neighbours)
    return {"cells": len(rows), "labelled": sum(1 for n in names if given.get(n)),
            "classes": list(class_list), "out": str(out)}


def sheet_classes(classes: Sequence[str] | None, classifier: str | Path | None, table: Any,
                  data_classes: Sequence[str]) -> tuple[str, ...]:
    """The classes a person labels with, checked: given, else the classifier's, the labels
    file's, or the data's own."""
    import json

    if classes:
        chosen = tuple(classes)
    elif classifier:
        chosen = tuple(json.loads((Path(classifier) / "classifier.json").read_text())["class_names"])
    elif table is not None and table.keys:
        chosen = table.class_names
    elif data_classes:
        chosen = tuple(data_classes)
    else:
        raise UserError("a labelling sheet needs the class names and this data has none; give them "
                        "(`classes` a,b,c)", param="classes")
    return check_classes(chosen)


def _labelled_rows(cells: CellData, table: Any) -> tuple[np.ndarray, list[str]]:
    """Which rows of `cells` the labels table labels, and each row's class ("" for none)."""
    class_of = [""] * len(cells)
    if table is None or not table.keys:
        return np.zeros(len(cells), dtype=bool), class_of
    names = {str(n): r for r, n in enumerate(cells.cell_names)}
    for key, label in zip(table.keys, table.labels):
        if key in names:
            class_of[names[key]] = label
    return np.array([bool(c) for c in class_of]), class_of


def write_sheet(path: str | Path, *args: Any, **kwargs: Any) -> Path:
    return write_text(path, sheet_html(*args, **kwargs))


_CSS = """
main{display:flex;gap:24px;padding:12px 16px;align-items:flex-start;flex-wrap:wrap}
#current{min-width:340px;max-width:480px}
#big{width:256px;height:256px;object-fit:contain}
#name{font-weight:600;word-break:break-all;margin:6px 0 2px}
#answers{display:flex;flex-wrap:wrap;gap:6px;margin:10px 0}
#answers button{min-width:120px;text-align:left}
#nbrs .tile{width:92px}
#grid{flex:1;min-width:300px}
"""

_BODY = """
<header><h1 id="title"></h1><span id="progress"></span>
<button id="download">Download labels.csv</button>
<span class="small">Keys: <kbd>1</kbd>-<kbd>9</kbd> class, <kbd>u</kbd> unsure, <kbd>x</kbd> not a cell,
<kbd>Backspace</kbd> clear, <kbd>&larr;</kbd> <kbd>&rarr;</kbd> move, <kbd>n</kbd> neighbours.
Work is kept in this browser.</span></header>
<main><section id="current"><img id="big" class="cell-img" alt="cell">
<div id="name"></div><div id="detail" class="small"></div><div id="answer" class="small"></div>
<div id="answers"></div><button id="show-nbrs">Show neighbours (n)</button><div id="nbrs" hidden></div>
</section><section id="grid"></section></main>
"""

_SCRIPT = r"""
const cells = DATA.cells, classes = DATA.classes;
const work = loadWork();
for (const c of cells) if (!(c.name in work) && c.label) work[c.name] = {label: c.label, status: 'labelled'};
let at = 0, showNbrs = false;
document.getElementById('title').textContent = DATA.title;
const answers = document.getElementById('answers');
classes.forEach((name, i) => answers.append(el('button', {'data-answer': name, onclick: () => answer(name)},
  i < 9 ? `${i + 1}  ${name}` : name)));
answers.append(el('button', {'data-answer': DATA.unsure, onclick: () => answer(DATA.unsure)}, `u  ${DATA.unsure}`));
answers.append(el('button', {'data-answer': DATA.not_a_cell, onclick: () => answer(DATA.not_a_cell)}, `x  ${DATA.not_a_cell}`));
const grid = document.getElementById('grid');
const tiles = cells.map((c, i) => {
  const t = el('div', {class: 'tile', 'data-index': i, onclick: () => go(i)},
    el('img', {class: 'cell-img', src: DATA.images[c.img], alt: c.name}), el('span', {}, c.name),
    el('span', {class: 'answer'}, ''));
  grid.append(t); return t;
});
function answerText(w) { return !w ? '' : w.status === 'labelled' ? w.label : w.status; }
function draw() {
  const c = cells[at], w = work[c.name];
  document.getElementById('big').src = DATA.images[c.img];
  document.getElementById('name').textContent = `${at + 1} / ${cells.length}: ${c.name}`;
  document.getElementById('detail').textContent = c.detail;
  document.getElementById('answer').textContent = w ? `answer: ${answerText(w)}` : 'not answered yet';
  for (const b of answers.children) b.classList.toggle('on', !!w && answerText(w) === b.dataset.answer);
  tiles.forEach((t, i) => {
    const wi = work[cells[i].name];
    t.classList.toggle('current', i === at); t.classList.toggle('done', !!wi);
    t.querySelector('.answer').textContent = answerText(wi);
  });
  const nbrs = document.getElementById('nbrs');
  nbrs.hidden = !showNbrs; nbrs.replaceChildren();
  if (showNbrs) {
    if (!c.nbrs.length) nbrs.append(el('p', {class: 'small'}, 'No neighbours in this sheet.'));
    for (const [img, caption] of c.nbrs)
      nbrs.append(el('div', {class: 'tile'}, el('img', {class: 'cell-img', src: DATA.images[img], alt: caption}),
                     el('span', {}, caption)));
  }
  const done = cells.filter((x) => work[x.name]).length;
  const labelled = cells.filter((x) => work[x.name] && work[x.name].status === 'labelled').length;
  document.getElementById('progress').textContent = `${done} / ${cells.length} answered (${labelled} labelled)`;
}
function go(i) { at = Math.max(0, Math.min(cells.length - 1, i)); draw(); tiles[at].scrollIntoView({block: 'nearest'}); }
function answer(value) {
  const name = cells[at].name;
  work[name] = classes.includes(value) ? {label: value, status: 'labelled'} : {label: '', status: value};
  saveWork(work);
  if (at < cells.length - 1) go(at + 1); else draw();
}
function clear() { delete work[cells[at].name]; saveWork(work); draw(); }
function labelsCsv() {
  return toCsv([DATA.key, 'label', 'status'], cells.map((c) => {
    const w = work[c.name]; return [c.name, w ? w.label : '', w ? w.status : ''];
  }));
}
document.getElementById('download').addEventListener('click', () => download('labels.csv', labelsCsv()));
document.getElementById('show-nbrs').addEventListener('click', () => { showNbrs = !showNbrs; draw(); });
document.addEventListener('keydown', (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const digit = Number(e.key);
  if (Number.isInteger(digit) && digit >= 1 && digit <= Math.min(9, classes.length)) answer(classes[digit - 1]);
  else if (e.key === 'u') answer(DATA.unsure);
  else if (e.key === 'x') answer(DATA.not_a_cell);
  else if (e.key === 'ArrowRight' || e.key === 'ArrowDown') go(at + 1);
  else if (e.key === 'ArrowLeft' || e.key === 'ArrowUp') go(at - 1);
  else if (e.key === 'Backspace') clear();
  else if (e.key === 'n') { showNbrs = !showNbrs; draw(); }
  else return;
  e.preventDefault();
});
draw();
"""

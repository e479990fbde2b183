"""The review page: the cells `predict` sent to review, for a person to confirm or correct, as a
technologist works an analyser's "unidentified" pile.

Flagged cells are grouped by predicted class and shown least sure first, each with its top
classes and probabilities. The reviewer confirms (Enter) or corrects (a digit or a click; "unsure"
and "not a cell" too); the differential count beside them shows the predicted count, the
accepted cells, and the count after review, updated with every answer. "Download
corrections.csv" gives a `--labels` file (name column, `label`, `status` confirmed / corrected /
unsure / not a cell, the predicted class) that `train-classifier --from CLASSIFIER` adds to the
labels the classifier already has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ssl_blood.analysis.pages import NOT_A_CELL, UNSURE, page_key, render_page, thumbnails
from ssl_blood.classify.classifier import Prediction
from ssl_blood.data.cells import CellData
from ssl_blood.files import write_text

MAX_REVIEW_CELLS = 2000  # a page beyond this is too heavy to open and too long to work through
TOP_CLASSES = 3


def review_order(prediction: Prediction, max_cells: int = MAX_REVIEW_CELLS) -> np.ndarray:
    """Rows of the flagged cells, grouped by predicted class (in class order) and least sure
    first within a class (by the review score); the `max_cells` least sure overall when more are
    flagged."""
    flagged = np.flatnonzero(prediction.review)
    scores = prediction.review_scores
    if len(flagged) > max_cells:
        flagged = flagged[np.argsort(scores[flagged], kind="stable")[:max_cells]]
    return flagged[np.lexsort((scores[flagged], prediction.predicted[flagged]))]


def review_html(prediction: Prediction, cells: CellData, title: str,
                max_cells: int = MAX_REVIEW_CELLS) -> str:
    """The page (see the module docstring) for `prediction` of `cells` (same rows)."""
    rows = review_order(prediction, max_cells)
    probabilities, predicted = prediction.probabilities, prediction.predicted
    accepted = ~prediction.review
    classes = list(prediction.class_names)
    data = {
        "title": title, "key": prediction.name_column, "classes": classes, "unsure": UNSURE,
        "not_a_cell": NOT_A_CELL, "total": int(len(predicted)), "flagged": int(prediction.review.sum()),
        "shown": int(len(rows)), "thresholds": prediction.thresholds,
        "score": ("probability averaged with its nearest cells of the training folder"
                  if prediction.review_score == "smoothed" else "probability"),
        "predicted": [int((predicted == c).sum()) for c in range(len(classes))],
        "accepted": [int((predicted[accepted] == c).sum()) for c in range(len(classes))],
        "storage": "ssl-blood-review:" + page_key(title, classes, [str(prediction.names[r]) for r in rows]),
        "images": thumbnails(cells, rows),
        "cells": [{"name": str(prediction.names[r]), "img": i, "pred": int(predicted[r]),
                   "p": round(float(probabilities[r].max()), 4), "ood": round(float(prediction.ood[r]), 3),
                   "top": [[int(c), round(float(probabilities[r, c]), 4)]
                           for c in np.argsort(-probabilities[r], kind="stable")[:TOP_CLASSES]]}
                  for i, r in enumerate(rows)],
    }
    return render_page(title, _CSS, _BODY, data, _SCRIPT)


def write_review(path: str | Path, prediction: Prediction, cells: CellData, title: str,
                 max_cells: int = MAX_REVIEW_CELLS) -> Path:
    return write_text(path, review_html(prediction, cells, title, max_cells))


def predict_and_review(classifier: str | Path, source: Any, out: str | Path, review: str | Path | None,
                       split: str | None = None, min_probability: float | None = None,
                       max_ood: float | None = None, device: str = "auto", overwrite: bool = False,
                       progress: bool | None = False, adapt: str = "none",
                       views: int | None = None) -> tuple[Prediction, dict[str, Any]]:
    """`ssl-blood predict` with, when `review` names a file, the review page of its flagged
    cells (checked writable before anything is classified)."""
    from ssl_blood.classify.classifier import predict_cells
    from ssl_blood.data import load_split
    from ssl_blood.files import check_writable, refuse_existing

    if review is not None:
        check_writable(refuse_existing(review, overwrite, "review"), folder=False, param="review")
    prediction, counts = predict_cells(classifier, source, out, split, min_probability, max_ood,
                                       device, overwrite, progress, adapt, views)
    if review is not None:
        cells = load_split(source, counts["split"] if split is None else split)
        title = f"Review {counts['review']} of {counts['cells']} cells ({Path(str(source.path)).name})"
        write_review(review, prediction, cells, title)
        counts = {**counts, "review_page": str(review),
                  "review_page_cells": int(min(counts["review"], MAX_REVIEW_CELLS))}
    return prediction, counts


_CSS = """
main{display:flex;gap:24px;padding:12px 16px;align-items:flex-start;flex-wrap:wrap}
#current{min-width:340px;max-width:460px;position:sticky;top:60px}
#big{width:224px;height:224px;object-fit:contain}
#name{font-weight:600;word-break:break-all;margin:6px 0 2px}
#answers{display:flex;flex-wrap:wrap;gap:6px;margin:10px 0}
#answers button{min-width:120px;text-align:left}
#groups{flex:1;min-width:320px}
#groups h2{font-size:15px;margin:12px 0 4px}
.tile{width:96px}.tile .top{font-size:10px;color:#555}
.tile.confirmed{background:#e8f3e8}.tile.corrected{background:#e3ecfa}.tile.other{background:#f1f1f1}
#counts td.delta{color:#0072B2}
"""

_BODY = """
<header><h1 id="title"></h1><span id="progress"></span>
<button id="download">Download corrections.csv</button>
<span class="small">Keys: <kbd>Enter</kbd> confirm, <kbd>1</kbd>-<kbd>9</kbd> correct to a class,
<kbd>u</kbd> unsure, <kbd>x</kbd> not a cell, <kbd>Backspace</kbd> clear, <kbd>&larr;</kbd>
<kbd>&rarr;</kbd> move. Work is kept in this browser.</span></header>
<main><section id="current"><img id="big" class="cell-img" alt="cell"><div id="name"></div>
<div id="probs" class="small"></div><div id="answer" class="small"></div><div id="answers"></div>
<h2 style="font-size:15px">Differential count</h2><table id="counts"></table>
<p id="note" class="small"></p></section><section id="groups"></section></main>
"""

_SCRIPT = r"""
const cells = DATA.cells, classes = DATA.classes;
const work = loadWork();
let at = 0;
document.getElementById('title').textContent = DATA.title;
document.getElementById('note').textContent =
  `${DATA.flagged} of ${DATA.total} cells were flagged (${DATA.score} below ${DATA.thresholds.min_probability.toFixed(2)} ` +
  `or out-of-distribution score above ${DATA.thresholds.max_ood.toFixed(2)}); ` +
  (DATA.shown < DATA.flagged ? `the ${DATA.shown} least sure are shown. ` : '') +
  'After review: accepted cells count as predicted, reviewed cells as answered; cells not yet reviewed stay unidentified.';
const answers = document.getElementById('answers');
function answerButtons() {
  answers.replaceChildren(el('button', {'data-answer': 'confirm', onclick: () => confirmCell()},
    `Enter  confirm ${classes[cells[at].pred]}`));
  classes.forEach((name, i) => answers.append(el('button', {'data-answer': name, onclick: () => answer(name)},
    i < 9 ? `${i + 1}  ${name}` : name)));
  answers.append(el('button', {'data-answer': DATA.unsure, onclick: () => answer(DATA.unsure)}, `u  ${DATA.unsure}`));
  answers.append(el('button', {'data-answer': DATA.not_a_cell, onclick: () => answer(DATA.not_a_cell)}, `x  ${DATA.not_a_cell}`));
}
const groups = document.getElementById('groups');
const tiles = [];
classes.forEach((name, c) => {
  const members = cells.map((x, i) => [x, i]).filter(([x]) => x.pred === c);
  if (!members.length) return;
  groups.append(el('h2', {}, `predicted ${name} (${members.length})`));
  const box = el('div', {});
  for (const [x, i] of members) {
    tiles[i] = el('div', {class: 'tile', 'data-index': i, onclick: () => go(i)},
      el('img', {class: 'cell-img', src: DATA.images[x.img], alt: x.name}), el('span', {}, x.name),
      el('span', {class: 'top'}, `${(x.p * 100).toFixed(0)} %`), el('span', {class: 'answer'}, ''));
    box.append(tiles[i]);
  }
  groups.append(box);
});
function kind(w) { return !w ? '' : w.status === 'confirmed' || w.status === 'corrected' ? w.status : 'other'; }
function answerText(w) { return !w ? '' : w.label ? `${w.status}: ${w.label}` : w.status; }
function drawCounts() {
  const after = DATA.accepted.slice(), reviewed = classes.map(() => 0);
  let unidentified = DATA.flagged, notCell = 0, unsure = 0;
  for (const x of cells) {
    const w = work[x.name];
    if (!w) continue;
    unidentified -= 1;
    if (w.label) { const c = classes.indexOf(w.label); after[c] += 1; reviewed[c] += 1; }
    else if (w.status === DATA.not_a_cell) notCell += 1; else unsure += 1;
  }
  const counted = after.reduce((a, b) => a + b, 0);
  const table = document.getElementById('counts');
  table.replaceChildren(el('tr', {}, el('th', {}, 'class'), el('th', {}, 'predicted'), el('th', {}, 'accepted'),
    el('th', {}, 'reviewed as'), el('th', {}, 'after review'), el('th', {}, '%')));
  classes.forEach((name, c) => table.append(el('tr', {'data-class': name}, el('td', {}, name),
    el('td', {}, DATA.predicted[c]), el('td', {}, DATA.accepted[c]), el('td', {class: 'delta'}, reviewed[c]),
    el('td', {class: 'after'}, after[c]), el('td', {}, counted ? (100 * after[c] / counted).toFixed(1) : '–'))));
  for (const [label, n] of [['unidentified (not yet reviewed)', unidentified], ['unsure', unsure], [DATA.not_a_cell, notCell]])
    table.append(el('tr', {}, el('td', {}, label), el('td', {}, ''), el('td', {}, ''), el('td', {}, ''),
      el('td', {class: 'after'}, n), el('td', {}, '')));
  return {after, unidentified};
}
function draw() {
  if (!cells.length) {
    document.getElementById('name').textContent = 'No cell was flagged for review.';
    document.getElementById('progress').textContent = '0 flagged';
    drawCounts(); return;
  }
  const x = cells[at], w = work[x.name];
  answerButtons();
  document.getElementById('big').src = DATA.images[x.img];
  document.getElementById('name').textContent = `${at + 1} / ${cells.length}: ${x.name}`;
  document.getElementById('probs').textContent = x.top.map(([c, p]) => `${classes[c]} ${(p * 100).toFixed(1)} %`).join(' · ')
    + ` · OOD score ${x.ood.toFixed(2)}`;
  document.getElementById('answer').textContent = w ? answerText(w) : 'not reviewed yet';
  tiles.forEach((t, i) => {
    if (!t) return;
    const wi = work[cells[i].name];
    t.classList.toggle('current', i === at);
    for (const k of ['confirmed', 'corrected', 'other']) t.classList.toggle(k, kind(wi) === k);
    t.querySelector('.answer').textContent = wi ? (wi.label || wi.status) : '';
  });
  const done = cells.filter((c) => work[c.name]).length;
  document.getElementById('progress').textContent = `${done} / ${cells.length} reviewed`;
  drawCounts();
}
function go(i) { at = Math.max(0, Math.min(cells.length - 1, i)); draw(); if (tiles[at]) tiles[at].scrollIntoView({block: 'nearest'}); }
function record(value) { work[cells[at].name] = value; saveWork(work); if (at < cells.length - 1) go(at + 1); else draw(); }
function confirmCell() { record({label: classes[cells[at].pred], status: 'confirmed'}); }
function answer(value) {
  if (!classes.includes(value)) return record({label: '', status: value});
  record({label: value, status: value === classes[cells[at].pred] ? 'confirmed' : 'corrected'});
}
function correctionsCsv() {
  return toCsv([DATA.key, 'label', 'status', 'predicted', 'probability'],
    cells.filter((x) => work[x.name]).map((x) => {
      const w = work[x.name]; return [x.name, w.label, w.status, classes[x.pred], x.p.toFixed(4)];
    }));
}
document.getElementById('download').addEventListener('click', () => download('corrections.csv', correctionsCsv()));
document.addEventListener('keydown', (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey || !cells.length) return;
  const digit = Number(e.key);
  if (e.key === 'Enter') confirmCell();
  else if (Number.isInteger(digit) && digit >= 1 && digit <= Math.min(9, classes.length)) answer(classes[digit - 1]);
  else if (e.key === 'u') answer(DATA.unsure);
  else if (e.key === 'x') answer(DATA.not_a_cell);
  else if (e.key === 'ArrowRight' || e.key === 'ArrowDown') go(at + 1);
  else if (e.key === 'ArrowLeft' || e.key === 'ArrowUp') go(at - 1);
  else if (e.key === 'Backspace') { delete work[cells[at].name]; saveWork(work); draw(); }
  else return;
  e.preventDefault();
});
draw();
"""

"""What the pages a person works in share: cell thumbnails, data put safely into a page, the
page shell and the CSV a page hands back.

The labelling sheet and the review page are hand-written HTML + JavaScript: the labelling tools
that exist (Label Studio, CVAT) are servers with accounts and a database, while a lab's hand-off
here is one file that opens offline from a USB stick and gives back one CSV. Safety rules, one
owner each:
- data goes into the page only as JSON inside `<script type="application/json">`, with `<`, `>`
  and `&` written as \\u escapes, so no value can close the script element (`page_data`);
- the scripts put every value into the page with `textContent` or attribute setters, never
  `innerHTML` (see sheet.py / review.py), so a class or file name is shown, never run;
- the page loads nothing: images are data URIs, styles and scripts inline.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from typing import Any, Sequence

import numpy as np

from ssl_blood.data.cells import CellData

THUMB_MAX_SIDE = 192  # px: larger crops are downscaled for the page (their own file otherwise)
LOSSLESS_MAX_SIDE = 64  # px: up to this side PNG (small crops, every pixel matters), above JPEG
UNSURE, NOT_A_CELL = "unsure", "not a cell"
STATUSES = ("labelled", UNSURE, NOT_A_CELL)


def _encode(hwc: np.ndarray) -> str:
    from PIL import Image

    image = Image.fromarray(hwc)
    if max(image.size) > THUMB_MAX_SIDE:
        image.thumbnail((THUMB_MAX_SIDE, THUMB_MAX_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if max(image.size) <= LOSSLESS_MAX_SIDE:
        image.save(buffer, format="PNG", optimize=True)
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    image.convert("RGB").save(buffer, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _own_file(cells: CellData, row: int) -> np.ndarray | None:
    """The cell's image file at its own resolution (RGB or grey), where the source has files."""
    from PIL import Image, UnidentifiedImageError

    if "path" not in cells.metadata or not cells.source.has_file_paths:
        return None
    path = cells.source.root / str(cells.metadata["path"][row])  # a FileSource: paths are relative to it
    try:
        with Image.open(path) as image:
            image = image.convert("L" if cells.channels == 1 else "RGB")
            return np.asarray(image)
    except (OSError, UnidentifiedImageError, ValueError):
        return None  # moved or unreadable since: the decoded copy still shows the cell


def thumbnail(cells: CellData, row: int) -> str:
    """A data URI of one cell: its own file where it has one, else the decoded image."""
    own = _own_file(cells, row)
    if own is None:
        chw = cells.images[row].numpy()
        own = chw[0] if chw.shape[0] == 1 else chw.transpose(1, 2, 0)
    return _encode(np.ascontiguousarray(own))


def thumbnails(cells: CellData, rows: Sequence[int]) -> list[str]:
    return [thumbnail(cells, int(r)) for r in rows]


def page_data(value: Any) -> str:
    """JSON that is safe inside <script type="application/json">: no value can end the element
    or open a comment, whatever names it holds."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def page_key(*parts: Any) -> str:
    """A short stable key of what a page holds: where the browser keeps the work done on it, so
    work survives a reload and two different sheets never share it."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def render_page(title: str, css: str, body: str, data: Any, script: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{BASE_CSS}{css}</style></head>"
            f"<body>{body}<script id=\"page-data\" type=\"application/json\">{page_data(data)}</script>"
            f"<script>{BASE_JS}{script}</script></body></html>\n")


def check_classes(classes: Sequence[str], param: str = "classes") -> tuple[str, ...]:
    """A class list a person labels with: non-empty names, no duplicates, none of the reserved
    answers."""
    from ssl_blood.errors import UserError

    names = tuple(str(c).strip() for c in classes)
    if not names:
        raise UserError(f"`{param}` names no class; give the class names (`classes` a,b,c)", param=param)
    if any(not n for n in names):
        raise UserError(f"`{param}` holds an empty class name; remove the empty entry", param=param)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"`{param}` names class '{dup[0]}' twice; give each class once", param=param)
    reserved = [n for n in names if n.lower() in (UNSURE, NOT_A_CELL)]
    if reserved:
        raise UserError(f"`{param}`: '{reserved[0]}' is an answer every page offers, not a class; "
                        f"remove it", param=param)
    return names


BASE_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#222;background:#fafafa}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:8px 16px;
  display:flex;gap:16px;align-items:center;flex-wrap:wrap;z-index:2}
h1{font-size:17px;margin:0}
button{font:inherit;padding:4px 10px;border:1px solid #aaa;border-radius:4px;background:#fff;cursor:pointer}
button:hover{background:#eef}
button.on{background:#0072B2;color:#fff;border-color:#0072B2}
.cell-img{image-rendering:pixelated;border:1px solid #ccc;background:#fff}
.small{font-size:12px;color:#555}
.tile{display:inline-flex;flex-direction:column;align-items:center;margin:3px;padding:3px;
  border:2px solid transparent;border-radius:4px;cursor:pointer;width:76px;font-size:11px;
  overflow:hidden;vertical-align:top;background:#fff}
.tile img{width:64px;height:64px;object-fit:contain}
.tile.current{border-color:#0072B2}
.tile.done{background:#e8f3e8}
.tile.flag{background:#fff3e0}
.tile span{white-space:nowrap;overflow:hidden;text-overflow:ellipsis;max-width:74px}
kbd{border:1px solid #bbb;border-radius:3px;padding:0 3px;font-size:11px;background:#f4f4f4}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:2px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}
"""

# Shared by both pages: the data, element building with textContent only, CSV out, storage.
BASE_JS = r"""
const DATA = JSON.parse(document.getElementById('page-data').textContent);
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v; else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}
// RFC 4180: every field quoted, quotes doubled. Values are not altered (no formula defusing):
// the file is read back by ssl-blood, and a path must stay the path.
const csvField = (v) => '"' + String(v).replace(/"/g, '""') + '"';
const toCsv = (header, rows) => [header, ...rows].map((r) => r.map(csvField).join(',')).join('\r\n') + '\r\n';
function download(name, text) {
  const a = el('a', {href: URL.createObjectURL(new Blob([text], {type: 'text/csv'})), download: name});
  document.body.append(a); a.click(); a.remove();
}
// a prototype-less object: a cell named "__proto__" is an ordinary key
function loadWork() {
  const work = Object.create(null);
  try { Object.assign(work, JSON.parse(localStorage.getItem(DATA.storage) || '{}')); } catch (e) {}
  return work;
}
function saveWork(work) { try { localStorage.setItem(DATA.storage, JSON.stringify(work)); } catch (e) {} }
"""

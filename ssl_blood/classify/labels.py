"""Labels a person hands back: a CSV with a `label` column and an `id` or `path` column.

`select` writes this shape (path, and an empty label for a person to fill), so labelling is:
select -> fill in -> train-classifier. Class names are text. Rows with an empty label are cells
not labelled yet and are skipped. Read with the csv module, so a BOM, quoted commas and CRLF
line ends (a spreadsheet's export) are accepted.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ssl_blood.data.cells import CellData
from ssl_blood.errors import UserError
from ssl_blood.files import sha256_file


@dataclass(frozen=True)
class LabelTable:
    """Labelled cells named by `key` ("path" or "id"): keys[i] has class labels[i]."""

    path: str
    key: str
    keys: tuple[str, ...]
    labels: tuple[str, ...]
    lines: tuple[int, ...]  # the CSV line of each row, for messages
    sha256: str

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.labels)))


def read_labels(path: str | Path, allow_empty: bool = False) -> LabelTable:
    """The labelled rows of a labels CSV (see the module docstring); with `allow_empty`, a file
    that labels no cell yet (a fresh picks.csv) gives an empty table instead of an error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"`labels` {path}: no such file; give a CSV with a 'label' column and an "
                        f"'id' or 'path' column (ssl-blood select writes one)", param="labels")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = [(reader.line_num, {(k or "").strip(): (v or "").strip() for k, v in r.items()})
                    for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read `labels` {path} as a UTF-8 CSV ({exc}); save it as CSV",
                        param="labels") from None
    key = "path" if "path" in columns else "id" if "id" in columns else None
    if key is None or ("label" not in columns and not allow_empty):
        raise UserError(f"`labels` {path} needs a 'label' column and an 'id' or 'path' column "
                        f"(it has {', '.join(columns) or 'none'})", param="labels")
    seen: dict[str, tuple[str, int]] = {}
    for line, row in rows:
        cell, label = row.get(key, ""), row.get("label", "")
        if not label:
            continue  # not labelled (yet)
        if not cell:
            raise UserError(f"`labels` {path}: line {line} has a label but no {key}; fill it or "
                            f"delete the row", param="labels")
        if key == "id" and not cell.lstrip("-").isdigit():
            raise UserError(f"`labels` {path}: line {line} has id '{cell}'; ids are whole "
                            f"numbers", param="labels")
        if cell in seen and seen[cell][0] != label:
            raise UserError(f"`labels` {path}: {key} '{cell}' is labelled '{seen[cell][0]}' on "
                            f"line {seen[cell][1]} and '{label}' on line {line}; keep one",
                            param="labels")
        seen[cell] = (label, line)
    if not seen and not allow_empty:
        raise UserError(f"`labels` {path} labels no cell (every 'label' is empty); fill in some "
                        f"labels", param="labels")
    keys = tuple(seen)
    return LabelTable(str(path), key, keys, tuple(seen[k][0] for k in keys),
                      tuple(seen[k][1] for k in keys), sha256_file(path))


def apply_labels(data: CellData, table: LabelTable,
                 class_names: Sequence[str] | None = None) -> CellData:
    """`data` with the table's labels (they override the source's own; cells the table does not
    name become unlabelled). With `class_names` the class set is fixed (a class outside it is
    refused); else it is the table's, sorted."""
    names = tuple(class_names) if class_names is not None else table.class_names
    unknown = [(l, n) for l, n in zip(table.labels, table.lines) if l not in names]
    if unknown:
        raise UserError(f"`labels` {table.path}: class '{unknown[0][0]}' on line {unknown[0][1]} "
                        f"is not one of {', '.join(names)}", param="labels")
    if table.key == "path":
        if "path" not in data.metadata:
            raise UserError(f"`labels` {table.path} names cells by path but this data has no "
                            f"file paths (an npz); name them by 'id'", param="labels")
        position = {str(p): i for i, p in enumerate(data.metadata["path"])}
    else:
        position = {str(int(i)): r for r, i in enumerate(data.ids.tolist())}
    missing = [(k, n) for k, n in zip(table.keys, table.lines) if k not in position]
    if missing:
        raise UserError(f"`labels` {table.path}: line {missing[0][1]} names {table.key} "
                        f"'{missing[0][0]}', which is not a cell of the {data.split} split "
                        f"({len(missing)} such rows); fix the {table.key}s", param="labels")
    labels = np.full(len(data), -1, dtype=np.int64)
    for key, label in zip(table.keys, table.labels):
        labels[position[key]] = names.index(label)
    return data.with_labels(labels, names)

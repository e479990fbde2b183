"""A CSV manifest: a `path` column (relative to the CSV's folder, or absolute), optional `label`
(class name; empty = unlabelled) and `split` (train/val/test); other columns are kept as
per-cell metadata. Without a split column, labelled rows are split as a class folder is."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssl_blood import ui
from ssl_blood.data.catalogue import Catalogue, stratified_split
from ssl_blood.data.cells import SPLITS
from ssl_blood.data.sources import FileSource, register
from ssl_blood.errors import UserError


@register
@dataclass(frozen=True)
class ManifestSource(FileSource):
    """Cells as image files listed in a CSV (`path`)."""

    kind = "manifest"
    param = "manifest"
    metavar = "FILE.csv"
    help = "CSV with a 'path' column, optional 'label' and 'split'; other columns are kept as metadata"
    rank = 3

    @property
    def root(self) -> Path:
        return Path(self.path).parent

    def list_files(self) -> Catalogue:
        csv_path = Path(self.path)
        columns, rows = _read_rows(csv_path)
        base = csv_path.resolve().parent
        given = [r["path"].strip() for r in rows]
        paths = [str((base / g).resolve()) for g in given]
        _check_paths(csv_path, given, paths)
        present = np.array([Path(p).is_file() for p in paths])
        if not present.all():
            missing = [given[i] for i in np.flatnonzero(~present)]
            message = (f"{len(missing)} of {len(rows)} files named in {csv_path} do not exist "
                       f"(first: {', '.join(missing[:3])})")
            if not self.skip_missing:
                raise UserError(f"{message}; fix the paths or pass `skip_missing` to go on "
                                f"without them", param="manifest")
            ui.note(f"{message}; skipped")
        names_col = [(r.get("label") or "").strip() for r in rows]
        class_names = tuple(sorted({n for n in names_col if n}))
        labels = np.array([class_names.index(n) if n else -1 for n in names_col], dtype=np.int64)
        splits = _splits(csv_path, rows, labels, self.split_fractions, self.split_seed)
        extra = [c for c in columns if c not in ("path", "label", "split")]
        metadata = {c: [(r.get(c) or "").strip() for r in rows] for c in extra}
        catalogue = Catalogue(paths, labels, splits, class_names, "manifest", metadata)
        return catalogue.subset(present).ordered_by_split()


def _read_rows(csv_path: Path) -> tuple[list[str], list[dict]]:
    """The header and rows; a row with more or fewer cells than the header is refused by its
    line number (csv.DictReader would silently pad it or stash the extra cells under None)."""
    if not csv_path.is_file():
        raise UserError(f"`manifest` {csv_path}: no such file; give a CSV with a 'path' column",
                        param="manifest")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            cells = [(reader.line_num, row) for row in reader if row]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read `manifest` {csv_path} as CSV ({exc}); save it as UTF-8 CSV",
                        param="manifest") from None
    columns = [c.strip() for c in header]
    if "path" not in columns:
        raise UserError(f"`manifest` {csv_path} has no 'path' column (its header is "
                        f"{', '.join(columns) or 'empty'}); name the image column 'path'",
                        param="manifest")
    if not cells:
        raise UserError(f"`manifest` {csv_path} has a header but no rows; list one image per "
                        f"row under it", param="manifest")
    for line, row in cells:
        if len(row) != len(columns):
            raise UserError(f"`manifest` {csv_path}: line {line} has {len(row)} cells but the "
                            f"header has {len(columns)} columns; quote cells that contain commas "
                            f"or fix the row", param="manifest")
    return columns, [dict(zip(columns, row)) for _, row in cells]


def _check_paths(csv_path: Path, given: list[str], resolved: list[str]) -> None:
    empty = [i + 2 for i, g in enumerate(given) if not g]
    if empty:
        raise UserError(f"`manifest` {csv_path}: row {empty[0]} has an empty path ({len(empty)} "
                        f"such rows); fill or delete them", param="manifest")
    seen: dict[str, int] = {}
    for i, p in enumerate(resolved):
        if p in seen:
            raise UserError(f"`manifest` {csv_path}: '{given[i]}' is listed twice (rows "
                            f"{seen[p] + 2} and {i + 2}); each image may appear once",
                            param="manifest")
        seen[p] = i


def _splits(csv_path: Path, rows: list[dict], labels: np.ndarray, fractions, seed: int) -> np.ndarray:
    if "split" not in rows[0]:
        return stratified_split(labels, fractions, seed)
    given = np.array([(r.get("split") or "").strip().lower() for r in rows])
    bad = sorted(set(given) - set(SPLITS))
    if bad:
        raise UserError(f"manifest {csv_path}: unknown split name '{bad[0]}' "
                        f"({int(np.isin(given, bad).sum())} rows); use train, val or test",
                        param="manifest")
    if "train" not in set(given):
        raise UserError(f"`manifest` {csv_path} assigns no row to 'train'; pretraining needs "
                        f"training images", param="manifest")
    train_classes = set(labels[(given == "train") & (labels >= 0)].tolist())
    missing = sorted(set(labels[labels >= 0].tolist()) - train_classes)
    if missing:
        raise UserError(f"`manifest` {csv_path}: class {missing[0]} has labelled rows in val/test "
                        f"but none in train; every class needs training images",
                        param="manifest")
    return given

"""Where cell images come from: a registry of sources, each turning its files into `CellData`.

A source is one registered class (one module in this package, found automatically): its `kind`
(recorded in configs, checkpoints and embeddings), the Python parameter and command-line flag
that name it (`param`: `data_root`, `npz`, `image_dir`, `manifest`), how it lists its splits
and loads a split. The command line builds its data flags from this registry, and everything
downstream sees only `CellData`, whatever the source.

A source is recorded as a plain dict (`to_dict`) and rebuilt with `DataSource.from_dict`; what
it lists and decodes (a folder's catalogue, the decode cache, an npz's arrays) is kept on the
instance, so a command that passes its one source object around lists a million-file folder
and computes its cache key once.

Adding a source: one module here with a `@register`ed subclass of `DataSource` (or of
`FileSource`, for sources of image files, which then get decoding, the cache, sizes and
streaming for free) and a test. See docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ssl_blood import ui
from ssl_blood.data.catalogue import DEFAULT_FRACTIONS, Catalogue, check_fractions
from ssl_blood.data.cells import SPLITS, CellData, stratified_indices
from ssl_blood.errors import UserError

SIZE_RANGE = (16, 256)
DEFAULT_FOLDER_SIZE = 64  # at most; smaller images keep their own size
LAYOUTS = ("auto", "splits", "classes", "flat")


@dataclass(frozen=True)
class DataSource:
    """A source of cell images. Subclasses set `kind`, `param`, `metavar`, `help` and
    implement `splits` and `_load`."""

    path: str
    size: int = 28

    kind: ClassVar[str]
    param: ClassVar[str]  # the parameter (and, as --param, the flag) naming this source
    metavar: ClassVar[str]
    help: ClassVar[str]
    rank: ClassVar[int] = 9  # place in lists of sources (--help)

    # -- recorded form ------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = {"kind": self.kind, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                   if f.metadata.get("recorded", True)}}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @staticmethod
    def from_dict(d: dict) -> "DataSource":
        """The source a dict records (as `to_dict` wrote it)."""
        try:
            cls = source_class(str(d["kind"]))
            known = {f.name: f for f in dataclasses.fields(cls)}
            values = {k: v for k, v in d.items() if k in known and v is not None}
            values["path"], values["size"] = str(d["path"]), int(d["size"])
            if "split_fractions" in values:
                values["split_fractions"] = tuple(float(f) for f in values["split_fractions"])
            return cls(**values)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"the recorded data source {d!r} is damaged ({exc}); give the data "
                            f"again ({', '.join(f'`{c.param}`' for c in _SOURCES.values())})") from None

    # -- what every source answers ----------------------------------------------------

    @property
    def name(self) -> str:
        return Path(self.path).stem

    @property
    def has_file_paths(self) -> bool:
        """Its cells are image files with paths relative to the source (their names)."""
        return False

    def splits(self) -> tuple[str, ...]:
        """The splits the source holds, in train/val/test order."""
        raise NotImplementedError

    def load(self, split: str) -> CellData:
        """One whole split."""
        if split not in SPLITS or split not in self.splits():
            raise UserError(f"{self.path} has no '{split}' split (it has "
                            f"{', '.join(self.splits())}); choose one of those", param="split")
        return self._load(split)

    def _load(self, split: str) -> CellData:
        raise NotImplementedError

    def unreadable_files(self) -> list[str]:
        """Files the source lists but could not read (skipped)."""
        return []

    def with_size(self, size: int, **changes: Any) -> "DataSource":
        """The same source at another image size, keeping what was already listed."""
        other = dataclasses.replace(self, size=size, **changes)
        if "catalogue" in self.__dict__:
            other.__dict__["catalogue"] = self.__dict__["catalogue"]
        return other


_SOURCES: dict[str, type[DataSource]] = {}


def register(cls: type[DataSource]) -> type[DataSource]:
    """Class decorator: make a source buildable by its `kind` and selectable by its `param`."""
    _SOURCES[cls.kind] = cls
    return cls


def source_classes() -> list[type[DataSource]]:
    """The registered sources, in `rank` order."""
    return sorted(_SOURCES.values(), key=lambda c: (c.rank, c.kind))


def source_class(kind: str) -> type[DataSource]:
    if kind not in _SOURCES:
        raise KeyError(f"unknown source kind {kind!r}")
    return _SOURCES[kind]


# ----------------------------------------------------------------------------- file sources


@dataclass(frozen=True)
class FileSource(DataSource):
    """A source whose cells are image files: listed into a `Catalogue` (by the subclass's
    `list_files`), decoded once into the cache, split by split as contiguous slices."""

    size: int = 0  # 0 until resolved: the images' typical side
    # the side was guessed from the images (no `size` given): a backbone made for another reads
    # them at its own (EmbedderSpec.reads); not recorded, a recorded source's side is chosen
    size_guessed: bool = field(default=False, compare=False, metadata={"recorded": False})
    layout: str = "auto"
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    split_seed: int = 0
    skip_missing: bool = False
    cache_dir: str | None = field(default=None, compare=False)

    @property
    def has_file_paths(self) -> bool:
        return True

    @property
    def root(self) -> Path:
        """What cell paths are relative to."""
        return Path(self.path)

    @classmethod
    def resolve(cls, value: str, size: int | None, **options: Any) -> "FileSource":
        """The source at `size`, or at its images' typical side when `size` is None."""
        source = cls(str(Path(value).expanduser().resolve()), size or 0, **options)
        if not size:
            source = source.with_size(source.typical_size(), size_guessed=True)
            ui.note(f"images will be {source.size} px (their typical side, at most "
                    f"{DEFAULT_FOLDER_SIZE}; a checkpoint trained at another side reads them at "
                    f"its own); `size` chooses another")
        return source

    def with_size(self, size: int, size_guessed: bool = False) -> "FileSource":
        return super().with_size(size, size_guessed=size_guessed)

    def list_files(self) -> Catalogue:
        raise NotImplementedError

    @cached_property
    def catalogue(self) -> Catalogue:
        return self.list_files()

    def splits(self) -> tuple[str, ...]:
        return self.catalogue.present_splits()

    @cached_property
    def _decoded(self):
        from ssl_blood.data.decode import decode_catalogue

        decoded = decode_catalogue(self.catalogue, self.size, self.cache_dir, self.name)
        if not decoded.readable.any():
            raise UserError(f"none of the {len(self.catalogue)} images of {self.path} could be "
                            f"read; check that they are valid png/jpg/tif/bmp files",
                            param=self.param)
        skipped = self._unreadable(decoded)
        if skipped:
            shown = ", ".join(Path(p).name for p in skipped[:5])
            where = f"; all of them are listed in {decoded.unreadable_list}" if decoded.unreadable_list else ""
            ui.note(f"skipped {len(skipped)} unreadable image(s) of {len(self.catalogue)} in "
                    f"{self.path}: {shown}{', ...' if len(skipped) > 5 else ''}{where}")
        return decoded

    def unreadable_files(self) -> list[str]:
        decoded = self.__dict__.get("_decoded")
        return self._unreadable(decoded) if decoded is not None else []

    def _unreadable(self, decoded) -> list[str]:
        return [self.catalogue.paths[i] for i in np.flatnonzero(~decoded.readable)]

    def _load(self, split: str) -> CellData:
        decoded = self._decoded
        kept = self.catalogue.subset(decoded.readable)
        rows = np.flatnonzero(kept.splits == split)
        if not len(rows):
            raise UserError(f"no image of the '{split}' split of {self.path} could be read",
                            param=self.param)
        start, stop = int(rows[0]), int(rows[-1]) + 1  # contiguous: the catalogue is split-ordered
        paths = np.array([str(Path(p).relative_to(self.root)) if Path(p).is_relative_to(self.root)
                          else p for p in kept.paths[start:stop]])
        metadata = {"path": paths, **{k: np.array(v[start:stop]) for k, v in kept.metadata.items()}}
        return CellData(torch.from_numpy(decoded.images[start:stop]),
                        torch.from_numpy(kept.labels[start:stop].copy()), torch.arange(stop - start),
                        split, kept.class_names, self, metadata, decoded.file, start)

    def typical_size(self, sample: int = 64) -> int:
        """Median short side of a sample of the images (headers only), clipped to 16..64."""
        from ssl_blood.data.decode import image_side

        paths = self.catalogue.paths
        picks = np.random.default_rng(0).choice(len(paths), min(sample, len(paths)), replace=False)
        sides = [s for s in (image_side(paths[i]) for i in picks) if s is not None]
        side = int(np.median(sides)) if sides else DEFAULT_FOLDER_SIZE
        return int(np.clip(side, SIZE_RANGE[0], DEFAULT_FOLDER_SIZE))


# ----------------------------------------------------------------------------- choosing one


def resolve_source(data_root: str | None = None, npz: str | None = None,
                   image_dir: str | None = None, size: int | None = None, *,
                   manifest: str | None = None, **options: Any) -> DataSource:
    """The source one of the mutually exclusive parameters names (`data_root`, `npz`,
    `image_dir`, `manifest`, or any other registered source's parameter); none names the
    BloodMNIST root of $SSL_BLOOD_DATA_ROOT. `options` (layout, split_fractions, split_seed,
    skip_missing, cache_dir) apply to file sources. A file source's `size` defaults to the
    images' own side (median of a sample), at most 64 px."""
    given = {"data_root": data_root, "npz": npz, "image_dir": image_dir, "manifest": manifest}
    given.update({c.param: options.pop(c.param) for c in _SOURCES.values() if c.param in options})
    named = {p: v for p, v in given.items() if v is not None}
    if len(named) > 1:
        raise UserError(f"give only one of {', '.join(f'`{c.param}`' for c in source_classes())}",
                        param=tuple(named))
    if size is not None and not SIZE_RANGE[0] <= size <= SIZE_RANGE[1]:
        raise UserError(f"`size` {size} is outside {SIZE_RANGE[0]}-{SIZE_RANGE[1]} px; choose a "
                        f"size in that range", param="size")
    layout = options.get("layout") or "auto"
    if layout not in LAYOUTS:
        raise UserError(f"`layout` '{layout}' is not one of {', '.join(LAYOUTS)}", param="layout")
    options["split_fractions"] = check_fractions(options.get("split_fractions") or DEFAULT_FRACTIONS)
    param, value = next(iter(named.items())) if named else ("data_root", None)
    cls = next(c for c in _SOURCES.values() if c.param == param)
    return cls.resolve(value, size, **{k: v for k, v in options.items() if v is not None})


def load_split(source: DataSource, split: str, limit: int | None = None, seed: int = 0) -> CellData:
    """Load one split; with `limit`, a stratified subset of at most `limit` images."""
    data = source.load(split)
    if limit is not None:
        if limit < 1:
            raise UserError(f"`limit` {limit} must be a positive number of images", param="limit")
        data = data.subset(stratified_indices(data.labels.numpy(), limit, seed))
    return data


def available_splits(source: DataSource) -> tuple[str, ...]:
    """The splits a source holds, in train/val/test order."""
    return source.splits()


def default_split(source: DataSource, preferred: str = "test") -> str:
    """`preferred` where the source has it, else its only split (a flat folder's cells are all
    in train): a source without splits is used whole."""
    have = source.splits()
    return preferred if preferred in have else have[-1]


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_discover()

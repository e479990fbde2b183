"""Backbone features of cell images, and the embeddings file every analysis reads.

An `Embedder` turns uint8 images into feature vectors. Its `EmbedderSpec` travels with the
embeddings file and the index, so a query image later gets exactly the preprocessing the
gallery got, and results made from different embedders are never mixed up: `identity` names
what made the features (a checkpoint's SHA-256, or a baseline with a digest of its statistics).

embeddings.npz holds: features (N, D) (float32, or float16 with `dtype="float16"`), labels,
split, ids, class_names, embedder (the spec as JSON), subset (the `limit` and seed the cells
were drawn with, if any), coords (2-D UMAP per cell, optional) and per-cell metadata columns
(`meta:<name>`, e.g. file path, patient or slide id). L2-normalised features are derived on load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from ssl_blood.data import CellData, DataSource, channel_stats, load_split
from ssl_blood.device import resolve_device, uses_bf16
from ssl_blood.errors import RunFailed, UserError
from ssl_blood.model.inference import frozen_for_inference
from ssl_blood.files import atomic_write, sha256_bytes

if TYPE_CHECKING:
    from ssl_blood.model.checkpoint import TrainedBackbone

BASELINES = ("pixels", "random-init")
EMBEDDER_KINDS = ("checkpoint",) + BASELINES
FEATURE_DTYPES = ("float32", "float16")
EXPORT_FORMATS = ("npz", "csv", "parquet")
ADABN_MIN_CELLS = 32  # fewer cells give BatchNorm statistics noisier than the shift they correct


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class EmbedderSpec:
    """What an embedder is, in JSON-able form: enough to rebuild it and to recognise it."""

    kind: str  # "checkpoint", "pixels" or "random-init"
    identity: str  # "sha256:<checkpoint>", "pixels:<digest>", "random-init:<...>:<digest>"
    image_size: int
    channels: int
    num_classes: int
    source: dict
    input_size: int | None = None
    mean: list[float] | None = None  # per channel, for backbones
    std: list[float] | None = None
    backbone: str | None = None
    stem: str | None = None
    seed: int | None = None
    checkpoint: str | None = None  # path of the checkpoint file
    precision: str = "fp32"  # as it was trained: bf16 features on fast-bf16 CPUs and GPUs
    channels_last: bool = False
    pixel_mean: list[float] | None = field(default=None, repr=False)  # per pixel, for `pixels`
    pixel_std: list[float] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Any) -> "EmbedderSpec":
        known = {f.name for f in fields(cls)}
        try:
            spec = cls(**{k: v for k, v in d.items() if k in known})
        except (TypeError, AttributeError) as exc:
            raise UserError(f"the embedder recorded in the file is damaged ({exc}); re-run "
                            f"ssl-blood embed", param="embeddings") from None
        if spec.kind not in EMBEDDER_KINDS or not isinstance(spec.image_size, int):
            raise UserError(f"the embedder recorded in the file ({spec.kind!r}) is not one "
                            f"ssl-blood makes; re-run ssl-blood embed", param="embeddings")
        return spec

    def data_source(self) -> DataSource:
        """The data this embedder was made from: a checkpoint's training data, a baseline's
        data. The default data of every command given only a checkpoint or embeddings."""
        return DataSource.from_dict(self.source)

    def reads(self, source: DataSource | None) -> DataSource:
        """The data as this embedder reads it: `source` (default: `data_source`). A source
        whose side was guessed from its images (no `size` given) is read at this embedder's
        side, as the backbone was trained: a lab's 64-px crops through a 28-px checkpoint
        without the user having to know its size. A side the user chose is kept (and refused
        by `Embedder.check_images` if it does not fit)."""
        if source is None:
            return self.data_source()
        if getattr(source, "size_guessed", False) and source.size != self.image_size:
            from ssl_blood import ui

            ui.note(f"reading the images at {self.image_size} px, the side the backbone was "
                    f"trained at")
            return source.with_size(self.image_size)
        return source

    @property
    def label(self) -> str:
        """A short name for tables and plots."""
        if self.kind == "checkpoint":
            return f"{self.backbone} ({Path(self.checkpoint or '').parent.name})"
        if self.kind == "random-init":
            return f"random-init {self.backbone}"
        return "raw pixels"


def _stats_digest(*arrays: Sequence[float]) -> str:
    return sha256_bytes(*(np.asarray(a, dtype=np.float32).tobytes() for a in arrays))[:16]


class Embedder:
    """Images in, features out; `spec` rebuilds the same embedder elsewhere."""

    def __init__(self, spec: EmbedderSpec, model: nn.Module | None, device: torch.device,
                 trained: nn.Module | None = None):
        self.spec, self.model, self.device = spec, model, device
        self.trained = trained  # the backbone before BatchNorm folding (AdaBN re-estimates it)

    @property
    def identity(self) -> str:
        return self.spec.identity

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    @property
    def channels(self) -> int:
        return self.spec.channels

    @property
    def feature_precision(self) -> str:
        """The precision its features come out in here, "bf16" or "fp32": "auto" resolved, which
        on a CPU with AVX-512 BF16 but no AMX is a timing test and may differ between runs."""
        if self.spec.kind == "pixels":
            return "fp32"
        return "bf16" if uses_bf16(self.device, self.spec.precision) else "fp32"

    def in_precision(self, precision: str) -> "Embedder":
        """This embedder computing its features in `precision` (bf16, fp32 or auto)."""
        return Embedder(replace(self.spec, precision=precision), self.model, self.device, self.trained)

    def check_images(self, images: torch.Tensor, what: str = "the images") -> None:
        want = (self.channels, self.image_size, self.image_size)
        if tuple(images.shape[1:]) != want:
            raise UserError(f"{what} are {tuple(images.shape[1:])} (channels, height, width) but "
                            f"this embedder was made for {want}; give data of that shape (`size`, "
                            f"or a checkpoint trained on such data)", param="size")

    def __call__(self, images: torch.Tensor, progress: bool | None = False,
                 views: int = 1) -> np.ndarray:
        """(N, D) features of uint8 images (N, C, H, W); `views` > 1: a backbone's features
        averaged over that many dihedral transforms of each cell (model.inference.DIHEDRAL)."""
        from ssl_blood.model.inference import run_model

        self.check_images(images)
        spec = self.spec
        if spec.kind == "pixels":
            if views != 1:
                raise UserError("raw-pixel features have no views to average; use views 1",
                                param="views")
            mean = np.asarray(spec.pixel_mean, np.float32)
            std = np.asarray(spec.pixel_std, np.float32)
            out = np.empty((len(images), mean.size), dtype=np.float32)
            for start in range(0, len(images), 4096):  # chunks: images may be memory-mapped
                flat = images[start:start + 4096].reshape(-1, mean.size).float().div(255).numpy()
                out[start:start + 4096] = (flat - mean) / std
            return out
        return run_model(self.model, images, spec.mean, spec.std, int(spec.input_size),
                         self.device, precision=spec.precision, channels_last=spec.channels_last,
                         progress=progress, desc=f"embedding ({spec.label})", views=views)

    def adapted(self, images: torch.Tensor, progress: bool | None = False) -> "Embedder":
        """This embedder with its BatchNorm statistics re-estimated on `images` (AdaBN, Li et
        al. 2016): a slide from another stain or scanner normalised by its own statistics.
        Only a checkpoint's backbone has them; the weights stay as trained."""
        import copy

        from ssl_blood.model.inference import inference_batch

        if self.trained is None:
            raise UserError("AdaBN re-estimates a trained backbone's BatchNorm statistics; this "
                            "embedder has none", param="adapt")
        if len(images) < ADABN_MIN_CELLS:
            raise UserError(f"AdaBN needs at least {ADABN_MIN_CELLS} cells to estimate a slide's "
                            f"statistics, got {len(images)}; classify the slide without `adapt`",
                            param="adapt")
        self.check_images(images)
        model = copy.deepcopy(self.trained).to(self.device)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            raise UserError(f"the backbone {self.spec.backbone} has no BatchNorm to re-estimate; "
                            f"classify without `adapt`", param="adapt")
        for module in norms:
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over every cell of the slide
        model.train()
        spec, step = self.spec, inference_batch(int(self.spec.input_size))
        from ssl_blood import ui
        from ssl_blood.model.augment import eval_preprocess

        with torch.no_grad():
            for start in ui.bar(range(0, len(images), step), desc="AdaBN statistics",
                                unit="batch", enabled=progress):
                model(eval_preprocess(images[start:start + step].to(self.device), spec.mean,
                                      spec.std, int(spec.input_size)))
        return Embedder(spec, frozen_for_inference(model.eval()), self.device, model.eval())

    def batchnorm_statistics(self) -> dict[str, torch.Tensor]:
        """The trained backbone's BatchNorm running means and variances by buffer name (what
        `adapted` re-estimated), to be kept and given back to `with_batchnorm`."""
        if self.trained is None:
            return {}
        return {name: buffer.detach().cpu().clone() for name, buffer in self.trained.named_buffers()
                if name.endswith(("running_mean", "running_var"))}

    def with_batchnorm(self, statistics: dict[str, torch.Tensor]) -> "Embedder":
        """This embedder with BatchNorm statistics kept from an `adapted` one."""
        import copy

        model = copy.deepcopy(self.trained).to(self.device) if self.trained is not None else None
        buffers = dict(model.named_buffers()) if model is not None else {}
        if not buffers or set(statistics) - set(buffers):
            raise UserError("the kept BatchNorm statistics do not fit this backbone; train the "
                            "classifier again", param="classifier")
        with torch.no_grad():
            for name, value in statistics.items():
                buffers[name].copy_(value)
        return Embedder(self.spec, frozen_for_inference(model.eval()), self.device, model.eval())

    # -- constructors ---------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto",
                        data: bytes | None = None) -> "Embedder":
        """The embedder of a checkpoint file (`data`: its bytes, if the caller read them)."""
        from ssl_blood.model.checkpoint import load_backbone

        return cls.from_trained(load_backbone(path, data), str(Path(path).resolve()), device)

    @classmethod
    def from_trained(cls, trained: TrainedBackbone, checkpoint: str,
                     device: str = "auto") -> "Embedder":
        """The embedder of a backbone already loaded (`checkpoint`: where its file is or will
        be, e.g. a classifier's own backbone.pt)."""
        ds = trained.dataset
        spec = EmbedderSpec(
            kind="checkpoint", identity=f"sha256:{trained.sha256}", image_size=ds["image_size"],
            channels=ds["channels"], num_classes=ds["num_classes"], source=ds["source"],
            input_size=ds["input_size"], mean=ds["mean"], std=ds["std"], backbone=trained.name,
            stem=trained.stem, checkpoint=checkpoint, precision=trained.precision,
            channels_last=trained.channels_last)
        dev = resolve_device(device)
        return cls(spec, frozen_for_inference(trained.model).to(dev), dev, trained.model)

    @classmethod
    def baseline(cls, kind: str, train: CellData, backbone: str = "resnet18", seed: int = 0,
                 device: str = "auto", stem: str = "auto") -> "Embedder":
        """`pixels` or `random-init`, with statistics from the train split."""
        from ssl_blood.model.backbones import resolve_stem

        common = dict(image_size=train.image_size, channels=train.channels,
                      num_classes=train.num_classes, source=train.source.to_dict())
        if kind == "pixels":
            mean, std = _pixel_stats(train.images)
            spec = EmbedderSpec(kind="pixels", identity=f"pixels:{_stats_digest(mean, std)}",
                                pixel_mean=mean, pixel_std=std, **common)
            return cls(spec, None, torch.device("cpu"))
        if kind == "random-init":
            mean, std = channel_stats(train.images)
            stem = resolve_stem(stem, train.image_size)
            spec = EmbedderSpec(
                kind="random-init", identity=f"random-init:{backbone}:{stem}:seed{seed}:"
                f"{_stats_digest(mean, std)}", input_size=train.image_size, mean=mean, std=std,
                backbone=backbone, stem=stem, seed=seed, precision="auto", **common)
            return cls.from_spec(spec, device)
        raise UserError(f"unknown `baseline` '{kind}'; choose one of {', '.join(BASELINES)}",
                        param="baseline")

    @classmethod
    def from_spec(cls, spec: EmbedderSpec, device: str = "auto") -> "Embedder":
        """Rebuild an embedder from its spec; a checkpoint must still have the recorded hash."""
        if spec.kind == "checkpoint":
            path = Path(spec.checkpoint or "")
            if not path.is_file():
                raise UserError(f"the checkpoint {path} these embeddings were made with is gone; "
                                f"put it back or embed again", param="checkpoint")
            data = path.read_bytes()  # read once: the bytes checked are the bytes loaded
            if f"sha256:{sha256_bytes(data)}" != spec.identity:
                raise UserError(f"the checkpoint {path} changed since these embeddings were made "
                                f"(SHA-256 differs); re-run ssl-blood embed and index",
                                param="checkpoint")
            return cls.from_checkpoint(path, device, data)
        if spec.kind == "random-init":
            from ssl_blood.model.backbones import build_backbone

            torch.manual_seed(int(spec.seed or 0))
            model = build_backbone(spec.backbone, spec.channels, spec.stem or "s1").eval()
            dev = resolve_device(device)
            return cls(spec, frozen_for_inference(model).to(dev), dev)
        return cls(spec, None, torch.device("cpu"))


def _pixel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-pixel mean and std of uint8 images in [0, 1] units, in chunks."""
    n = len(images)
    total = np.zeros(int(np.prod(images.shape[1:])), dtype=np.float64)
    squares = np.zeros_like(total)
    for start in range(0, n, 4096):
        flat = images[start:start + 4096].reshape(-1, total.size).double().div(255).numpy()
        total += flat.sum(0)
        squares += (flat * flat).sum(0)
    mean = total / n
    std = np.sqrt(np.maximum(squares - n * mean * mean, 0) / max(n - 1, 1))
    return mean.astype(np.float32).tolist(), np.maximum(std, 1e-3).astype(np.float32).tolist()


# ----------------------------------------------------------------------------- the file


@dataclass
class Embeddings:
    """Contents of embeddings.npz (one row per image, splits concatenated)."""

    features: np.ndarray  # (N, D) float32 backbone features
    labels: np.ndarray  # (N,) int64, -1 when unknown
    split: np.ndarray  # (N,) str
    ids: np.ndarray  # (N,) int64, index within the split
    class_names: tuple[str, ...]
    embedder: EmbedderSpec
    subset: dict = field(default_factory=dict)  # {"limit": N, "seed": s} when a subset
    metadata: dict[str, np.ndarray] = field(default_factory=dict)  # per-cell strings
    coords: np.ndarray | None = None  # (N, 2) UMAP coordinates (NaN outside mapped splits)
    umap_params: dict = field(default_factory=dict)  # how `coords` were made

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, dtype=np.float32)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @cached_property
    def features_l2(self) -> np.ndarray:
        return l2_normalize(self.features)

    @property
    def identity(self) -> str:
        return self.embedder.identity

    @property
    def name(self) -> str:
        return self.embedder.label

    @property
    def source(self) -> DataSource:
        return self.embedder.data_source()

    def splits(self) -> list[str]:
        return list(dict.fromkeys(self.split.tolist()))

    def default_split(self, preferred: str = "test") -> str:
        """`preferred` where these embeddings hold it, else their last split (a flat folder's
        cells are all in train): commands default to all the cells of a source without splits."""
        have = self.splits()
        return preferred if preferred in have else have[-1]

    def split_images(self, split: str) -> np.ndarray | None:
        """uint8 images (N, C, H, W) of a split of the data these embeddings came from, indexed
        by id; None when that data cannot be loaded any more (moved, deleted)."""
        try:
            return load_split(self.source, split).images.numpy()
        except UserError:
            return None

    def mask(self, split: str) -> np.ndarray:
        mask = self.split == split
        if not mask.any():
            raise UserError(f"the embeddings hold no '{split}' split (they hold "
                            f"{', '.join(self.splits())}); embed it (`splits`)", param="split")
        return mask

    def select(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(features, labels, ids) of one split: views, not copies, when the split's rows are
        contiguous (as embed_splits writes them)."""
        rows = np.flatnonzero(self.mask(split))
        if rows[-1] - rows[0] + 1 == len(rows):
            part = slice(rows[0], rows[-1] + 1)
            return self.features[part], self.labels[part], self.ids[part]
        return self.features[rows], self.labels[rows], self.ids[rows]

    def save(self, path: str | Path, dtype: str = "float32") -> Path:
        if dtype not in FEATURE_DTYPES:
            raise UserError(f"`dtype` {dtype} is not one of {', '.join(FEATURE_DTYPES)}", param="dtype")
        arrays = dict(
            features=self.features.astype(dtype), labels=self.labels.astype(np.int64),
            split=self.split.astype(str), ids=self.ids.astype(np.int64),
            class_names=np.asarray(self.class_names, dtype=str),
            embedder=np.asarray(json.dumps(self.embedder.to_dict())),
            subset=np.asarray(json.dumps(self.subset)),
            **{f"meta:{k}": np.asarray(v, dtype=str) for k, v in self.metadata.items()})
        if self.coords is not None:
            arrays["coords"] = np.asarray(self.coords, dtype=np.float32)
            arrays["umap_params"] = np.asarray(json.dumps(self.umap_params))
        return atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | Path) -> "Embeddings":
        """Read and check an embeddings file: a damaged or hand-edited one is refused."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"`embeddings` {path}: no such file; make one with ssl-blood embed",
                            param="embeddings")
        try:
            with np.load(path, allow_pickle=False) as f:
                missing = {"features", "labels", "split", "ids", "class_names", "embedder"} - set(f.files)
                if missing:
                    raise UserError(f"{path} lacks {sorted(missing)}; it is not an ssl-blood "
                                    f"embeddings file: make one with ssl-blood embed",
                                    param="embeddings")
                emb = cls(f["features"].astype(np.float32), f["labels"], f["split"].astype(str),
                          f["ids"], tuple(str(c) for c in f["class_names"]),
                          EmbedderSpec.from_dict(json.loads(str(f["embedder"]))),
                          json.loads(str(f["subset"])) if "subset" in f.files else {},
                          {k[5:]: f[k].astype(str) for k in f.files if k.startswith("meta:")},
                          f["coords"].astype(np.float32) if "coords" in f.files else None,
                          json.loads(str(f["umap_params"])) if "umap_params" in f.files else {})
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"cannot read `embeddings` {path} ({type(exc).__name__}); the file is "
                            f"truncated or not an npz: re-run ssl-blood embed",
                            param="embeddings") from None
        emb.check(path)
        return emb

    def check(self, where: str | Path = "embeddings") -> None:
        """Shapes, types and values agree with each other (a hand-edited file may not)."""
        n = len(self.features)

        def refuse(what: str) -> UserError:
            return UserError(f"{where}: {what}; the file was edited or damaged: re-run ssl-blood "
                             f"embed", param="embeddings")

        if self.features.ndim != 2 or n == 0:
            raise refuse(f"features of shape {self.features.shape}, expected (N > 0, D)")
        for name in ("labels", "split", "ids"):
            if np.ndim(getattr(self, name)) != 1 or len(getattr(self, name)) != n:
                raise refuse(f"{name} has {len(getattr(self, name))} entries for {n} features")
        if not (np.issubdtype(self.labels.dtype, np.integer) and np.issubdtype(self.ids.dtype, np.integer)):
            raise refuse("labels and ids must be integers")
        self.labels, self.ids = self.labels.astype(np.int64), self.ids.astype(np.int64)
        if self.labels.min(initial=0) < -1 or self.labels.max(initial=-1) >= len(self.class_names):
            raise refuse(f"labels outside -1..{len(self.class_names) - 1}")
        if not np.isfinite(self.features).all():
            raise refuse("non-finite features")
        for name, column in self.metadata.items():
            if len(column) != n:
                raise refuse(f"metadata '{name}' has {len(column)} entries for {n} features")
        if self.coords is not None and self.coords.shape != (n, 2):
            raise refuse(f"coords of shape {self.coords.shape}, expected ({n}, 2)")
        for split in self.splits():
            ids = self.ids[self.split == split]
            if len(np.unique(ids)) != len(ids):
                raise refuse(f"repeated ids in split '{split}'")

    def table(self) -> "Any":
        """One row per cell: id, split, label, class name, metadata, then f0..f{D-1}
        (a pandas DataFrame, for CSV / parquet export)."""
        import pandas as pd

        names = np.asarray(list(self.class_names) + [""], dtype=object)
        columns: dict[str, Any] = {"id": self.ids, "split": self.split, "label": self.labels,
                                   "class_name": names[self.labels]}
        columns.update({(k if k not in columns else f"meta_{k}"): v for k, v in self.metadata.items()})
        frame = pd.DataFrame(columns)
        features = pd.DataFrame(self.features, columns=[f"f{i}" for i in range(self.dim)])
        return pd.concat([frame, features], axis=1)

    def export(self, path: str | Path, fmt: str = "npz", dtype: str = "float32") -> Path:
        """Write as ssl-blood's npz, or as a CSV / parquet table readable without ssl-blood."""
        if fmt not in EXPORT_FORMATS:
            raise UserError(f"`format` {fmt} is not one of {', '.join(EXPORT_FORMATS)}", param="format")
        if fmt == "npz":
            return self.save(path, dtype)
        table = self.table()
        if fmt == "csv":
            return atomic_write(path, lambda f: f.write(table.to_csv(index=False).encode()))
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UserError("parquet needs pyarrow: pip install 'ssl-blood[parquet]', or use "
                            "`format` csv", param="format") from None
        return atomic_write(path, lambda f: table.to_parquet(f, index=False))


def embed_splits(embedder: Embedder, source: DataSource, splits: Sequence[str],
                 limit: int | None = None, seed: int = 0, progress: bool | None = False) -> Embeddings:
    """Embed the given splits of a source into one Embeddings object."""
    parts = [load_split(source, s, limit, seed) for s in splits]
    for part in parts:
        embedder.check_images(part.images, f"the {part.split} images of {source.name}")
    class_names = next((p.class_names for p in parts if p.class_names), ())
    features = [embedder(p.images, progress=progress) for p in parts]
    if not all(np.isfinite(f).all() for f in features):  # weights that load but overflow
        raise RunFailed(f"{embedder.spec.identity} gives non-finite features on {source.name}; "
                        f"its weights are unusable (a diverged run): embed with another "
                        f"checkpoint")
    keys = sorted({k for p in parts for k in p.metadata})
    metadata = {k: np.concatenate([p.metadata.get(k, np.full(len(p), "")) for p in parts]).astype(str)
                for k in keys}
    spec = embedder.spec if embedder.spec.source == source.to_dict() else replace(
        embedder.spec, source=source.to_dict())
    return Embeddings(
        features=np.concatenate(features).astype(np.float32),
        labels=np.concatenate([p.labels.numpy() for p in parts]),
        split=np.concatenate([np.full(len(p), p.split) for p in parts]).astype(str),
        ids=np.concatenate([p.ids.numpy() for p in parts]),
        class_names=tuple(class_names),
        embedder=spec,
        subset={"limit": limit, "seed": seed} if limit is not None else {},
        metadata=metadata,
    )


def embed_checkpoint(checkpoint: str | Path, source: DataSource | None = None,
                     splits: Sequence[str] = ("train", "val", "test"), limit: int | None = None,
                     device: str = "auto", progress: bool | None = False) -> Embeddings:
    """Embed `splits` of `source` (default: the data the checkpoint was trained on) with a
    checkpoint's backbone. Any data of the checkpoint's channels works: a backbone pretrained on
    one dataset embeds a lab's own labelled cells (transfer), and the embeddings carry that
    data's own classes."""
    embedder = Embedder.from_checkpoint(checkpoint, device)
    return embed_splits(embedder, embedder.spec.reads(source), splits, limit,
                        progress=progress)


def embed(checkpoint: str | Path | None = None, baseline: str | None = None,
          source: DataSource | None = None, splits: Sequence[str] | None = None,
          limit: int | None = None, backbone: str | None = None, seed: int = 0,
          device: str = "auto", progress: bool | None = False) -> Embeddings:
    """Embeddings of `splits` (default: every split the data has) from a `checkpoint` (default
    data: its own, the checkpoint read once) or a `baseline` (pixels, random-init `backbone`)
    fitted on the train split of `source`."""
    from ssl_blood.data import available_splits

    if (checkpoint is None) == (baseline is None):
        raise UserError("give a `checkpoint` or a `baseline`", param=("checkpoint", "baseline"))
    if checkpoint is not None:
        embedder = Embedder.from_checkpoint(checkpoint, device)
        source = embedder.spec.reads(source)
    elif source is None:
        raise UserError("a `baseline` needs data to embed; give it", param="baseline")
    have = available_splits(source)
    wanted = list(splits or have)
    missing = [s for s in wanted if s not in have]
    if missing:
        raise UserError(f"the data has no '{missing[0]}' split (it has {', '.join(have)}); "
                        f"choose `splits` from those", param="splits")
    if baseline is not None:
        embedder = Embedder.baseline(baseline, load_split(source, "train", limit),
                                     backbone or "resnet18", seed, device)
    return embed_splits(embedder, source, wanted, limit, progress=progress)

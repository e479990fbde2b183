"""Backbone features of cell images, and the embeddings.npz file every analysis reads.

An `Embedder` turns uint8 images into feature vectors. It is built from a JSON-able spec that
travels with the embeddings file and the index, so a query image later gets exactly the
preprocessing the gallery got: a trained checkpoint (identified by its SHA-256), an untrained
backbone (`random-init`), or standardised raw pixels (`pixels`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ssl_blood.augment import eval_preprocess
from ssl_blood.data import CellData, DataSource, channel_stats, load_split
from ssl_blood.device import resolve_device
from ssl_blood.errors import UserError

BASELINES = ("pixels", "random-init")


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, mean: Sequence[float],
                     std: Sequence[float], input_size: int, device: torch.device,
                     batch_size: int = 1024, progress: bool = False) -> np.ndarray:
    """Backbone features (N, D) float32 of uint8 images (N, C, H, W), model in eval mode."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), disable=not progress, desc="embed",
                      leave=False):
        x = eval_preprocess(images[start:start + batch_size].to(device, non_blocking=True),
                            mean, std, input_size)
        with autocast:
            chunks.append(model(x).float().cpu())
    model.train(was_training)
    features = torch.cat(chunks) if chunks else torch.zeros(0, 0)
    return features.numpy().astype(np.float32, copy=False)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


# ----------------------------------------------------------------------------- embedders


def embedder_identity(spec: dict[str, Any]) -> str:
    """The checkpoint's SHA-256, or a stable name for a baseline ("random-init:resnet18:seed0")."""
    if spec["kind"] == "checkpoint":
        return spec["sha256"]
    if spec["kind"] == "random-init":
        return f"random-init:{spec['backbone']}:seed{spec['seed']}"
    return spec["kind"]


class Embedder:
    """Images in, features out; `spec` rebuilds the same embedder elsewhere."""

    def __init__(self, spec: dict[str, Any], model: nn.Module | None, device: torch.device):
        self.spec, self.model, self.device = spec, model, device

    @property
    def identity(self) -> str:
        return embedder_identity(self.spec)

    @property
    def image_size(self) -> int:
        return int(self.spec["image_size"])

    @property
    def channels(self) -> int:
        return int(self.spec["channels"])

    def __call__(self, images: torch.Tensor, progress: bool = False) -> np.ndarray:
        if images.shape[1:] != (self.channels, self.image_size, self.image_size):
            raise UserError(f"images of shape {tuple(images.shape[1:])} do not match the "
                            f"{self.channels}x{self.image_size}x{self.image_size} this embedder "
                            f"was built for")
        if self.spec["kind"] == "pixels":
            flat = images.reshape(len(images), -1).float().div(255).numpy()
            return ((flat - np.asarray(self.spec["pixel_mean"], np.float32))
                    / np.asarray(self.spec["pixel_std"], np.float32)).astype(np.float32)
        return extract_features(self.model, images, self.spec["mean"], self.spec["std"],
                                int(self.spec["input_size"]), self.device, progress=progress)

    # -- constructors ---------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto") -> "Embedder":
        from ssl_blood.checkpoint import load_backbone

        trained = load_backbone(path)
        ds = trained.dataset
        spec = {"kind": "checkpoint", "checkpoint": str(Path(path).resolve()),
                "sha256": trained.sha256, "backbone": trained.name,
                "input_size": ds["input_size"], "image_size": ds["image_size"],
                "channels": ds["channels"], "mean": ds["mean"], "std": ds["std"],
                "num_classes": ds["num_classes"], "source": ds["source"]}
        dev = resolve_device(device)
        return cls(spec, trained.model.to(dev), dev)

    @classmethod
    def baseline(cls, kind: str, train: CellData, backbone: str = "resnet18", seed: int = 0,
                 device: str = "auto") -> "Embedder":
        """`pixels` or `random-init`, with statistics from the train split."""
        common = {"image_size": train.image_size, "channels": train.channels,
                  "source": train.source.to_dict(), "num_classes": train.num_classes}
        if kind == "pixels":
            flat = train.images.reshape(len(train), -1).float().div(255)
            spec = {"kind": "pixels", "pixel_mean": flat.mean(0).tolist(),
                    "pixel_std": flat.std(0).clamp_min(1e-3).tolist(), **common}
            return cls(spec, None, torch.device("cpu"))
        if kind == "random-init":
            mean, std = channel_stats(train.images)
            spec = {"kind": "random-init", "backbone": backbone, "seed": seed,
                    "input_size": train.image_size, "mean": mean, "std": std, **common}
            return cls.from_spec(spec, device)
        raise UserError(f"unknown --baseline '{kind}'; choose one of {', '.join(BASELINES)}")

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device: str = "auto") -> "Embedder":
        """Rebuild an embedder from its spec; a checkpoint must still have the recorded hash."""
        kind = spec.get("kind")
        if kind == "checkpoint":
            from ssl_blood.checkpoint import sha256_file

            path = Path(spec["checkpoint"])
            if not path.is_file():
                raise UserError(f"the checkpoint {path} recorded with these embeddings is gone; "
                                f"put it back or rebuild the index from new embeddings")
            if sha256_file(path) != spec["sha256"]:
                raise UserError(f"the checkpoint {path} changed since these embeddings were made "
                                f"(SHA-256 differs); re-run ssl-blood embed and index")
            return cls.from_checkpoint(path, device)
        if kind == "random-init":
            from ssl_blood.models import build_backbone

            torch.manual_seed(int(spec["seed"]))
            model = build_backbone(spec["backbone"], int(spec["channels"])).eval()
            dev = resolve_device(device)
            return cls(spec, model.to(dev), dev)
        if kind == "pixels":
            return cls(spec, None, torch.device("cpu"))
        raise UserError(f"unknown embedder kind {kind!r} in the file's metadata; re-run ssl-blood embed")


# ----------------------------------------------------------------------------- file


@dataclass
class Embeddings:
    """Contents of embeddings.npz (one row per image, splits concatenated)."""

    features: np.ndarray  # (N, D) float32 backbone features
    labels: np.ndarray  # (N,) int64, -1 when unknown
    split: np.ndarray  # (N,) str
    ids: np.ndarray  # (N,) int64, index within the split
    class_names: tuple[str, ...]
    embedder: dict[str, Any]  # the Embedder spec (checkpoint path + hash, or baseline)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def features_l2(self) -> np.ndarray:
        return l2_normalize(self.features)

    @property
    def checkpoint_sha256(self) -> str:
        return embedder_identity(self.embedder)

    @property
    def name(self) -> str:
        """A short label for tables and plots."""
        if self.embedder["kind"] == "checkpoint":
            return f"{self.embedder['backbone']} ({Path(self.embedder['checkpoint']).parent.name})"
        if self.embedder["kind"] == "random-init":
            return f"random-init {self.embedder['backbone']}"
        return "raw pixels"

    def splits(self) -> list[str]:
        return list(dict.fromkeys(self.split.tolist()))

    def select(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(features, labels, ids) of one split."""
        mask = self.split == split
        if not mask.any():
            raise UserError(f"the embeddings hold no '{split}' split (they hold "
                            f"{', '.join(self.splits())}); embed it with --splits")
        return self.features[mask], self.labels[mask], self.ids[mask]

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, features=self.features.astype(np.float32),
                 features_l2=self.features_l2, labels=self.labels.astype(np.int64),
                 split=self.split.astype(str), ids=self.ids.astype(np.int64),
                 class_names=np.asarray(self.class_names, dtype=str),
                 checkpoint_sha256=np.asarray(self.checkpoint_sha256),
                 backbone=np.asarray(self.embedder.get("backbone", "pixels")),
                 image_size=np.asarray(self.embedder["image_size"]),
                 embedder=np.asarray(json.dumps(self.embedder)))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "Embeddings":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"--embeddings {path}: no such file; make one with ssl-blood embed")
        try:
            with np.load(path, allow_pickle=False) as f:
                missing = {"features", "labels", "split", "ids", "class_names", "embedder"} - set(f.files)
                if missing:
                    raise UserError(f"{path} lacks {sorted(missing)}; it is not an ssl-blood "
                                    f"embeddings file: make one with ssl-blood embed")
                emb = cls(f["features"].astype(np.float32), f["labels"].astype(np.int64),
                          f["split"].astype(str), f["ids"].astype(np.int64),
                          tuple(str(c) for c in f["class_names"]), json.loads(str(f["embedder"])))
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"cannot read embeddings {path} ({type(exc).__name__}); the file is "
                            f"truncated or not an npz: re-run ssl-blood embed") from None
        if emb.features.ndim != 2 or len(emb.features) != len(emb.labels):
            raise UserError(f"{path}: features of shape {emb.features.shape} do not match "
                            f"{len(emb.labels)} labels; re-run ssl-blood embed")
        return emb


def embed_splits(embedder: Embedder, source: DataSource, splits: Sequence[str],
                 limit: int | None = None, seed: int = 0, progress: bool = False) -> Embeddings:
    """Embed the given splits of a source into one Embeddings object."""
    parts = [load_split(source, s, limit, seed) for s in splits]
    class_names = next((p.class_names for p in parts if p.class_names), ())
    features = [embedder(p.images, progress=progress) for p in parts]
    return Embeddings(
        features=np.concatenate(features).astype(np.float32),
        labels=np.concatenate([p.labels.numpy() for p in parts]),
        split=np.concatenate([np.full(len(p), p.split) for p in parts]).astype(str),
        ids=np.concatenate([p.ids.numpy() for p in parts]),
        class_names=tuple(class_names),
        embedder=embedder.spec,
    )

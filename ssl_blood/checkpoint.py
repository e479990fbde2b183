"""checkpoint.pt: tensors and plain Python values only, so `torch.load(weights_only=True)` works.

Keys: format_version, ssl_blood_version, config (PretrainConfig as a dict), dataset (name, source,
num_classes, class_names, image_size, input_size, channels, mean, std), backbone_name,
backbone (state_dict of the backbone that is evaluated: DINO's teacher), method (state_dict of
the whole method: heads, teacher, loss centre), optimizer, epoch (completed epochs), rng.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_blood.errors import UserError

FORMAT_VERSION = 1


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file beside `path`, then rename: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(value: Any, path: str | Path) -> Path:
    """`value` as indented JSON with a final newline (the format of every ssl-blood results
    file), creating the parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a checkpoint written by `ssl-blood pretrain`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--checkpoint {path}: no such file; give the checkpoint.pt of a "
                        f"pretraining run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise UserError(f"cannot read checkpoint {path} ({type(exc).__name__}); it is truncated "
                        f"or not an ssl-blood checkpoint") from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise UserError(f"{path} is not an ssl-blood checkpoint (no format_version); give the "
                        f"checkpoint.pt written by ssl-blood pretrain")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise UserError(f"{path} has format version {ckpt['format_version']}, newer than this "
                        f"ssl-blood understands ({FORMAT_VERSION}); upgrade ssl-blood")
    return ckpt


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class TrainedBackbone:
    """A backbone restored from a checkpoint, with what is needed to feed it images."""

    model: nn.Module
    name: str
    dataset: dict[str, Any]
    config: dict[str, Any]
    sha256: str

    @property
    def input_size(self) -> int:
        return int(self.dataset["input_size"])


def load_backbone(path: str | Path) -> TrainedBackbone:
    """The evaluation backbone of a checkpoint, in eval mode on the CPU."""
    from ssl_blood.models import build_backbone

    ckpt = load_checkpoint(path)
    model = build_backbone(ckpt["backbone_name"], int(ckpt["dataset"]["channels"]))
    model.load_state_dict(ckpt["backbone"])
    model.eval()
    return TrainedBackbone(model, ckpt["backbone_name"], ckpt["dataset"], ckpt["config"],
                           sha256_file(path))


def export_backbone(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the evaluation backbone's plain state_dict (loadable without ssl-blood)."""
    ckpt = load_checkpoint(checkpoint)
    out = Path(out)
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as backbone.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(ckpt["backbone"], out)
    return {"backbone": ckpt["backbone_name"], "out": str(out),
            "parameters": sum(t.numel() for t in ckpt["backbone"].values()),
            "input_size": ckpt["dataset"]["input_size"], "mean": ckpt["dataset"]["mean"],
            "std": ckpt["dataset"]["std"]}

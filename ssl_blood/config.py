"""Pretraining configuration: one dataclass, named presets, saved as JSON beside every run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ssl_blood.augment import AugmentConfig
from ssl_blood.checkpoint import write_json
from ssl_blood.errors import UserError
from ssl_blood.methods import METHOD_NAMES, DINOConfig, SimCLRConfig

PRESETS = ("quick", "full")
OPTIMIZERS = ("lars", "sgd", "adamw")
AUGMENT_PIPELINES = ("device", "cpu")
# Settings that may change when a run is resumed: they do not change what is computed.
RUNTIME_FIELDS = frozenset({"device", "compile", "num_workers", "knn_every", "preset",
                            "precision", "channels_last"})


@dataclass
class PretrainConfig:
    """Everything that determines a pretraining run (with the data it reads)."""

    method: str = "simclr"
    preset: str = "full"
    backbone: str = "resnet18"
    epochs: int = 200
    batch_size: int = 512  # global batch (split across DDP ranks)
    optimizer: str = "lars"
    lr: float = 0.4  # at batch 256, scaled linearly with the global batch (solo-learn CIFAR recipe)
    weight_decay: float = 1e-5
    warmup_epochs: int = 10
    final_lr_ratio: float = 0.0  # cosine decay ends at lr * final_lr_ratio
    input_size: int | None = None  # side of the views the model sees; None = the image size
    augment_pipeline: str = "device"  # "device": batched on the training device; "cpu": lightly PIL
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    data: dict = field(default_factory=lambda: {"kind": "bloodmnist", "path": "", "size": 28})
    limit: int | None = None
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    precision: str = "auto"  # bf16 autocast on CUDA and on CPUs with fast bf16; "fp32" / "bf16" force
    channels_last: bool = True  # NHWC activations: faster on GPUs and for the plain CNN on CPUs
    num_workers: int = 0  # DataLoader workers for augment_pipeline="cpu"
    knn_every: int = 10  # epochs between kNN checks on val (0 = only at the end, -1 = never)
    knn_k: int = 20
    knn_temperature: float = 0.07

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PretrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown config keys {sorted(unknown)}; known keys: {sorted(known)}")
        d = dict(d)
        d["augment"] = AugmentConfig.from_dict(d.get("augment", {}))
        d["simclr"] = SimCLRConfig(**d.get("simclr", {}))
        d["dino"] = DINOConfig(**d.get("dino", {}))
        return cls(**d)

    def save(self, path: str | Path) -> None:
        write_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> "PretrainConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise UserError(f"cannot read config {path} ({exc}); give a config.json written by "
                            f"ssl-blood pretrain") from None

    def validate(self) -> "PretrainConfig":
        from ssl_blood.models import backbone_names

        checks = [
            (self.method in METHOD_NAMES, f"unknown method '{self.method}'; choose one of {', '.join(METHOD_NAMES)}"),
            (self.preset in PRESETS, f"unknown preset '{self.preset}'; choose one of {', '.join(PRESETS)}"),
            (self.backbone in backbone_names(), f"unknown backbone '{self.backbone}'; choose one of {', '.join(backbone_names())}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer '{self.optimizer}'; choose one of {', '.join(OPTIMIZERS)}"),
            (self.augment_pipeline in AUGMENT_PIPELINES, f"unknown --augment '{self.augment_pipeline}'; choose device or cpu"),
            (self.epochs >= 1, f"--epochs {self.epochs} must be at least 1"),
            (self.batch_size >= 2, f"--batch-size {self.batch_size} must be at least 2 (contrastive pairs)"),
            (self.lr > 0, f"--lr {self.lr} must be positive"),
            (0 <= self.warmup_epochs <= self.epochs, f"warmup_epochs {self.warmup_epochs} must be between 0 and --epochs {self.epochs}"),
            (self.input_size is None or self.input_size >= 8, f"--input-size {self.input_size} must be at least 8 px"),
            (self.limit is None or self.limit >= 2, f"--limit {self.limit} must be at least 2"),
            (self.precision in ("auto", "bf16", "fp32"), f"--precision {self.precision}: use auto, bf16 or fp32"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), f"--device {self.device}: use auto, cpu or cuda"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively: the JSON (and torch weights_only) friendly form."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def parse_settings(items: list[str]) -> dict[str, Any]:
    """`--set section.key=value` items -> {dotted key: value}; values parse as JSON when they
    do (numbers, lists, booleans), else stay strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: write KEY=VALUE, e.g. --set augment.hue=0.1")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def apply_settings(cfg: PretrainConfig, settings: dict[str, Any]) -> PretrainConfig:
    """A copy of `cfg` with dotted settings applied ({"augment.hue": 0.1}); unknown keys refused."""
    tree = cfg.to_dict()
    for dotted, value in settings.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise UserError(f"--set {dotted}: '{part}' is not a config section; see a run's config.json")
            node = node[part]
        if leaf not in node:
            raise UserError(f"--set {dotted}: no such setting; see a run's config.json for the keys")
        node[leaf] = value
    return PretrainConfig.from_dict(tree)


def preset_config(preset: str, method: str = "simclr") -> PretrainConfig:
    """The named preset for a method.

    quick: sized for a 2-core CPU, under 10 minutes (measured: docs/results.md). SimCLR trains the
    wide plain CNN for 8 epochs (on val, width beat epochs: experiments/results/
    quick_preset_search.json); DINO, whose steps cost ~2.4x more, the narrow one for 12 epochs.
    full: ResNet-18 with the small-image stem, 200 epochs, batch 512; meant for a GPU.
    """
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    if method not in METHOD_NAMES:
        raise UserError(f"unknown method '{method}'; choose one of {', '.join(METHOD_NAMES)}")
    if preset == "quick":
        backbone, epochs = ("cnn6-wide", 8) if method == "simclr" else ("cnn6", 12)
        cfg = PretrainConfig(method=method, preset=preset, backbone=backbone, epochs=epochs,
                             batch_size=256, optimizer="lars", lr=0.6, weight_decay=1e-5,
                             warmup_epochs=1, knn_every=4)
    else:
        cfg = PretrainConfig(method=method, preset=preset)
    if method == "dino":
        # DINO's global crops cover more of the cell than SimCLR's; local crops see the parts
        cfg = replace(cfg, augment=replace(cfg.augment, crop_scale=(0.35, 1.0)))
    return cfg

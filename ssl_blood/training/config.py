"""Pretraining configuration: one dataclass, named presets, saved as JSON beside every run.

The chosen method's settings form a section named after it (`"simclr": {...}`), built from the
method's own `Config` dataclass, so a new method brings its section with it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ssl_blood.model.augment import AugmentConfig
from ssl_blood.errors import UserError
from ssl_blood.features.neighbours import KNN_K, KNN_TEMPERATURE
from ssl_blood.methods import default_method_config, method_class, method_names
from ssl_blood.model.backbones import STEMS

PRESETS = ("quick", "standard", "full")
OPTIMIZERS = ("lars", "sgd", "adamw")
PRECISIONS = ("auto", "bf16", "fp32")
STREAMING = ("auto", "memory", "stream")
BLOODMNIST_TRAIN = 11_959  # the presets' epochs are sized for this many training images
# Settings that may change when a run is resumed: they do not change what is computed.
RUNTIME_FIELDS = frozenset({"device", "compile", "knn_every", "preset", "channels_last", "stream"})


@dataclass
class PretrainConfig:
    """Everything that determines a pretraining run (with the data it reads)."""

    method: str = "simclr"
    preset: str = "full"
    backbone: str = "resnet18"
    stem: str = "auto"  # downsampling before the body; auto: by input size (see models.py)
    epochs: int = 200
    batch_size: int = 512  # global batch (split across DDP ranks)
    optimizer: str = "lars"
    lr: float = 0.4  # at batch 256, scaled linearly with the real global batch
    weight_decay: float = 1e-5
    # LARS trust coefficient eta (lightly's default, used by every preset): each weight
    # matrix's step is lr * eta * |w| / (|grad| + wd |w|); biases and norms are not adapted.
    lars_trust_coefficient: float = 0.001
    warmup_epochs: int = 10
    final_lr_ratio: float = 0.0  # cosine decay ends at lr * final_lr_ratio
    input_size: int | None = None  # side of the views the model sees; None = the image size
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    method_config: Any = None  # the method's Config; None = its defaults
    data: dict = field(default_factory=lambda: {"kind": "bloodmnist", "path": "", "size": 28})
    limit: int | None = None
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    precision: str = "auto"  # bf16 autocast on CUDA and on CPUs with fast bf16; "fp32" / "bf16" force
    channels_last: bool = True  # NHWC activations: faster on GPUs and for the plain CNN on CPUs
    stream: str = "auto"  # train split on the device ("memory") or read per batch ("stream")
    knn_every: int = 10  # epochs between kNN checks on val (0 = only at the end, -1 = never)
    minutes: float | None = None  # a time budget: epochs are sized to it when the run starts
    knn_k: int = KNN_K
    knn_temperature: float = KNN_TEMPERATURE

    def __post_init__(self) -> None:
        if self.method_config is None and self.method in method_names():
            self.method_config = default_method_config(self.method)

    # -- JSON -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "method_config"}
        d["augment"] = asdict(self.augment)
        d[self.method] = asdict(self.method_config) if self.method_config is not None else {}
        return _plain(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PretrainConfig":
        """A config from its JSON form; unknown keys and wrongly typed values are refused."""
        if not isinstance(d, dict):
            raise UserError(f"a config is a JSON object, not {type(d).__name__}", param="config")
        d = _migrate(dict(d))
        method = d.get("method", "simclr")
        if not isinstance(method, str):
            raise UserError(f"`method` {method!r} must be a name", param="method")
        method_cls = method_class(method)
        known = {f.name for f in fields(cls)} - {"method_config"}
        unknown = set(d) - known - {method}
        if unknown:
            raise UserError(f"unknown config keys {sorted(unknown)}; known keys: "
                            f"{sorted(known | {method})}", param="config")
        section = d.pop(method, {})
        d["augment"] = _build(AugmentConfig, d.get("augment", {}), "augment")
        d["method_config"] = _build(method_cls.Config, section, method)
        top = {k: v for k, v in d.items() if k not in ("augment", "method_config")}
        _check_types(cls, top, "")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        from ssl_blood.files import write_json

        write_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> "PretrainConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read `config` {path} ({exc}); give a config.json written by "
                            f"ssl-blood pretrain", param="config") from None

    # -- checks -----------------------------------------------------------------------

    def validate(self) -> "PretrainConfig":
        """Refuse settings that cannot train: names, ranges, finite positive numbers."""
        from ssl_blood.model.backbones import backbone_names

        def finite_positive(value: float) -> bool:
            return math.isfinite(value) and value > 0

        checks = [
            (self.preset in PRESETS, "preset", f"unknown preset '{self.preset}'; choose one of {', '.join(PRESETS)}"),
            (self.backbone in backbone_names(), "backbone", f"unknown `backbone` '{self.backbone}'; choose one of {', '.join(backbone_names())}"),
            (self.stem in STEMS, "stem", f"`stem` '{self.stem}' is not one of {', '.join(STEMS)}"),
            (self.optimizer in OPTIMIZERS, "optimizer", f"unknown `optimizer` '{self.optimizer}'; choose one of {', '.join(OPTIMIZERS)}"),
            (self.epochs >= 1, "epochs", f"`epochs` {self.epochs} must be at least 1"),
            (self.batch_size >= 2, "batch_size", f"`batch_size` {self.batch_size} must be at least 2 (contrastive pairs)"),
            (finite_positive(self.lr), "lr", f"`lr` {self.lr} must be a finite positive number"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", f"`weight_decay` {self.weight_decay} must be a finite number >= 0"),
            (finite_positive(self.lars_trust_coefficient), "lars_trust_coefficient", f"`lars_trust_coefficient` {self.lars_trust_coefficient} must be a finite positive number"),
            (0 <= self.warmup_epochs <= self.epochs, "warmup_epochs", f"`warmup_epochs` {self.warmup_epochs} must be between 0 and `epochs` {self.epochs}"),
            (math.isfinite(self.final_lr_ratio) and 0 <= self.final_lr_ratio <= 1, "final_lr_ratio", f"`final_lr_ratio` {self.final_lr_ratio} must be in [0, 1]"),
            (self.input_size is None or 8 <= self.input_size <= 512, "input_size", f"`input_size` {self.input_size} must be 8-512 px"),
            (self.limit is None or self.limit >= 2, "limit", f"`limit` {self.limit} must be at least 2"),
            (self.precision in PRECISIONS, "precision", f"`precision` {self.precision}: use {', '.join(PRECISIONS)}"),
            (self.stream in STREAMING, "stream", f"`stream` {self.stream}: use {', '.join(STREAMING)}"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device", f"`device` {self.device}: use auto, cpu or cuda"),
            (self.knn_k >= 1 and math.isfinite(self.knn_temperature) and self.knn_temperature > 0, "knn_k", f"`knn_k` {self.knn_k} must be >= 1 and `knn_temperature` {self.knn_temperature} > 0"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise UserError(message, param=param)
        _check_numbers(self.augment, "augment")
        _check_numbers(self.method_config, self.method)
        return self


def _migrate(d: dict[str, Any]) -> dict[str, Any]:
    """Configs of older checkpoints: the lightly PIL pipeline keys are gone (it moved to
    experiments/), each method migrates its own section (`Method.migrate_config`), and a
    section of a method the run does not use is dropped."""
    for obsolete in ("augment_pipeline", "num_workers"):
        d.pop(obsolete, None)
    if d.get("method") in method_names():
        d = method_class(d["method"]).migrate_config(d)
    for name in method_names():
        if d.get("method") != name:
            d.pop(name, None)
    return d


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively: the JSON (and torch weights_only) friendly form."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, values: Any, section: str) -> Any:
    """A config dataclass from a JSON object, keys and types checked."""
    if not isinstance(values, dict):
        raise UserError(f"config section `{section}` must be an object, not {values!r}",
                        param=section)
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise UserError(f"unknown keys {sorted(unknown)} in config section `{section}`; known: "
                        f"{sorted(known)}", param=section)
    _check_types(cls, values, f"{section}.")
    hints = typing.get_type_hints(cls)
    converted = {k: tuple(v) if typing.get_origin(hints[k]) is tuple else v for k, v in values.items()}
    return cls(**converted)


def _type_ok(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        return (isinstance(value, (list, tuple)) and len(value) == len(args)
                and all(_type_ok(v, a) for v, a in zip(value, args)))
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True  # Any


def _check_types(cls: type, values: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key in hints and not _type_ok(value, hints[key]):
            expected = getattr(hints[key], "__name__", None) or str(hints[key]).replace("typing.", "")
            raise UserError(f"`{prefix}{key}`={json.dumps(value)} is not a valid {expected}; see a "
                            f"run's config.json for the form", param=f"{prefix}{key}")


def _check_numbers(section: Any, name: str) -> None:
    """Every number of a section must be finite; probabilities in [0, 1], sizes positive."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        items = value if isinstance(value, tuple) else (value,)
        for v in items:
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"`{name}.{f.name}`={v} must be finite", param=f"{name}.{f.name}")
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0 and f.name != "local_size":
                raise UserError(f"`{name}.{f.name}`={v} must not be negative", param=f"{name}.{f.name}")
        if (f.name.endswith("_prob") or f.name in ("hflip", "vflip", "grayscale")) and not 0 <= value <= 1:
            raise UserError(f"`{name}.{f.name}`={value} is a probability: give 0-1",
                            param=f"{name}.{f.name}")
        if f.name.endswith("scale") and isinstance(value, tuple) and not (0 < value[0] <= value[1] <= 1):
            raise UserError(f"`{name}.{f.name}`={list(value)} must satisfy 0 < low <= high <= 1",
                            param=f"{name}.{f.name}")


# ----------------------------------------------------------------------------- --set


def parse_settings(items: list[str]) -> dict[str, Any]:
    """`section.key=value` items -> {dotted key: value}; values parse as JSON when they do
    (numbers, lists, booleans, null), else stay strings (types are checked when applied)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"`set` {item!r}: write KEY=VALUE, e.g. augment.hue=0.1", param="set")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def apply_settings(cfg: PretrainConfig, settings: dict[str, Any]) -> PretrainConfig:
    """A copy of `cfg` with dotted settings applied ({"augment.hue": 0.1}); unknown keys and
    wrongly typed values refused."""
    tree = cfg.to_dict()
    for dotted, value in settings.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                hint = (f" (this run's method is {cfg.method})"
                        if part in method_names() and part != cfg.method else "")
                raise UserError(f"`set` {dotted}: '{part}' is not a config section{hint}; see a "
                                f"run's config.json", param="set")
            node = node[part]
        if leaf not in node:
            raise UserError(f"`set` {dotted}: no such setting; see a run's config.json for the "
                            f"keys", param="set")
        node[leaf] = value
    try:
        return PretrainConfig.from_dict(tree)
    except UserError as exc:  # say that the bad value came from a setting
        raise UserError(f"`set` {str(exc).replace('`', '')}", param="set") from None


# ----------------------------------------------------------------------------- presets


def default_preset(device_type: str) -> str:
    """The preset a run gets when none is named: full on a GPU, quick on a CPU."""
    return "full" if device_type == "cuda" else "quick"


def preset_config(preset: str, method: str = "simclr") -> PretrainConfig:
    """The named preset for a method: the method's own recipe (`Method.preset`) over the
    defaults, sized for BloodMNIST's 11,959 training images (`training.recipe.
    scale_epochs_to_data` sizes it for other datasets). quick: a 2-core CPU, under 10 minutes;
    standard: a 2-core CPU, about an hour (measured: docs/results.md); full: ResNet-18, 200
    epochs, batch 512, meant for a GPU."""
    if preset not in PRESETS:
        raise UserError(f"unknown `preset` '{preset}'; choose one of {', '.join(PRESETS)}", param="preset")
    recipe = dict(method_class(method).preset(preset))
    cfg = PretrainConfig(method=method, preset=preset)
    augment = recipe.pop("augment", {})
    method_config = recipe.pop("method_config", {})
    return replace(cfg, **recipe, augment=replace(cfg.augment, **augment),
                   method_config=replace(cfg.method_config, **method_config))


def default_run_dir(cfg: PretrainConfig) -> Path:
    return Path("runs") / f"{cfg.method}-{cfg.preset}"

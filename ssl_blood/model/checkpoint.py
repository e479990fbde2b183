"""checkpoint.pt, the one format every training command writes (pretraining, supervised,
fine-tuning): tensors and plain Python values only, so `torch.load(weights_only=True)` works.

Keys: format_version, ssl_blood_version, kind ("pretrain", "supervised", "fine-tune"), config,
dataset (name, source, num_classes, class_names, image_size, input_size, channels, mean, std),
backbone_name, backbone_stem, backbone (state_dict of the backbone that is evaluated: DINO's
teacher), method (state_dict of the whole model: heads, teacher, loss centre), optimizer, epoch
(completed epochs), history (one record per epoch: the truth metrics.jsonl is rebuilt from),
rng. Loading checks keys, types and that every weight is finite.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_blood import __version__
from ssl_blood.errors import RunFailed, UserError
from ssl_blood.files import refuse_existing, sha256_bytes, torch_save

FORMAT_VERSION = 2
# A trained conv net's weights stay within about +-10; 1e6 is only reached by a run that diverged
# while its normalised loss stayed finite (e.g. lr 1e30), whose features then overflow.
WEIGHT_LIMIT = 1e6
DATASET_KEYS = {"name": str, "source": dict, "num_classes": int, "class_names": list,
                "image_size": int, "input_size": int, "channels": int, "mean": list, "std": list}
_OLD_BACKBONES = {"resnet18-s2": ("resnet18", "s2"), "resnet18-imagenet": ("resnet18", "s4")}


def dataset_info(source: dict, class_names: Any, image_size: int, input_size: int, channels: int,
                 mean: list[float], std: list[float], name: str) -> dict[str, Any]:
    """What a checkpoint records of its data: enough to preprocess new images the same way."""
    return {"name": name, "source": source, "num_classes": len(class_names),
            "class_names": list(class_names), "image_size": int(image_size),
            "input_size": int(input_size), "channels": int(channels),
            "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def make_checkpoint(kind: str, config: dict, dataset: dict, backbone_name: str, backbone_stem: str,
                    backbone: nn.Module, model: nn.Module, epoch: int, history: list[dict],
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """The checkpoint dict; refuses (RunFailed) to hold non-finite weights."""
    check_weights(model.state_dict(), config, epoch)
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "format_version": FORMAT_VERSION, "ssl_blood_version": __version__, "kind": kind,
        "config": config, "dataset": dataset, "backbone_name": backbone_name,
        "backbone_stem": backbone_stem, "backbone": backbone.state_dict(),
        "method": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "epoch": int(epoch), "history": history, "rng": rng,
    }


def non_finite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of floating-point tensors holding NaN or inf."""
    return [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
            and not bool(torch.isfinite(v).all())]


def absurd_tensors(state: dict[str, Any], limit: float = WEIGHT_LIMIT) -> list[str]:
    """Names of floating-point parameters with a value beyond `limit` in magnitude."""
    return [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
            and v.numel() and not k.endswith(("running_mean", "running_var"))
            and float(v.detach().abs().max()) > limit]


def weight_problem(state: dict[str, Any]) -> str | None:
    """What is wrong with a set of weights (non-finite or absurdly large), or None."""
    bad = non_finite_tensors(state)
    if bad:
        return f"became non-finite ({len(bad)} tensors, e.g. {bad[0]})"
    huge = absurd_tensors(state)
    if huge:
        peak = max(float(state[k].detach().abs().max()) for k in huge)
        return f"grew to {peak:.1e} ({len(huge)} tensors, e.g. {huge[0]}; sane weights stay far below {WEIGHT_LIMIT:.0e})"
    return None


def check_weights(state: dict[str, Any], config: dict, epoch: int) -> None:
    """Stop a run (RunFailed) whose weights are non-finite or absurd, with advice that fits its
    config (no "use lars" for a run already using it)."""
    problem = weight_problem(state)
    if problem:
        advice = f"lower `lr` (now {config.get('lr')})"
        if config.get("optimizer") not in (None, "lars"):
            advice += " or use the lars optimizer"
        raise RunFailed(f"the weights {problem} by epoch {epoch} (the training diverged); "
                        f"{advice}; the last good checkpoint is kept", param="lr")


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> Path:
    return torch_save(ckpt, path)


def load_checkpoint(path: str | Path, data: bytes | None = None) -> dict[str, Any]:
    """Load and check a checkpoint written by ssl-blood (format 1 or 2); `data`: the file's
    bytes when the caller has read (and hashed) them already, so what was checked is what loads."""
    path = Path(path)
    if data is None:
        _require_file(path)
    try:
        ckpt = torch.load(io.BytesIO(data) if data is not None else path, map_location="cpu",
                          weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise UserError(f"cannot read `checkpoint` {path} ({type(exc).__name__}); it is truncated "
                        f"or not an ssl-blood checkpoint", param="checkpoint") from None
    _check_structure(ckpt, path)
    if ckpt["format_version"] == 1:
        ckpt = _upgrade_v1(ckpt)
    problem = weight_problem(ckpt["backbone"])
    if problem:
        raise UserError(f"`checkpoint` {path}: its weights {problem}; it comes from a diverged "
                        f"run: use an earlier checkpoint or train again with a lower learning "
                        f"rate", param="checkpoint")
    return ckpt


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"`checkpoint` {path}: no such file; give the checkpoint.pt of a run",
                        param="checkpoint")
    return path


def _check_structure(ckpt: Any, path: Path) -> None:
    def refuse(what: str) -> UserError:
        return UserError(f"{path} is not a valid ssl-blood checkpoint ({what}); give the "
                         f"checkpoint.pt a run wrote", param="checkpoint")

    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("format_version"), int):
        raise refuse("no format_version")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise UserError(f"{path} has format version {ckpt['format_version']}, newer than this "
                        f"ssl-blood understands ({FORMAT_VERSION}); upgrade ssl-blood",
                        param="checkpoint")
    for key, kind in {"config": dict, "dataset": dict, "backbone_name": str, "backbone": dict,
                      "epoch": int}.items():
        if not isinstance(ckpt.get(key), kind):
            raise refuse(f"'{key}' missing or not a {kind.__name__}")
    for key, kind in DATASET_KEYS.items():
        value = ckpt["dataset"].get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise refuse(f"dataset.{key} missing or not a {kind.__name__}")
    if not all(isinstance(v, torch.Tensor) for v in ckpt["backbone"].values()):
        raise refuse("backbone weights are not all tensors")
    if not all(math.isfinite(float(v)) for v in ckpt["dataset"]["mean"] + ckpt["dataset"]["std"]):
        raise refuse("non-finite normalisation statistics")


def _upgrade_v1(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Format 1 had no stem (its names carried it) and no kind."""
    from ssl_blood.model.backbones import resolve_stem

    name, stem = _OLD_BACKBONES.get(ckpt["backbone_name"],
                                    (ckpt["backbone_name"], resolve_stem("auto", ckpt["dataset"]["input_size"])))
    config = dict(ckpt["config"])
    if config.get("backbone") in _OLD_BACKBONES:
        config["backbone"], config["stem"] = _OLD_BACKBONES[config["backbone"]]
    kind = "supervised" if config.get("method") == "supervised" else "pretrain"
    # the method's own state is migrated by the method when a run resumes (Method.migrate_state)
    return {**ckpt, "backbone_name": name, "backbone_stem": stem, "config": config, "kind": kind,
            "history": ckpt.get("history", [])}


@dataclass
class TrainedBackbone:
    """A backbone restored from a checkpoint, with what is needed to feed it images."""

    model: nn.Module
    name: str
    stem: str
    dataset: dict[str, Any]
    config: dict[str, Any]
    sha256: str

    @property
    def input_size(self) -> int:
        return int(self.dataset["input_size"])

    @property
    def precision(self) -> str:
        """The precision it was trained in ("auto" for a supervised run)."""
        return str(self.config.get("precision", "auto"))

    @property
    def channels_last(self) -> bool:
        return bool(self.config.get("channels_last", False))


def backbone_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """The evaluation backbone of a loaded checkpoint, in eval mode on the CPU."""
    from ssl_blood.model.backbones import build_backbone

    model = build_backbone(ckpt["backbone_name"], int(ckpt["dataset"]["channels"]),
                           ckpt["backbone_stem"])
    try:
        model.load_state_dict(ckpt["backbone"])
    except RuntimeError as exc:
        raise UserError(f"the checkpoint's backbone weights do not fit a {ckpt['backbone_name']} "
                        f"({str(exc).splitlines()[0][:120]}); the file was edited or is damaged",
                        param="checkpoint") from None
    return model.eval()


def load_backbone(path: str | Path, data: bytes | None = None) -> TrainedBackbone:
    """The evaluation backbone of a checkpoint file, in eval mode on the CPU; the file is read
    once, and its SHA-256 is that of the bytes loaded (`data`: those bytes, if already read)."""
    if data is None:
        data = _require_file(Path(path)).read_bytes()
    return trained_backbone(load_checkpoint(path, data), sha256_bytes(data))


def trained_backbone(ckpt: dict[str, Any], sha256: str) -> TrainedBackbone:
    """The evaluation backbone of a loaded checkpoint whose file has this SHA-256."""
    return TrainedBackbone(backbone_from_checkpoint(ckpt), ckpt["backbone_name"],
                           ckpt["backbone_stem"], ckpt["dataset"], ckpt["config"], sha256)


def backbone_only(ckpt: dict[str, Any], backbone: dict[str, torch.Tensor] | None = None,
                  kind: str | None = None, note: dict[str, Any] | None = None) -> dict[str, Any]:
    """A checkpoint holding only what embedding needs (no method head, optimiser or random
    state): what a classifier folder keeps of its backbone. `backbone`: other weights (e.g.
    after consistency training), `note`: recorded in its config."""
    state = {k: v.detach().cpu().clone() for k, v in (backbone or ckpt["backbone"]).items()}
    config = {**ckpt["config"], **({"classifier_training": note} if note else {})}
    return {"format_version": FORMAT_VERSION, "ssl_blood_version": __version__,
            "kind": kind or ckpt.get("kind", "simclr"), "config": config, "dataset": ckpt["dataset"],
            "backbone_name": ckpt["backbone_name"], "backbone_stem": ckpt["backbone_stem"],
            "backbone": state, "method": {}, "optimizer": {}, "epoch": int(ckpt["epoch"]),
            "history": [], "rng": {}}


def export_backbone(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write the evaluation backbone's plain state_dict (loadable without ssl-blood)."""
    ckpt = load_checkpoint(checkpoint)
    out = refuse_existing(out, overwrite)
    if out.is_dir():
        raise UserError(f"`out` {out} is a folder; give a file name such as backbone.pt", param="out")
    torch_save(ckpt["backbone"], out)
    return {"backbone": ckpt["backbone_name"], "stem": ckpt["backbone_stem"], "out": str(out),
            "parameters": sum(t.numel() for t in ckpt["backbone"].values()),
            "input_size": ckpt["dataset"]["input_size"], "mean": ckpt["dataset"]["mean"],
            "std": ckpt["dataset"]["std"]}

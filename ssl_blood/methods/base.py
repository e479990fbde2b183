"""Pretraining methods behind one contract, found by name in a registry.

A method is an `nn.Module` that owns its heads and loss (lightly's) around a backbone; the
training loop in `ssl_blood.training.loop` stays visible and treats every method the same through
`Method`'s hooks (solo-learn's `methods/base.py` + METHODS registry is the model, without
Lightning's hidden loop):

    view_spec()                  which views the augmentation makes (counts, sizes, crop scales)
    forward(views, epoch)        the loss (DDP syncs what forward touches)
    before_optimizer_step(epoch) e.g. DINO cancels last-layer gradients early on
    after_optimizer_step(step, total_steps)  e.g. DINO's EMA teacher update
    check_collapse(loss, epoch, mean)        stop a collapsed run; extra numbers for metrics
    eval_backbone()              the backbone that is evaluated and exported

Adding a method: one module in this package (found automatically) with a class decorated by
`@register`, its `Config` dataclass (the config section `--set NAME.key=value` edits), and
`name`. See docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ssl_blood.model.augment import ViewGroup
from ssl_blood.errors import UserError

Mean = Callable[[torch.Tensor], torch.Tensor]  # all-reduce mean over DDP ranks (identity alone)


@dataclass(frozen=True)
class MethodSetup:
    """What a method needs to know about the run besides its own config."""

    epochs: int
    input_size: int
    crop_scale: tuple[float, float]  # of the views at the input size (augment.crop_scale)
    distributed: bool = False


class Method(nn.Module):
    """The contract every pretraining method fulfils; hooks default to doing nothing."""

    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, backbone: nn.Module, cfg: Any, setup: MethodSetup):
        super().__init__()
        self.cfg, self.setup = cfg, setup

    def view_spec(self) -> list[ViewGroup]:
        """Two views at the input size (SimCLR's); multi-crop methods override this."""
        return [ViewGroup(2, self.setup.input_size, tuple(self.setup.crop_scale))]

    def forward(self, views: list[torch.Tensor], epoch: int) -> torch.Tensor:
        raise NotImplementedError

    def eval_backbone(self) -> nn.Module:
        raise NotImplementedError

    def before_optimizer_step(self, epoch: int) -> None:
        pass

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        pass

    def check_collapse(self, epoch_loss: float, epoch: int, mean: Mean = lambda t: t) -> dict[str, float]:
        """Raise RunFailed when training has collapsed; return numbers for metrics.jsonl."""
        return {}

    # -- a method's recipes and its history live with it ---------------------------------

    @classmethod
    def preset(cls, preset: str) -> dict[str, Any]:
        """Config values of a named preset ("quick", "standard" or "full") for this method,
        applied over PretrainConfig's defaults; nested dicts ("augment", "method_config")
        replace only the fields they name. A method without its own recipes gets these
        generic ones (the narrow CNN for 12 / 84 epochs on a CPU, ResNet-18 on a GPU)."""
        cpu = dict(batch_size=256, optimizer="lars", lr=0.6, weight_decay=1e-5, warmup_epochs=1)
        if preset == "quick":
            return dict(cpu, backbone="cnn6", epochs=12, knn_every=4)
        if preset == "standard":
            return dict(cpu, backbone="cnn6", epochs=84, knn_every=12, warmup_epochs=4)
        return {}

    @classmethod
    def migrate_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """A config saved by an older version of this method, in today's form."""
        return config

    @classmethod
    def migrate_state(cls, state: dict[str, Any]) -> dict[str, Any]:
        """A state_dict saved by an older version of this method, in today's form."""
        return state


_METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a Method buildable by its `name`."""
    _METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return list(_METHODS)


def method_class(name: str) -> type[Method]:
    if name not in _METHODS:
        raise UserError(f"unknown method '{name}'; choose one of {', '.join(_METHODS)}",
                        param="method")
    return _METHODS[name]


def default_method_config(name: str) -> Any:
    return method_class(name).Config()


def build_method(name: str, backbone: nn.Module, cfg: Any, setup: MethodSetup) -> Method:
    """The method `name` around `backbone`, with its config section `cfg`."""
    return method_class(name)(backbone, cfg, setup)



"""Backbones by name (a registry, as timm's). Each maps (B, C, H, W) to pooled features
(B, num_features).

ResNets are torchvision's, with the stem changed for small images and `fc` replaced by an
identity, so their state_dict loads into `torchvision.models.resnet18()` modified the same way
(see docs/user-guide.md, "Using an exported backbone without ssl-blood").

The stem sets how much a backbone downsamples before its body, chosen by image size so that
every backbone ends on a map of about 4 px, as at 28 px (`resolve_stem`):
  s1   no extra downsampling (ResNet: 3x3 stride-1 conv, no max-pool)      size < 48
  s2   2x (ResNet: 3x3 stride-2 conv, no max-pool; CNN: first conv stride 2)  48 <= size < 96
  s4   4x (ResNet: ImageNet 7x7 stride-2 conv + max-pool; CNN: first two     size >= 96
       convs stride 2)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ssl_blood.errors import UserError

STEMS = ("auto", "s1", "s2", "s4")
BackboneFactory = Callable[[int, str], nn.Module]
_REGISTRY: dict[str, tuple[BackboneFactory, str]] = {}


def register(name: str, summary: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: make `factory(in_channels, stem)` buildable as `name`."""
    def add(factory: BackboneFactory) -> BackboneFactory:
        _REGISTRY[name] = (factory, summary)
        return factory

    return add


def backbone_names() -> list[str]:
    return list(_REGISTRY)


def describe_backbones() -> dict[str, str]:
    return {name: summary for name, (_, summary) in _REGISTRY.items()}


def resolve_stem(stem: str, input_size: int) -> str:
    """"auto" -> s1 below 48 px, s2 below 96 px, else s4 (see the module docstring)."""
    if stem not in STEMS:
        raise UserError(f"`stem` '{stem}' is not one of {', '.join(STEMS)}", param="stem")
    if stem != "auto":
        return stem
    return "s1" if input_size < 48 else "s2" if input_size < 96 else "s4"


def build_backbone(name: str, in_channels: int = 3, stem: str = "s1") -> nn.Module:
    """A freshly initialised backbone with a `num_features` attribute; `stem` is s1, s2 or s4
    (resolve "auto" with `resolve_stem` first)."""
    if name not in _REGISTRY:
        raise UserError(f"unknown backbone '{name}'; choose one of {', '.join(_REGISTRY)}",
                        param="backbone")
    if stem not in STEMS[1:]:
        raise UserError(f"`stem` '{stem}' must be one of {', '.join(STEMS[1:])} here", param="stem")
    model = _REGISTRY[name][0](in_channels, stem)
    if not isinstance(getattr(model, "num_features", None), int):
        raise TypeError(f"backbone '{name}' has no integer num_features")
    return model


# ----------------------------------------------------------------------------- ResNets


def _resnet(arch: str, in_channels: int, stem: str) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None)
    if stem in ("s1", "s2"):  # CIFAR stem (solo-learn), stride 1 or 2, no max-pool
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1 if stem == "s1" else 2,
                                padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:  # s4: the ImageNet stem
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model.num_features = model.fc.in_features
    model.fc = nn.Identity()
    return model


@register("resnet18", "ResNet-18 (GPU default)")
def resnet18(in_channels: int = 3, stem: str = "s1") -> nn.Module:
    return _resnet("resnet18", in_channels, stem)


@register("resnet34", "ResNet-34")
def resnet34(in_channels: int = 3, stem: str = "s1") -> nn.Module:
    return _resnet("resnet34", in_channels, stem)


@register("resnet50", "ResNet-50 (2048 features)")
def resnet50(in_channels: int = 3, stem: str = "s1") -> nn.Module:
    return _resnet("resnet50", in_channels, stem)


# ----------------------------------------------------------------------------- plain CNN


class PlainCNN(nn.Sequential):
    """conv3x3-BN-ReLU blocks, global average pool; the CPU-fast backbone of the CPU presets.

    The default widths 32-64-64-128-128-256 with stride 2 at blocks 2, 4 and 6 take a 28-px
    image to 4x4 before pooling; stems s2 and s4 also give blocks 1 (and 2) stride 2.
    """

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (32, 64, 64, 128, 128, 256),
                 strides: tuple[int, ...] = (1, 2, 1, 2, 1, 2)):
        layers: list[nn.Module] = []
        previous = in_channels
        for width, stride in zip(widths, strides):
            layers += [nn.Conv2d(previous, width, 3, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            previous = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        super().__init__(*layers)
        self.num_features = previous


_CNN_STRIDES = {"s1": (1, 2, 1, 2, 1, 2), "s2": (2, 2, 1, 2, 1, 2), "s4": (2, 2, 2, 2, 1, 2)}


@register("cnn6", "plain 6-layer CNN 32-64-64-128-128-256 (CPU, DINO quick preset)")
def cnn6(in_channels: int = 3, stem: str = "s1") -> nn.Module:
    return PlainCNN(in_channels, strides=_CNN_STRIDES[stem])


@register("cnn6-wide", "plain 6-layer CNN 64-128-128-256-256-512 (CPU, SimCLR quick preset)")
def cnn6_wide(in_channels: int = 3, stem: str = "s1") -> nn.Module:
    return PlainCNN(in_channels, widths=(64, 128, 128, 256, 256, 512), strides=_CNN_STRIDES[stem])


@torch.no_grad()
def output_dim(model: nn.Module, in_channels: int, size: int) -> int:
    """Feature dimension found by running a dummy batch (sanity check for new backbones)."""
    was_training = model.training
    model.eval()
    out = model(torch.zeros(2, in_channels, size, size))
    model.train(was_training)
    return int(out.shape[1])

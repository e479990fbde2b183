"""Backbones by name. Each maps (B, C, H, W) to pooled features (B, num_features).

ResNets are torchvision's, with the stem changed for small images and `fc` replaced by an
identity, so their state_dict loads into `torchvision.models.resnet18()` modified the same way
(see docs/user-guide.md, "Using an exported backbone without ssl-blood").
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ssl_blood.errors import UserError

BackboneFactory = Callable[[int], nn.Module]
_REGISTRY: dict[str, tuple[BackboneFactory, str]] = {}


def register(name: str, summary: str) -> Callable[[BackboneFactory], BackboneFactory]:
    def add(factory: BackboneFactory) -> BackboneFactory:
        _REGISTRY[name] = (factory, summary)
        return factory

    return add


def backbone_names() -> list[str]:
    return list(_REGISTRY)


def describe_backbones() -> dict[str, str]:
    return {name: summary for name, (_, summary) in _REGISTRY.items()}


def build_backbone(name: str, in_channels: int = 3) -> nn.Module:
    """A freshly initialised backbone; it has a `num_features` attribute."""
    if name not in _REGISTRY:
        raise UserError(f"unknown backbone '{name}'; choose one of {', '.join(_REGISTRY)}")
    model = _REGISTRY[name][0](in_channels)
    assert isinstance(getattr(model, "num_features", None), int)
    return model


# ----------------------------------------------------------------------------- ResNets


def _resnet(arch: str, in_channels: int, stem: str) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None)
    if stem == "small":  # CIFAR stem (solo-learn): 3x3 stride 1, no max-pool
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif stem == "small-s2":  # 3x3 stride 2, no max-pool: ~2.7x faster at 28 px
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=2, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model.num_features = model.fc.in_features
    model.fc = nn.Identity()
    return model


@register("resnet18", "ResNet-18, 3x3 stride-1 stem, no max-pool (GPU default)")
def resnet18(in_channels: int = 3) -> nn.Module:
    return _resnet("resnet18", in_channels, "small")


@register("resnet18-s2", "ResNet-18, 3x3 stride-2 stem, no max-pool")
def resnet18_s2(in_channels: int = 3) -> nn.Module:
    return _resnet("resnet18", in_channels, "small-s2")


@register("resnet18-imagenet", "ResNet-18, ImageNet stem (7x7 stride 2 + max-pool)")
def resnet18_imagenet(in_channels: int = 3) -> nn.Module:
    return _resnet("resnet18", in_channels, "imagenet")


@register("resnet34", "ResNet-34, 3x3 stride-1 stem, no max-pool")
def resnet34(in_channels: int = 3) -> nn.Module:
    return _resnet("resnet34", in_channels, "small")


@register("resnet50", "ResNet-50, 3x3 stride-1 stem, no max-pool (2048 features)")
def resnet50(in_channels: int = 3) -> nn.Module:
    return _resnet("resnet50", in_channels, "small")


# ----------------------------------------------------------------------------- plain CNN


class PlainCNN(nn.Sequential):
    """conv3x3-BN-ReLU blocks, global average pool; the CPU-fast backbone of the quick preset.

    The default widths 32-64-64-128-128-256 with stride 2 at blocks 2, 4 and 6 take a 28-px
    image to 4x4 before pooling.
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


@register("cnn6", "plain 6-layer CNN 32-64-64-128-128-256, three stride-2 (CPU quick preset)")
def cnn6(in_channels: int = 3) -> nn.Module:
    return PlainCNN(in_channels)


@register("cnn6-wide", "plain 6-layer CNN 64-128-128-256-256-512, three stride-2")
def cnn6_wide(in_channels: int = 3) -> nn.Module:
    return PlainCNN(in_channels, widths=(64, 128, 128, 256, 256, 512))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def output_dim(model: nn.Module, in_channels: int, size: int) -> int:
    """Feature dimension found by running a dummy batch (sanity check for new backbones)."""
    was_training = model.training
    model.eval()
    out = model(torch.zeros(2, in_channels, size, size))
    model.train(was_training)
    return int(out.shape[1])

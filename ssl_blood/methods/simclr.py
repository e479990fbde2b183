"""SimCLR: lightly's SimCLRProjectionHead on the backbone, trained with lightly's NTXentLoss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ssl_blood.methods.base import Method, MethodSetup, register


@dataclass
class SimCLRConfig:
    temperature: float = 0.2
    projection_hidden_dim: int = 2048
    projection_dim: int = 256


@register
class SimCLR(Method):
    """Backbone + projection head; the NT-Xent loss of the two views."""

    name = "simclr"
    Config = SimCLRConfig

    @classmethod
    def preset(cls, preset: str) -> dict:
        """On a CPU the wide plain CNN (on val, width beat epochs: experiments/results/
        quick_preset_search.json), 8 epochs quick, 72 standard (60 minutes at the quick
        preset's measured epoch time) with NT-Xent temperature 0.1, the best of three recipes
        on val at 15 minutes (experiments/results/standard_preset_search.json)."""
        recipe = super().preset(preset)
        if preset == "quick":
            recipe.update(backbone="cnn6-wide", epochs=8)
        elif preset == "standard":
            recipe.update(backbone="cnn6-wide", epochs=72, method_config={"temperature": 0.1})
        return recipe

    def __init__(self, backbone: nn.Module, cfg: SimCLRConfig, setup: MethodSetup):
        super().__init__(backbone, cfg, setup)
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(
            backbone.num_features, cfg.projection_hidden_dim, cfg.projection_dim)
        # gather_distributed: negatives from every rank, as in the paper's large-batch setting
        self.criterion = NTXentLoss(temperature=cfg.temperature,
                                    gather_distributed=setup.distributed)

    def forward(self, views: list[torch.Tensor], epoch: int) -> torch.Tensor:
        n = views[0].shape[0]
        z = self.projection_head(self.backbone(torch.cat(views[:2])))  # (2B, D), one BN pass
        return self.criterion(z[:n], z[n:])

    def eval_backbone(self) -> nn.Module:
        return self.backbone

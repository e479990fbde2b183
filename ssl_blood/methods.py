"""SimCLR and DINO: each adds only its heads and loss (lightly's) to a backbone.

A method is an `nn.Module` whose `forward(views, epoch)` returns the loss, so the training loop
(and DDP, which only syncs what `forward` touches) treats both the same. Hooks around the
optimiser step carry what differs: DINO cancels last-layer gradients early in training and
updates its EMA teacher after every step.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ssl_blood.errors import RunFailed, UserError


@dataclass
class SimCLRConfig:
    temperature: float = 0.2
    projection_hidden_dim: int = 2048
    projection_dim: int = 256


@dataclass
class DINOConfig:
    output_dim: int = 4096
    hidden_dim: int = 1024
    bottleneck_dim: int = 256
    batch_norm_head: bool = True  # DINO's ResNet recipe uses BN in the head
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    momentum_start: float = 0.99  # teacher EMA momentum, cosine-scheduled to 1.0 per step
    momentum_end: float = 1.0
    freeze_last_layer_epochs: int = 1


class SimCLR(nn.Module):
    """Backbone + lightly's SimCLRProjectionHead, trained with lightly's NTXentLoss."""

    name = "simclr"

    def __init__(self, backbone: nn.Module, cfg: SimCLRConfig, distributed: bool = False):
        super().__init__()
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(
            backbone.num_features, cfg.projection_hidden_dim, cfg.projection_dim)
        # gather_distributed: negatives from every rank, as in the paper's large-batch setting
        self.criterion = NTXentLoss(temperature=cfg.temperature, gather_distributed=distributed)

    def forward(self, views: list[torch.Tensor], epoch: int) -> torch.Tensor:
        n = views[0].shape[0]
        z = self.projection_head(self.backbone(torch.cat(views[:2])))  # (2B, D), one BN pass
        return self.criterion(z[:n], z[n:])

    def eval_backbone(self) -> nn.Module:
        return self.backbone

    def before_optimizer_step(self, epoch: int) -> None:
        pass

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        pass

    def check_collapse(self, epoch_loss: float, epoch: int) -> dict[str, float]:
        return {}


class DINO(nn.Module):
    """Student (backbone + lightly DINOProjectionHead) and an EMA teacher (deep copy).

    Only the two global views go to the teacher; the student sees every view. The teacher's
    backbone is the one evaluated and exported, as in the DINO paper.
    """

    name = "dino"

    def __init__(self, backbone: nn.Module, cfg: DINOConfig, epochs: int, distributed: bool = False):
        super().__init__()
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        self.cfg = cfg
        self.student_backbone = backbone
        def head() -> nn.Module:
            return DINOProjectionHead(
                backbone.num_features, cfg.hidden_dim, cfg.bottleneck_dim, cfg.output_dim,
                batch_norm=cfg.batch_norm_head, freeze_last_layer=cfg.freeze_last_layer_epochs)

        self.student_head = head()
        self.teacher_backbone = copy.deepcopy(backbone)
        # weight_norm'd heads cannot be deep-copied (pytorch#103001): build, then copy weights
        self.teacher_head = head()
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        warmup = min(cfg.warmup_teacher_temp_epochs, epochs)
        # DINOLoss(teacher_out, student_out, epoch=) warms the teacher temperature per epoch;
        # its centre update all-reduces across ranks by itself.
        self.criterion = DINOLoss(
            output_dim=cfg.output_dim, warmup_teacher_temp=cfg.warmup_teacher_temp,
            teacher_temp=cfg.teacher_temp, warmup_teacher_temp_epochs=warmup,
            student_temp=cfg.student_temp, center_momentum=cfg.center_momentum)
        self.collapsed_epochs = 0
        self._entropy_sums = torch.zeros(3)

    def forward(self, views: list[torch.Tensor], epoch: int) -> torch.Tensor:
        n = views[0].shape[0]
        global_views = torch.cat(views[:2])
        with torch.no_grad():
            teacher_out = self.teacher_head(self.teacher_backbone(global_views))
            self._record_teacher_entropy(teacher_out.float(), epoch)
        student_out = list(self.student_head(self.student_backbone(global_views)).chunk(2))
        if len(views) > 2:  # local crops share a size: one batched pass
            local = self.student_head(self.student_backbone(torch.cat(views[2:])))
            student_out += list(local.split(n))
        return self.criterion(list(teacher_out.chunk(2)), student_out, epoch=epoch)

    def _teacher_temperature(self, epoch: int) -> float:
        if epoch < self.criterion.warmup_teacher_temp_epochs:
            return float(self.criterion.teacher_temp_schedule[epoch])
        return self.cfg.teacher_temp

    @torch.no_grad()
    def _record_teacher_entropy(self, teacher_out: torch.Tensor, epoch: int) -> None:
        """Accumulate the two entropies DINO uses to tell collapse apart: per-sample teacher
        entropy (ln K when uniform) and entropy of the batch-mean distribution (0 when one
        dimension dominates)."""
        p = torch.softmax((teacher_out - self.criterion.center[0]) / self._teacher_temperature(epoch), -1)
        per_sample = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
        mean_p = p.mean(0)
        of_mean = -(mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()
        self._entropy_sums = self._entropy_sums.to(p.device) + torch.stack([per_sample, of_mean, torch.ones_like(of_mean)])

    def eval_backbone(self) -> nn.Module:
        return self.teacher_backbone

    def before_optimizer_step(self, epoch: int) -> None:
        self.student_head.cancel_last_layer_gradients(epoch)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        m = cosine_schedule(step, total_steps, self.cfg.momentum_start, self.cfg.momentum_end)
        update_momentum(self.student_backbone, self.teacher_backbone, m)
        update_momentum(self.student_head, self.teacher_head, m)

    def epoch_stats(self) -> dict[str, float]:
        """Mean teacher entropies since the last call (and reset)."""
        per_sample, of_mean, count = (self._entropy_sums / self._entropy_sums[2].clamp_min(1)).tolist()
        self._entropy_sums = torch.zeros(3, device=self._entropy_sums.device)
        return {"teacher_entropy": per_sample, "teacher_mean_entropy": of_mean}

    def check_collapse(self, epoch_loss: float, epoch: int, patience: int = 3) -> dict[str, float]:
        """Stop when, for `patience` epochs in a row, the loss sits at ln(output_dim) with a
        uniform teacher (uniform collapse), or one output dimension takes all the teacher's mass
        (dominant collapse). Returns this epoch's entropies for the metrics."""
        stats = self.epoch_stats()
        uniform_loss = math.log(self.cfg.output_dim)
        uniform = (abs(epoch_loss - uniform_loss) < 0.01 * uniform_loss
                   and stats["teacher_entropy"] > 0.98 * uniform_loss)
        dominant = stats["teacher_mean_entropy"] < math.log(2)
        self.collapsed_epochs = self.collapsed_epochs + 1 if (uniform or dominant) else 0
        if self.collapsed_epochs >= patience:
            kind = (f"the loss has stayed at ln(output_dim={self.cfg.output_dim}) = {uniform_loss:.3f}"
                    if uniform else "one output dimension takes all the teacher's mass")
            raise RunFailed(
                f"DINO collapsed at epoch {epoch}: {kind} for {patience} epochs; lower the "
                f"learning rate or the teacher temperature, or raise the centre momentum")
        return stats


METHOD_NAMES = ("simclr", "dino")


def build_method(name: str, backbone: nn.Module, simclr: SimCLRConfig, dino: DINOConfig,
                 epochs: int, distributed: bool = False) -> SimCLR | DINO:
    if name == "simclr":
        return SimCLR(backbone, simclr, distributed)
    if name == "dino":
        return DINO(backbone, dino, epochs, distributed)
    raise UserError(f"unknown method '{name}'; choose one of {', '.join(METHOD_NAMES)}")

"""DINO: a student (backbone + lightly's DINOProjectionHead) and its EMA teacher.

Only the global views go to the teacher; the student sees every view (multi-crop). The
teacher's backbone is the one evaluated and exported, as in the DINO paper.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ssl_blood.model.augment import ViewGroup
from ssl_blood.errors import RunFailed
from ssl_blood.methods.base import Mean, Method, MethodSetup, register


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
    local_views: int = 6  # multi-crop: small crops the student sees besides the 2 global views
    local_size: int | None = None  # side of a local crop; None: 3/7 of the input size (12 at 28)
    local_scale: tuple[float, float] = (0.05, 0.3)
    collapse_patience: int = 3  # epochs of collapse before the run is stopped


@register
class DINO(Method):
    """Student and EMA teacher; lightly's DINOLoss over global (teacher) and all (student) views."""

    name = "dino"
    Config = DINOConfig

    @classmethod
    def preset(cls, preset: str) -> dict:
        """The generic recipes; DINO's global crops cover more of the cell than SimCLR's (the
        local crops see the parts). Its steps cost ~2.4x SimCLR's, so the narrow CNN."""
        return {**super().preset(preset), "augment": {"crop_scale": (0.35, 1.0)}}

    @classmethod
    def migrate_config(cls, config: dict) -> dict:
        """Format 1 kept the multi-crop settings in `augment`; they are DINO's own."""
        augment = dict(config.get("augment", {}))
        moved = {k: augment.pop(k) for k in ("local_views", "local_size", "local_scale") if k in augment}
        if moved:
            config = {**config, "augment": augment, "dino": {**moved, **config.get("dino", {})}}
        return config

    @classmethod
    def migrate_state(cls, state: dict) -> dict:
        """Format 2 keeps the collapse count in the state."""
        return {"collapsed_epochs": torch.zeros((), dtype=torch.long), **state}

    def __init__(self, backbone: nn.Module, cfg: DINOConfig, setup: MethodSetup):
        super().__init__(backbone, cfg, setup)
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad

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
        warmup = min(cfg.warmup_teacher_temp_epochs, setup.epochs)
        # DINOLoss(teacher_out, student_out, epoch=) warms the teacher temperature per epoch;
        # its centre update all-reduces across ranks by itself.
        self.criterion = DINOLoss(
            output_dim=cfg.output_dim, warmup_teacher_temp=cfg.warmup_teacher_temp,
            teacher_temp=cfg.teacher_temp, warmup_teacher_temp_epochs=warmup,
            student_temp=cfg.student_temp, center_momentum=cfg.center_momentum)
        # in the state_dict, so a resumed run continues the count
        self.register_buffer("collapsed_epochs", torch.zeros((), dtype=torch.long))
        self._entropy_sums = torch.zeros(3)

    def view_spec(self) -> list[ViewGroup]:
        size = self.setup.input_size
        local = self.cfg.local_size or max(8, round(size * 3 / 7))
        return [ViewGroup(2, size, tuple(self.setup.crop_scale)),
                ViewGroup(self.cfg.local_views, local, tuple(self.cfg.local_scale))]

    def _project(self, head: nn.Module, features: torch.Tensor) -> torch.Tensor:
        """The head with its weight-normed last layer in float32 even under bf16 autocast:
        outputs are divided by a 0.04 teacher temperature, which would turn bf16 rounding into
        about 0.1 logit of noise."""
        z = head.layers(features)
        with torch.autocast(features.device.type, enabled=False):
            return head.last_layer(nn.functional.normalize(z.float(), dim=-1, p=2))

    def forward(self, views: list[torch.Tensor], epoch: int) -> torch.Tensor:
        n = views[0].shape[0]
        global_views = torch.cat(views[:2])
        with torch.no_grad():
            teacher_out = self._project(self.teacher_head, self.teacher_backbone(global_views))
            self._record_teacher_entropy(teacher_out, epoch)
        student_out = list(self._project(self.student_head,
                                         self.student_backbone(global_views)).chunk(2))
        if len(views) > 2:  # local crops share a size: one batched pass
            local = self._project(self.student_head, self.student_backbone(torch.cat(views[2:])))
            student_out += list(local.split(n))
        with torch.autocast(global_views.device.type, enabled=False):  # the loss in float32
            return self.criterion(list(teacher_out.chunk(2)), student_out, epoch=epoch)

    def teacher_temperature(self, epoch: int) -> float:
        if epoch < self.criterion.warmup_teacher_temp_epochs:
            return float(self.criterion.teacher_temp_schedule[epoch])
        return self.cfg.teacher_temp

    @torch.no_grad()
    def _record_teacher_entropy(self, teacher_out: torch.Tensor, epoch: int) -> None:
        """Accumulate the two entropies DINO uses to tell collapse apart: per-sample teacher
        entropy (ln K when uniform) and entropy of the batch-mean distribution (0 when one
        dimension dominates)."""
        p = torch.softmax((teacher_out - self.criterion.center[0]) / self.teacher_temperature(epoch), -1)
        per_sample = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
        mean_p = p.mean(0)
        of_mean = -(mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()
        self._entropy_sums = self._entropy_sums.to(p.device) + torch.stack(
            [per_sample, of_mean, torch.ones_like(of_mean)])

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

    def epoch_stats(self, mean: Mean = lambda t: t) -> dict[str, float]:
        """Mean teacher entropies since the last call, averaged over ranks (then reset)."""
        sums = mean(self._entropy_sums)
        per_sample, of_mean, _ = (sums / sums[2].clamp_min(1e-12)).tolist()
        self._entropy_sums = torch.zeros(3, device=self._entropy_sums.device)
        return {"teacher_entropy": per_sample, "teacher_mean_entropy": of_mean}

    def check_collapse(self, epoch_loss: float, epoch: int, mean: Mean = lambda t: t) -> dict[str, float]:
        """Stop when, for `collapse_patience` epochs in a row, the loss sits at ln(output_dim)
        with a uniform teacher (uniform collapse), or one output dimension takes all the
        teacher's mass (dominant collapse). Every rank decides on the same all-reduced numbers,
        so all stop together. Returns this epoch's entropies for the metrics."""
        stats = self.epoch_stats(mean)
        uniform_loss = math.log(self.cfg.output_dim)
        uniform = (abs(epoch_loss - uniform_loss) < 0.01 * uniform_loss
                   and stats["teacher_entropy"] > 0.98 * uniform_loss)
        dominant = stats["teacher_mean_entropy"] < math.log(2)
        self.collapsed_epochs.fill_(int(self.collapsed_epochs) + 1 if (uniform or dominant) else 0)
        patience = self.cfg.collapse_patience
        if int(self.collapsed_epochs) >= patience:
            kind = (f"the loss has stayed at ln(output_dim={self.cfg.output_dim}) = {uniform_loss:.3f}"
                    if uniform else "one output dimension takes all the teacher's mass")
            raise RunFailed(
                f"DINO collapsed at epoch {epoch}: {kind} for {patience} epochs; lower the "
                f"learning rate or the teacher temperature, or raise the centre momentum; the "
                f"last good checkpoint is kept")
        return stats

"""Consistency training: the pretrained backbone and a head learn from the labelled cells and,
through their own confident predictions, from the unlabelled ones.

FixMatch (Sohn et al., NeurIPS 2020) with FlexMatch's class-adaptive thresholds (Zhang et al.,
NeurIPS 2021): each step takes a batch of labelled cells (cross-entropy on a weak view) and
`unlabelled_ratio` times as many unlabelled cells; a cell's weak view gives a pseudo-label, kept
when its probability passes its class's threshold, and the strong view is trained to it.
FlexMatch scales the threshold of a class by how many cells the model already predicts
confidently as that class (its "learning effect"), so rare or hard classes (basophils, immature
granulocytes) are not starved of pseudo-labels. What this adds to the published recipes, for
small CPU budgets on a pretrained backbone:

- the head starts as the logistic regression of the frozen features (as LP-FT fine-tuning),
  so the first pseudo-labels are already those of the frozen head, not a random one's;
- BatchNorm statistics stay those of pretraining (the naive recipe with trained statistics
  collapsed within a few steps at a 28-px batch of 128);
- an exponential moving average of the weights (the "EMA teacher") is what is kept: single
  checkpoints swing by about 3 points between steps; optionally (`teacher="ema"`) it also gives
  the pseudo-labels, and ReMixMatch's distribution alignment (`align`) re-weights them.

Written here rather than taken from USB/TorchSSL: those train their own loops and data loaders
(PIL per image); this one reuses ssl-blood's batched device augmentation and resumes exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ssl_blood import ui
from ssl_blood.device import autocast
from ssl_blood.errors import UserError
from ssl_blood.files import torch_save
from ssl_blood.model.augment import AugmentConfig, BatchAugment

TEACHERS = ("student", "ema")  # ConsistencyConfig.teacher
ALIGN_MOMENTUM = 0.99  # running mean of the predictions over ~100 steps, as ReMixMatch's 128 batches
BUDGET_SAFETY = 0.9  # share of the budget planned for steps: the machine may slow down later
TIMED_STEPS = 3  # steps timed (after one warm-up step) to size a `minutes` budget

# Weak view: what a cell may look like on any slide (position, orientation, a little zoom).
WEAK = AugmentConfig(crop_scale=(0.64, 1.0), jitter_prob=0.0)
# Strong view: crops, colour and blur; grey-scale stays off (eosinophil and basophil identity is
# colour), a cut-out square is added (`cutout`) as FixMatch's RandAugment+Cutout does.
STRONG = AugmentConfig(crop_scale=(0.25, 1.0), jitter_prob=0.8, brightness=0.4, contrast=0.4,
                       saturation=0.4, hue=0.02, blur_prob=0.5, blur_sigma=(0.1, 1.0))


@dataclass
class ConsistencyConfig:
    """Settings of `train_consistency`; `minutes` (when given) sizes `steps` to a time budget."""

    steps: int = 500
    minutes: float | None = None
    labelled_batch: int = 32
    unlabelled_ratio: int = 3  # FixMatch's mu: unlabelled cells per labelled cell in a step
    lr: float = 1e-3  # AdamW, the head's; cosine decay to 0 over the steps
    backbone_lr_ratio: float = 0.3  # backbone lr / head lr (3e-3 on the backbone collapsed it)
    weight_decay: float = 1e-4
    threshold: float = 0.95  # FixMatch's tau; FlexMatch scales it per class
    adaptive: bool = False  # FlexMatch's class-adaptive thresholds (False: plain FixMatch)
    threshold_floor: float = 0.7  # adaptive thresholds never below this (see class_thresholds)
    unlabelled_weight: float = 1.0  # lambda_u
    ema_decay: float = 0.99  # ~100-step horizon: runs here are hundreds of steps, not 2**20
    # who gives the pseudo-labels: "student" (FixMatch: the network being trained) or "ema"
    # (the weight average, as Mean Teacher; no extra compute). Both this and `align` measured
    # level with the defaults at 40 labels (docs/label-efficiency.md), hence off by default
    teacher: str = "student"
    # ReMixMatch's distribution alignment: the weak views' probabilities times the labelled
    # cells' class shares over the running mean of the network's own predictions, so a class
    # the network under-calls (basophils at 40 labels) still earns pseudo-labels
    align: bool = False
    cutout: float = 0.5  # side of the cut-out square as a share of the view's side
    stain: float = 0.0  # HED stain jitter of both views (augment.stain_jitter): another lab's stain
    # share of unlabelled cells whose strong view is first put under a random stain, blur,
    # resampling or brightness shift (data.shifts, severity 1-5) while the pseudo-label comes
    # from the clean weak view: the backbone learns to call a cell the same on another scanner
    shift_augment: float = 0.0
    # start from the head divided by its cross-validated temperature (see classifier): chosen on
    # BloodMNIST val over plain FixMatch, FlexMatch and a 3x learning rate (experiments/consistency.py)
    calibrated_start: bool = True
    save_every: int = 25  # steps between resumable states
    seed: int = 0
    precision: str = "auto"

    def check(self) -> None:
        positive = {"steps": self.steps, "labelled_batch": self.labelled_batch,
                    "unlabelled_ratio": self.unlabelled_ratio, "lr": self.lr,
                    "backbone_lr_ratio": self.backbone_lr_ratio, "save_every": self.save_every}
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"`{name}` {value} must be a positive number", param=name)
        if self.minutes is not None and not (math.isfinite(self.minutes) and self.minutes > 0):
            raise UserError(f"`minutes` {self.minutes} must be a positive number of minutes",
                            param="minutes")
        for name in ("threshold", "threshold_floor", "ema_decay", "cutout", "stain"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"`{name}` {getattr(self, name)} must be in [0, 1)", param=name)
        if self.teacher not in TEACHERS:
            raise UserError(f"`teacher` {self.teacher!r} is not one of {', '.join(TEACHERS)}",
                            param="teacher")
        if not 0 <= self.shift_augment <= 1:
            raise UserError(f"`shift_augment` {self.shift_augment} must be in [0, 1]", param="shift_augment")


class HeadedBackbone(nn.Module):
    """A backbone and a linear head on its features: what consistency training trains."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Training mode everywhere except BatchNorm, which keeps pretraining's statistics."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


def cutout(x: torch.Tensor, side: float, gen: torch.Generator) -> torch.Tensor:
    """Each image with one square of `side` x its size set to 0 (the normalised mean), at a
    random centre; batched (torchvision's RandomErasing cuts the same box for a whole batch)."""
    if side <= 0:
        return x
    n, _, h, w = x.shape
    half = side * h / 2
    cy = torch.rand(n, 1, 1, generator=gen, device=x.device) * h
    cx = torch.rand(n, 1, 1, generator=gen, device=x.device) * w
    ys = torch.arange(h, device=x.device).view(1, h, 1) + 0.5
    xs = torch.arange(w, device=x.device).view(1, 1, w) + 0.5
    inside = ((ys - cy).abs() < half) & ((xs - cx).abs() < half)
    return x.masked_fill(inside.unsqueeze(1), 0.0)


def class_thresholds(selected: torch.Tensor, num_classes: int, tau: float,
                     adaptive: bool, floor: float = 0.0) -> torch.Tensor:
    """FlexMatch's per-class thresholds tau * M(beta_c), M(x) = x / (2 - x), where beta_c is the
    number of unlabelled cells confidently predicted as c over the largest such count (or over
    the cells not yet predicted confidently, while they are more: the threshold warm-up), and
    at least `floor`: FlexMatch starts every threshold at 0, which its million-step runs
    outgrow; in a few hundred steps from few labels it let the first wrong pseudo-labels teach
    the network (a synthetic test went from 38 % to 29 %)."""
    if not adaptive:
        return torch.full((num_classes,), tau)
    counts = torch.bincount(selected[selected >= 0], minlength=num_classes).float()
    denominator = max(float(counts.max()), float((selected < 0).sum()), 1.0)
    beta = counts / denominator
    return (tau * beta / (2 - beta)).clamp(min=min(floor, tau))


# settings added after states were saved, with the default those states ran under
ADDED_LATER = {"shift_augment": 0.0, "teacher": "student", "align": False}


def _fingerprint(cfg: ConsistencyConfig, labels: np.ndarray, n_unlabelled: int,
                 model: nn.Module) -> str:
    """What a resumable state belongs to: settings (not the budget), labels, data, the backbone
    it started from. Not the head's start: it is fitted on features computed in bf16 or fp32 as
    a timing at process start decides (device.cpu_has_fast_bf16), so two processes may start
    from slightly different heads (seen: the same command in a later process refused a
    500-step run's state); a resumed run loads the state's weights anyway."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("minutes", "steps", "save_every")}
    for name, default in ADDED_LATER.items():  # at its default, a state saved before it resumes
        if settings[name] == default:
            del settings[name]
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(np.asarray(labels, dtype=np.int64).tobytes())
    digest.update(str(n_unlabelled).encode())
    for tensor in model.backbone.state_dict().values():
        digest.update(tensor.detach().cpu().float().numpy().tobytes()[:4096])
    digest.update(str(tuple(model.head.weight.shape)).encode())
    return digest.hexdigest()[:32]


@dataclass
class _State:
    step: int
    total: int
    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    selected: torch.Tensor  # per unlabelled cell: its confident class, -1 while none
    order_gen: torch.Generator  # which cells (CPU)
    view_gen: torch.Generator  # their views (on the device)
    history: list[dict]
    # distribution alignment: the labelled cells' class shares and the running mean prediction
    target_shares: torch.Tensor | None = None
    mean_prediction: torch.Tensor | None = None

    def to_dict(self, fingerprint: str) -> dict[str, Any]:
        return {"fingerprint": fingerprint, "step": self.step, "total": self.total,
                "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "selected": self.selected,
                "order_generator": self.order_gen.get_state(),
                "view_generator": self.view_gen.get_state(), "history": self.history,
                "mean_prediction": self.mean_prediction}


def _optimizer(model: HeadedBackbone, cfg: ConsistencyConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW([{"params": model.head.parameters(), "lr": cfg.lr},
                              {"params": model.backbone.parameters(),
                               "lr": cfg.lr * cfg.backbone_lr_ratio}],
                             weight_decay=cfg.weight_decay)


def _set_lr(optimizer: torch.optim.Optimizer, cfg: ConsistencyConfig, step: int, total: int) -> None:
    scale = 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))
    for group, base in zip(optimizer.param_groups, (cfg.lr, cfg.lr * cfg.backbone_lr_ratio)):
        group["lr"] = base * scale


def train_consistency(model: HeadedBackbone, labelled: torch.Tensor, labels: np.ndarray,
                      unlabelled: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                      input_size: int, cfg: ConsistencyConfig, device: torch.device,
                      state_path: str | Path | None = None,
                      progress: bool | None = False) -> tuple[HeadedBackbone, dict[str, Any]]:
    """Consistency-train `model` (its head already fitted) on uint8 `labelled` images with
    `labels` and uint8 `unlabelled` images; returns the weight average (EMA) and a report.
    With `state_path`, the run is saved there every `save_every` steps and continues from it
    when it holds a run of the same settings, labels and start (bit for bit on the CPU)."""
    cfg.check()
    labels = np.asarray(labels, dtype=np.int64)
    if not len(unlabelled) and cfg.unlabelled_weight > 0:
        raise UserError("consistency training learns from unlabelled cells and there are none; "
                        "give the whole folder, not only the labelled cells", param="head")
    num_classes = model.head.out_features
    fingerprint = _fingerprint(cfg, labels, len(unlabelled), model)
    model = model.to(device)
    state = _State(0, cfg.steps, model, copy.deepcopy(model).eval(), _optimizer(model, cfg),
                   torch.full((len(unlabelled),), -1, dtype=torch.long),
                   torch.Generator().manual_seed(cfg.seed),
                   torch.Generator(device).manual_seed(cfg.seed + 1), [])
    if cfg.align:
        state.target_shares = class_shares(labels, num_classes)
        state.mean_prediction = torch.full((num_classes,), 1.0 / num_classes)
    resumed = _resume(state, state_path, fingerprint)
    weak = BatchAugment(dataclasses.replace(WEAK, stain=cfg.stain), mean, std)
    strong = BatchAugment(dataclasses.replace(STRONG, stain=cfg.stain), mean, std)
    y_all = torch.as_tensor(labels)
    started, deadline = time.monotonic(), None
    if cfg.minutes is not None and not resumed:
        deadline = started + cfg.minutes * 60
    bar = ui.bar(total=state.total, desc="consistency training", unit="step", enabled=progress)
    bar.update(state.step)
    step_times: list[float] = []
    while state.step < state.total:
        t0 = time.monotonic()
        record = _step(state, cfg, labelled, y_all, unlabelled, weak, strong, input_size,
                       num_classes, device)
        state.step += 1
        step_times.append(time.monotonic() - t0)
        if deadline is not None and len(step_times) == TIMED_STEPS + 1:
            step_s = float(np.median(step_times[1:]))
            state.total = max(state.step, int((deadline - time.monotonic()) * BUDGET_SAFETY
                                              / step_s) + state.step)
            bar.total = state.total
            ui.note(f"budget {cfg.minutes:g} min: a step takes {step_s:.2f} s here, so "
                    f"{state.total} steps")
        state.history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", pseudo=f"{record['mask']:.0%}")
        bar.update(1)
        if state_path is not None and (state.step % cfg.save_every == 0 or state.step == state.total):
            Path(state_path).parent.mkdir(parents=True, exist_ok=True)
            torch_save(state.to_dict(fingerprint), state_path)
        if deadline is not None and time.monotonic() > deadline and state.step < state.total:
            ui.note(f"budget {cfg.minutes:g} min spent at step {state.step} of {state.total}: "
                    f"stopped early (the machine slowed down)")
            state.total = state.step
    bar.close()
    recent = state.history[-50:]
    report = {"steps": state.step, "resumed_at": resumed, "seconds": time.monotonic() - started,
              "step_seconds": float(np.median(step_times)) if step_times else None,
              "pseudo_label_rate": float(np.mean([r["mask"] for r in recent])) if recent else 0.0,
              "class_thresholds": class_thresholds(state.selected, num_classes, cfg.threshold,
                                                   cfg.adaptive, cfg.threshold_floor).tolist(),
              "config": asdict(cfg)}
    return state.ema.eval(), report


def _resume(state: _State, state_path: str | Path | None, fingerprint: str) -> int | None:
    """Load a saved state of the same run into `state`; the step it resumed at, else None."""
    if state_path is None or not Path(state_path).is_file():
        return None
    saved = torch.load(state_path, map_location="cpu", weights_only=True)
    if saved.get("fingerprint") != fingerprint:
        raise UserError(f"{state_path} holds consistency training of other settings, labels or "
                        f"backbone; delete it or give another output folder", param="out")
    state.model.load_state_dict(saved["model"])
    state.ema.load_state_dict(saved["ema"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.selected.copy_(saved["selected"])
    state.order_gen.set_state(saved["order_generator"])
    state.view_gen.set_state(saved["view_generator"])  # a ByteTensor on the CPU for any device
    state.step, state.total, state.history = int(saved["step"]), int(saved["total"]), list(saved["history"])
    state.mean_prediction = saved.get("mean_prediction")
    return state.step


def _step(state: _State, cfg: ConsistencyConfig, labelled: torch.Tensor, y_all: torch.Tensor,
          unlabelled: torch.Tensor, weak: BatchAugment, strong: BatchAugment, size: int,
          num_classes: int, device: torch.device) -> dict[str, float]:
    """One FixMatch step with FlexMatch thresholds (labelled cells only when
    `unlabelled_weight` is 0: plain fine-tuning), then the EMA update."""
    from lightly.models.utils import update_momentum

    gen, model = state.view_gen, freeze_batchnorm(state.model)
    li = torch.randint(len(labelled), (cfg.labelled_batch,), generator=state.order_gen)
    rows = torch.randint(len(unlabelled), (cfg.labelled_batch * cfg.unlabelled_ratio,),
                         generator=state.order_gen) if cfg.unlabelled_weight > 0 else None
    x_l, y = labelled[li].to(device), y_all[li].to(device)
    _set_lr(state.optimizer, cfg, state.step, state.total)
    with autocast(device, cfg.precision):
        if rows is not None:
            x_u = unlabelled[rows].to(device)
            pseudo, mask = _pseudo_labels(state, cfg, x_u, rows, weak, size, num_classes)
        views = weak.view(x_l, gen, size, WEAK.crop_scale)
        if rows is not None:
            x_s = _shifted(unlabelled[rows], cfg.shift_augment, state.order_gen).to(device)
            views = torch.cat([views, cutout(strong.view(x_s, gen, size, STRONG.crop_scale), cfg.cutout, gen)])
        logits = model(views).float()
    loss_l = F.cross_entropy(logits[:len(li)], y)
    loss_u = torch.zeros((), device=device)
    if rows is not None:
        loss_u = (F.cross_entropy(logits[len(li):], pseudo, reduction="none") * mask).mean()
    loss = loss_l + cfg.unlabelled_weight * loss_u
    if not torch.isfinite(loss):
        from ssl_blood.errors import RunFailed

        raise RunFailed(f"consistency training diverged at step {state.step} (loss {loss.item()}); "
                        f"lower `lr`")
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    update_momentum(state.model, state.ema, cfg.ema_decay)
    return {"loss": loss.item(), "loss_l": loss_l.item(), "loss_u": loss_u.item(),
            "mask": float(mask.mean()) if rows is not None else 0.0}


def _shifted(images: torch.Tensor, share: float, gen: torch.Generator) -> torch.Tensor:
    """uint8 `images` with a `share` of them under one random shift each (`cfg.shift_augment`);
    the draws come from `gen`, so a resumed run repeats them."""
    if share <= 0:
        return images
    from ssl_blood.data.shifts import shifted_copies

    chosen = (torch.rand(len(images), generator=gen) < share).nonzero().flatten()
    if not len(chosen):
        return images
    seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
    moved, _ = shifted_copies(images[chosen].numpy(), 1, seed)
    out = images.clone()
    out[chosen] = torch.from_numpy(moved)
    return out


def _pseudo_labels(state: _State, cfg: ConsistencyConfig, x_u: torch.Tensor, rows: torch.Tensor,
                   weak: BatchAugment, size: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weak views' pseudo-labels of unlabelled cells `x_u` (positions `rows`) and the mask
    of those above their class's threshold; updates the classes' learning effects."""
    teacher = state.ema if cfg.teacher == "ema" else state.model
    with torch.no_grad():
        probs = teacher(weak.view(x_u, state.view_gen, size, WEAK.crop_scale)).float().softmax(1)
    if cfg.align:
        probs = _aligned(state, probs)
    confidence, pseudo = probs.max(1)
    over_tau = (confidence > cfg.threshold).cpu()
    state.selected[rows[over_tau]] = pseudo.cpu()[over_tau]
    thresholds = class_thresholds(state.selected, num_classes, cfg.threshold, cfg.adaptive,
                                  cfg.threshold_floor)
    return pseudo, (confidence >= thresholds.to(confidence.device)[pseudo]).float()


def class_shares(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """The labelled cells' class shares, one pseudo-count each (a class without labels is not 0)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes) + 1.0
    return torch.as_tensor(counts / counts.sum(), dtype=torch.float32)


def _aligned(state: _State, probs: torch.Tensor) -> torch.Tensor:
    """ReMixMatch's distribution alignment (Berthelot et al., ICLR 2020): `probs` times the
    target class shares over the running mean prediction, renormalised; the running mean is
    updated with this batch's raw mean first. Hand-written: lightly has no SSL-classification
    losses, and USB's version is tied to its own algorithm classes."""
    batch_mean = probs.mean(0).cpu()
    state.mean_prediction = ALIGN_MOMENTUM * state.mean_prediction + (1 - ALIGN_MOMENTUM) * batch_mean
    ratio = (state.target_shares / state.mean_prediction).to(probs.device)
    aligned = probs * ratio
    return aligned / aligned.sum(1, keepdim=True)

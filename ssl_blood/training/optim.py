"""Optimiser, learning-rate schedule and the batches of an epoch.

The learning rate is given at batch 256 and scaled linearly with the global batch that really
runs (`effective_batch`: the requested one clamped to the data, a multiple of the ranks); the
schedule is precomputed per step (DINO's habit): linear warm-up, then cosine decay.
"""

from __future__ import annotations

import torch
from torch import nn

from ssl_blood.errors import UserError


def effective_batch(requested: int, train_size: int, world_size: int = 1) -> int:
    """The global batch that runs: at most the training set, a multiple of the ranks, so every
    rank gets the same share and no image of a step is dropped."""
    batch = min(requested, train_size)
    batch -= batch % world_size
    if batch < 2 * world_size:
        raise UserError(f"{train_size} training image(s) is too few for {world_size} rank(s): "
                        f"contrastive and DINO losses need at least 2 per rank; give more data "
                        f"or a larger limit", param="limit")
    return batch


def peak_lr(lr_at_256: float, batch: int) -> float:
    """Linear scaling rule: `lr_at_256` is the learning rate at batch 256."""
    return lr_at_256 * batch / 256


def build_optimizer(name: str, method: nn.Module, lr: float, weight_decay: float,
                    trust_coefficient: float) -> torch.optim.Optimizer:
    """LARS, SGD or AdamW. Biases and norm layers get no weight decay and, under LARS, no
    layer-wise adaptation (lightly's LARS adapts only groups with weight decay)."""
    from lightly.models.utils import get_weight_decay_parameters
    from lightly.utils.lars import LARS

    decay, no_decay = get_weight_decay_parameters([method])
    groups = [{"params": [p for p in decay if p.requires_grad], "weight_decay": weight_decay},
              {"params": [p for p in no_decay if p.requires_grad], "weight_decay": 0.0}]
    if name == "lars":
        return LARS(groups, lr=lr, momentum=0.9, trust_coefficient=trust_coefficient)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=lr)


def lr_schedule(peak: float, epochs: int, warmup_epochs: int, final_ratio: float,
                steps_per_epoch: int) -> list[float]:
    """Learning rate of every step: linear warm-up, then cosine decay (lightly's helper)."""
    from lightly.utils.scheduler import cosine_warmup_schedule

    total = epochs * steps_per_epoch
    warmup = warmup_epochs * steps_per_epoch
    # plain floats: numpy scalars in the optimizer state would break weights_only loading
    return [float(cosine_warmup_schedule(step, total, peak, peak * final_ratio, warmup, 0.0))
            for step in range(total)]


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 1_009 + stream) % (2**63)


def epoch_batches(n: int, global_batch: int, epoch: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> list[torch.Tensor]:
    """This rank's index batches for one epoch: one shared permutation, disjoint equal slices
    per rank, incomplete last batch dropped (contrastive losses dislike tiny batches).
    `global_batch` must come from `effective_batch`."""
    if global_batch % world_size or global_batch > n:
        raise ValueError(f"global batch {global_batch} must divide by {world_size} and fit {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
    local = global_batch // world_size
    return [perm[s * global_batch + rank * local: s * global_batch + (rank + 1) * local]
            for s in range(n // global_batch)]

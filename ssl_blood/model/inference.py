"""One batched inference loop for every model that maps images to vectors (backbone features,
classifier scores), in the precision and memory format the model was trained with."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ssl_blood import ui
from ssl_blood.model.augment import eval_preprocess
from ssl_blood.device import autocast


def inference_batch(input_size: int) -> int:
    """Images per forward pass: 256 at 32 px (measured fastest on a 2-core CPU: activations stay
    in cache), fewer for larger images, at least 16."""
    return int(np.clip(256 * (32 / max(input_size, 1)) ** 2, 16, 256))


# The 8 dihedral transforms of a square image (quarter turns, then each mirrored), ordered so that
# the first 2 (identity, half turn), the first 4 (every quarter turn) and all 8 are the subsets
# averaged by `views`: a cell has no orientation, so each is the same cell.
DIHEDRAL = ((0, False), (2, False), (1, False), (3, False), (0, True), (2, True), (1, True), (3, True))
VIEWS = (1, 2, 4, 8)


def dihedral_views(x: torch.Tensor, views: int) -> torch.Tensor:
    """(views * B, C, H, W): the first `views` dihedral transforms of the batch `x`, view-major."""
    if views not in VIEWS:
        from ssl_blood.errors import UserError

        raise UserError(f"`views` {views} must be one of {', '.join(map(str, VIEWS))}", param="views")
    if views == 1:
        return x
    return torch.cat([_quarter_turns(x.flip(3) if mirror else x, turns) for turns, mirror in DIHEDRAL[:views]])


def _quarter_turns(x: torch.Tensor, turns: int) -> torch.Tensor:
    """torch.rot90(x, turns, (2, 3)) written with flips and a transpose, which ONNX exports
    (its exporter has no rot90)."""
    if turns == 1:
        return x.transpose(2, 3).flip(2)
    if turns == 2:
        return x.flip(2).flip(3)
    if turns == 3:
        return x.transpose(2, 3).flip(3)
    return x


def frozen_for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy with each BatchNorm folded into the convolution before it (torch.fx's
    `fuse`): the same outputs, one memory pass less per layer. Falls back to the model itself
    when it cannot be traced."""
    import copy

    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(copy.deepcopy(model).eval())
    except Exception:  # a backbone fx cannot trace: run it as it is
        return model.eval()


@torch.no_grad()
def run_model(model: nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              input_size: int, device: torch.device, *, precision: str = "auto",
              channels_last: bool = False, post: Callable[[torch.Tensor], torch.Tensor] | None = None,
              batch_size: int | None = None, progress: bool | None = False,
              desc: str = "embedding", views: int = 1) -> np.ndarray:
    """`post(model(x))` (N, D) float32 of uint8 images (N, C, H, W), model in eval mode; the
    images move to `device` one batch at a time (they may be memory-mapped). `views` > 1:
    model(x) averaged over that many dihedral transforms of each image (`DIHEDRAL`), then
    `post`; a forward pass then holds `batch_size` views, not images."""
    was_training = model.training
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    batch_size = max(1, (batch_size or inference_batch(input_size)) // views)
    chunks = []
    starts = range(0, len(images), batch_size)
    for start in ui.bar(starts, total=len(starts), desc=desc, unit="batch", enabled=progress):
        x = eval_preprocess(images[start:start + batch_size].to(device, non_blocking=True),
                            mean, std, input_size)
        with autocast(device, precision):
            out = model(dihedral_views(x, views).contiguous(memory_format=memory_format))
        out = out.float().reshape(views, len(x), -1).mean(0)
        out = out if post is None else post(out)
        chunks.append(out.cpu())
    model.train(was_training)
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(chunks).numpy().astype(np.float32, copy=False)

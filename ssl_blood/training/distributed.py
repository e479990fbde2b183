"""Several processes, one run: torchrun's process group, rank bookkeeping, global BatchNorm.

Under torchrun each rank trains on a disjoint slice of every batch. BatchNorm is made global
(`sync_batch_norm`): with per-rank statistics a positive pair is normalised with statistics its
own rank computed, which lets SimCLR tell it from the negatives gathered from other ranks (the
reason SimCLR uses global BN). Decisions that stop a run (non-finite loss, collapse) are taken
on all-reduced numbers, so every rank stops together instead of one waiting forever.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device: str) -> "Distributed":
        """Join the process group torchrun describes (or one the caller already set up)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world <= 1:
            return cls()
        use_cuda = device != "cpu" and torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
        return cls(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", 0)))

    def device(self, device: torch.device) -> torch.device:
        """This rank's GPU (its local rank) when training on CUDA."""
        if device.type == "cuda" and self.enabled:
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """All-reduce mean over ranks (a copy; the value itself alone)."""
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value

    def wrap(self, method: nn.Module, device: torch.device) -> nn.Module:
        """Global BN, then DistributedDataParallel (the method itself alone)."""
        if not self.enabled:
            return method
        method = sync_batch_norm(method)
        return nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None)


class _GlobalBatchNorm:
    """BatchNorm whose batch statistics are all-reduced over the ranks, for CPU ranks (gloo):
    torch's SyncBatchNorm (and DDP around it) accepts only GPU tensors. The statistics go
    through the differentiable `torch.distributed.nn.all_reduce`, so gradients are global too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)  # type: ignore[misc]
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        count = xf.numel() / xf.shape[1] * dist.get_world_size()
        mean = all_reduce(xf.sum(dims)) / count
        var = all_reduce((xf * xf).sum(dims)) / count - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1 / int(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * count / max(count - 1, 1), alpha=m)
        shape = [1, -1] + [1] * (x.dim() - 2)
        out = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


class _GlobalBatchNorm1d(_GlobalBatchNorm, nn.BatchNorm1d):
    pass


class _GlobalBatchNorm2d(_GlobalBatchNorm, nn.BatchNorm2d):
    pass


_GLOBAL = {nn.BatchNorm1d: _GlobalBatchNorm1d, nn.BatchNorm2d: _GlobalBatchNorm2d}


def sync_batch_norm(module: nn.Module) -> nn.Module:
    """Make every BatchNorm layer of `module` global across ranks, in place: torch's
    SyncBatchNorm for a module on a GPU, `_GlobalBatchNorm` on the CPU."""
    on_gpu = any(p.is_cuda for p in module.parameters())
    if on_gpu:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if type(m) in _GLOBAL:
            m.__class__ = _GLOBAL[type(m)]  # same parameters and buffers, global statistics
    return module

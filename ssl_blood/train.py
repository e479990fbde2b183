"""The pretraining loop: one straight loop over epochs and steps.

Per step: take a batch of uint8 images already on the device, make views in batch there,
forward the method (its loss), step the optimiser with the precomputed lr for this step, let the
method do its after-step work (DINO's EMA teacher). Per epoch: kNN accuracy on val every few
epochs, one line in metrics.jsonl, an atomic checkpoint. Randomness is drawn from generators
seeded by (seed, epoch, rank), so `--resume` continues exactly as an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ssl_blood import __version__
from ssl_blood.augment import BatchAugment, lightly_transform
from ssl_blood.checkpoint import FORMAT_VERSION, atomic_save, load_checkpoint
from ssl_blood.config import RUNTIME_FIELDS, PretrainConfig
from ssl_blood.data import CellData, DataSource, available_splits, channel_stats, load_split
from ssl_blood.device import autocast as autocast_for, resolve_device
from ssl_blood.embed import extract_features
from ssl_blood.errors import RunFailed, UserError
from ssl_blood.evaluate import knn_accuracy
from ssl_blood.methods import build_method
from ssl_blood.models import build_backbone

CHECKPOINT, CONFIG, METRICS = "checkpoint.pt", "config.json", "metrics.jsonl"
RUN_FILES = (CHECKPOINT, CONFIG, METRICS)
FINITE_CHECK_EVERY = 10  # steps between loss syncs: a sync per step would stall the GPU queue


@dataclass
class PretrainResult:
    """What `pretrain` returns: the trained method, its evaluation backbone, the metrics."""

    method: nn.Module
    backbone: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None


# ----------------------------------------------------------------------------- run directory


def prepare_run_dir(out_dir: Path, resume: bool, overwrite: bool, create: bool = True) -> None:
    """Refuse to clobber an existing run; with --overwrite remove only ssl-blood's run files.
    With `create=False` only check (nothing on disk changes)."""
    if resume and overwrite:
        raise UserError("give --resume or --overwrite, not both")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a folder for the run")
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if resume:
        if not (out_dir / CHECKPOINT).exists():
            raise UserError(f"--resume: no {CHECKPOINT} in {out_dir}; drop --resume to start a new run")
        return
    if existing and not overwrite:
        raise UserError(f"--out {out_dir} already holds a run ({', '.join(existing)}); add "
                        f"--resume to continue it, --overwrite to replace it, or choose another --out")
    if not create:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in existing:
        (out_dir / name).unlink()


def check_resumable(saved: PretrainConfig, requested: PretrainConfig) -> None:
    """A resumed run must compute the same thing; only runtime settings may differ."""
    a, b = saved.to_dict(), requested.to_dict()
    changed = [k for k in a if k not in RUNTIME_FIELDS and a[k] != b.get(k)]
    if changed:
        details = "; ".join(f"{k}: run has {a[k]!r}, asked {b.get(k)!r}" for k in changed[:3])
        raise UserError(f"--resume with a different config ({details}); resume with the run's "
                        f"settings or start a new --out")


# ----------------------------------------------------------------------------- distributed


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

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def average_buffers(self, module: nn.Module) -> None:
        """Average floating-point buffers (BN running statistics) over ranks: DDP broadcasts
        them only before each forward, so each rank's last forward leaves its own values."""
        if self.enabled:
            for buffer in module.buffers():
                if buffer.is_floating_point():
                    dist.all_reduce(buffer)
                    buffer /= self.world_size

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value


def _device_for(cfg: PretrainConfig, ddp: Distributed) -> torch.device:
    device = resolve_device(cfg.device)
    if device.type == "cuda" and ddp.enabled:
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
    return device


# ----------------------------------------------------------------------------- optimisation


def build_optimizer(cfg: PretrainConfig, method: nn.Module) -> torch.optim.Optimizer:
    """LARS, SGD or AdamW; no weight decay (and no LARS scaling) on biases and norm layers."""
    from lightly.models.utils import get_weight_decay_parameters
    from lightly.utils.lars import LARS

    decay, no_decay = get_weight_decay_parameters([method])
    groups = [{"params": [p for p in decay if p.requires_grad], "weight_decay": cfg.weight_decay},
              {"params": [p for p in no_decay if p.requires_grad], "weight_decay": 0.0}]
    lr = peak_lr(cfg)
    if cfg.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=0.9)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=lr)


def peak_lr(cfg: PretrainConfig) -> float:
    """Linear scaling rule: `lr` is the learning rate at batch 256."""
    return cfg.lr * cfg.batch_size / 256


def lr_schedule(cfg: PretrainConfig, steps_per_epoch: int) -> list[float]:
    """Learning rate of every step: linear warm-up, then cosine decay (lightly's helper)."""
    from lightly.utils.scheduler import cosine_warmup_schedule

    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch
    top = peak_lr(cfg)
    # plain floats: numpy scalars in the optimizer state would break weights_only loading
    return [float(cosine_warmup_schedule(step, total, top, top * cfg.final_lr_ratio, warmup, 0.0))
            for step in range(total)]


# ----------------------------------------------------------------------------- batches


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 1_009 + stream) % (2**63)


def epoch_batches(n: int, global_batch: int, epoch: int, seed: int, ddp: Distributed) -> list[torch.Tensor]:
    """This rank's index batches for one epoch: one shared permutation, disjoint slices per
    rank, incomplete last batch dropped (contrastive losses dislike tiny batches)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
    global_batch = min(global_batch, n - n % ddp.world_size)
    local = global_batch // ddp.world_size
    steps = n // global_batch
    return [perm[s * global_batch + ddp.rank * local: s * global_batch + (ddp.rank + 1) * local]
            for s in range(steps)]


class _PILViews(torch.utils.data.Dataset):
    """lightly's PIL transforms over a CellData (the `--augment cpu` comparison path)."""

    def __init__(self, data: CellData, transform: Callable):
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        from PIL import Image

        array = self.data.images[i].permute(1, 2, 0).numpy()
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        return self.transform(image)


# ----------------------------------------------------------------------------- the loop


@dataclass
class _Run:
    """Everything one pretraining run carries from epoch to epoch."""

    cfg: PretrainConfig
    out: Path | None
    ddp: Distributed
    device: torch.device
    train: CellData
    val: CellData | None
    dataset_info: dict[str, Any]
    method: nn.Module  # the plain module: hooks, state_dict, eval backbone
    model: nn.Module  # what runs the forward: the method, or its DDP / compiled wrapper
    optimizer: torch.optim.Optimizer
    schedule: list[float]  # lr of every step
    steps_per_epoch: int
    images: torch.Tensor  # the train split, uint8, on the device
    augment: BatchAugment
    autocast: torch.autocast
    pil_views: "_PILViews | None"
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch


def pretrain(cfg: PretrainConfig, out_dir: str | Path | None = None, *, resume: bool = False,
             overwrite: bool = False, progress: bool | None = None,
             on_epoch_end: Callable[[int, dict], None] | None = None) -> PretrainResult:
    """Pretrain a backbone with SimCLR or DINO.

    Writes OUT/config.json, OUT/metrics.jsonl and OUT/checkpoint.pt (every epoch, atomically)
    when `out_dir` is given. Under torchrun, each rank trains on a disjoint shard of every batch
    and rank 0 writes the files. `on_epoch_end(epoch, record)` runs after each saved epoch.
    """
    from tqdm.auto import tqdm

    run = _setup(cfg, Path(out_dir) if out_dir is not None else None, resume, overwrite)
    bar = tqdm(total=run.total_steps, initial=run.start_epoch * run.steps_per_epoch, unit="step",
               disable=(progress is False) or not run.ddp.is_main, dynamic_ncols=True)
    for epoch in range(run.start_epoch, cfg.epochs):
        record = _train_epoch(run, epoch, bar)
        _finish_epoch(run, epoch, record)
        bar.set_postfix(epoch=epoch + 1, loss=f"{record['loss']:.4f}", img_s=f"{record['img_s']:.0f}",
                        **({"knn": f"{record['knn_val_acc']:.3f}"} if "knn_val_acc" in record else {}))
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    bar.close()
    return PretrainResult(run.method, run.method.eval_backbone(), run.history, run.out)


def _setup(cfg: PretrainConfig, out: Path | None, resume: bool, overwrite: bool) -> _Run:
    """Check the inputs, load the data onto the device, build or restore model and optimiser;
    only then touch the run folder."""
    cfg.validate()
    ddp = Distributed.setup(cfg.device)
    if out is not None and ddp.is_main:
        prepare_run_dir(out, resume, overwrite, create=False)
    state = None
    if resume:
        if out is None:
            raise UserError("--resume needs --out, the run folder to continue")
        state = load_checkpoint(out / CHECKPOINT)
        check_resumable(PretrainConfig.from_dict(state["config"]), cfg)
    device = _device_for(cfg, ddp)

    source = DataSource.from_dict(cfg.data)
    train = load_split(source, "train", cfg.limit, cfg.seed)
    if len(train) < 2 * ddp.world_size:
        raise UserError(f"{len(train)} training image(s) is too few: contrastive and DINO losses "
                        f"need at least {2 * ddp.world_size}; give more data or a larger --limit")
    val = _monitor_split(source, train, cfg)
    mean, std = channel_stats(train.images)
    input_size = cfg.input_size or train.image_size
    dataset_info = {"name": source.name, "source": source.to_dict(), "num_classes": train.num_classes,
                    "class_names": list(train.class_names), "image_size": train.image_size,
                    "input_size": input_size, "channels": train.channels, "mean": mean, "std": std}

    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.backbone, train.channels)
    method = build_method(cfg.method, backbone, cfg.simclr, cfg.dino, cfg.epochs, ddp.enabled)
    method.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    optimizer = build_optimizer(cfg, method)
    steps_per_epoch = len(epoch_batches(len(train), cfg.batch_size, 0, cfg.seed, ddp))
    start_epoch, history = 0, []
    if state is not None:
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = int(state["epoch"]), list(state.get("history", []))
        torch.set_rng_state(state["rng"]["torch"])
    model: nn.Module = method
    if ddp.enabled:
        model = nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    pil_views = None
    if cfg.augment_pipeline == "cpu":
        pil_views = _PILViews(train, lightly_transform(cfg.method, cfg.augment, input_size, mean, std))

    if out is not None and ddp.is_main:  # inputs are good: only now touch the run folder
        prepare_run_dir(out, resume, overwrite)
        cfg.save(out / CONFIG)
        _truncate_metrics(out / METRICS, start_epoch)
    return _Run(cfg, out, ddp, device, train, val, dataset_info,
                method, model, optimizer, lr_schedule(cfg, steps_per_epoch), steps_per_epoch,
                train.images.to(device), BatchAugment(cfg.augment, mean, std, input_size),
                autocast_for(device, cfg.precision), pil_views, start_epoch, history)


def _train_epoch(run: _Run, epoch: int, bar) -> dict[str, Any]:
    """One pass over this rank's batches; returns the epoch's record (loss, lr, img/s)."""
    cfg = run.cfg
    run.method.train()
    batches = epoch_batches(len(run.train), cfg.batch_size, epoch, cfg.seed, run.ddp)
    gen = torch.Generator(run.device).manual_seed(epoch_seed(cfg.seed, epoch, 1 + run.ddp.rank))
    loss_sum = torch.zeros((), device=run.device)
    started = time.perf_counter()
    for i, views in enumerate(_view_batches(batches, cfg, run.images, run.augment, gen,
                                            run.pil_views, epoch)):
        step = epoch * run.steps_per_epoch + i
        loss_sum += training_step(run.model, run.method, run.optimizer, views, epoch, step,
                                  run.total_steps, run.schedule[step], run.autocast,
                                  cfg.channels_last)
        if (i + 1) % FINITE_CHECK_EVERY == 0 or i + 1 == len(batches):
            _stop_if_not_finite(loss_sum, epoch, step, cfg)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum.item() / (i + 1):.4f}")
        bar.update(1)
    seconds = time.perf_counter() - started
    run.ddp.average_buffers(run.method)
    return {"epoch": epoch + 1, "loss": float(run.ddp.mean(loss_sum / max(1, len(batches)))),
            "lr": run.schedule[(epoch + 1) * run.steps_per_epoch - 1],
            "img_s": sum(len(b) for b in batches) * run.ddp.world_size / seconds, "seconds": seconds}


def _finish_epoch(run: _Run, epoch: int, record: dict[str, Any]) -> None:
    """kNN monitor when due, collapse check, then metrics line and checkpoint (rank 0)."""
    if run.val is not None and run.ddp.is_main and _knn_due(run.cfg, epoch):
        record["knn_val_acc"] = _knn_monitor(run, run.method.eval_backbone())
    record.update(run.method.check_collapse(record["loss"], epoch + 1))
    run.history.append(record)
    if run.out is not None and run.ddp.is_main:
        atomic_save(_checkpoint(run, epoch + 1), run.out / CHECKPOINT)
        with open(run.out / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
    run.ddp.barrier()


def training_step(model: nn.Module, method: nn.Module, optimizer: torch.optim.Optimizer,
                  views: list[torch.Tensor], epoch: int, step: int, total_steps: int, lr: float,
                  autocast: torch.autocast, channels_last: bool) -> torch.Tensor:
    """One optimisation step on a list of views; returns the detached loss (no sync).

    `model` is what runs the forward (the method, or its DDP / compiled wrapper); `method` is
    the plain module whose hooks run around the optimiser step.
    """
    if channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    with autocast:
        loss = model(views, epoch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    method.before_optimizer_step(epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    method.after_optimizer_step(step, total_steps)
    return loss.detach().float()


def _view_batches(batches, cfg, images, augment, gen, pil_views, epoch):
    """Yield each step's list of views: made on the device, or by lightly's PIL pipeline."""
    if pil_views is None:
        for index in batches:
            yield augment.views(cfg.method, images[index.to(images.device)], gen)
        return
    loader = torch.utils.data.DataLoader(
        pil_views, batch_sampler=[b.tolist() for b in batches], num_workers=cfg.num_workers,
        pin_memory=images.device.type == "cuda",
        generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, 99)))
    for views in loader:
        yield [v.to(images.device, non_blocking=True) for v in views]


def _stop_if_not_finite(loss_sum: torch.Tensor, epoch: int, step: int, cfg: PretrainConfig) -> None:
    if not math.isfinite(float(loss_sum)):
        raise RunFailed(f"the loss became non-finite at epoch {epoch + 1}, step {step + 1}; lower "
                        f"--lr (now {cfg.lr}) or use --optimizer lars; the last good checkpoint "
                        f"is kept")


def _monitor_split(source: DataSource, train: CellData, cfg: PretrainConfig) -> CellData | None:
    """The labelled val split for the kNN monitor, if the data has one."""
    if cfg.knn_every < 0 or not train.is_labeled or "val" not in available_splits(source):
        return None
    val = load_split(source, "val", cfg.limit, cfg.seed)
    return val if val.is_labeled else None


def _knn_due(cfg: PretrainConfig, epoch: int) -> bool:
    last = epoch + 1 == cfg.epochs
    return last or (cfg.knn_every > 0 and (epoch + 1) % cfg.knn_every == 0)


def _knn_monitor(run: _Run, backbone: nn.Module) -> float:
    info = run.dataset_info
    features = [extract_features(backbone, part.images, info["mean"], info["std"],
                                 info["input_size"], run.device) for part in (run.train, run.val)]
    return knn_accuracy(features[0], run.train.labels.numpy(), features[1], run.val.labels.numpy(),
                        run.train.num_classes, run.cfg.knn_k, run.cfg.knn_temperature)


def _checkpoint(run: _Run, epoch: int) -> dict[str, Any]:
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "format_version": FORMAT_VERSION,
        "ssl_blood_version": __version__,
        "config": run.cfg.to_dict(),
        "dataset": run.dataset_info,
        "backbone_name": run.cfg.backbone,
        "backbone": run.method.eval_backbone().state_dict(),
        "method": run.method.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "epoch": epoch,
        "history": run.history,
        "rng": rng,
    }


def _truncate_metrics(path: Path, start_epoch: int) -> None:
    """On resume, drop metric lines of epochs that will be trained again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["epoch"] <= start_epoch]
    path.write_text("".join(line + "\n" for line in kept))


def resume_config(out_dir: str | Path, overrides: dict[str, Any]) -> PretrainConfig:
    """The config of the run in `out_dir` with explicitly given settings applied (for --resume)."""
    path = Path(out_dir) / CHECKPOINT
    saved = PretrainConfig.from_dict(load_checkpoint(path)["config"]) if path.exists() else None
    if saved is None:
        raise UserError(f"--resume: no {CHECKPOINT} in {out_dir}; drop --resume to start a new run")
    return replace(saved, **overrides)

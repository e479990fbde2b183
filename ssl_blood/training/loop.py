"""The pretraining loop: one straight loop over epochs and steps.

Per step: take a batch of uint8 images (resident on the device, or streamed from the decode
cache), make the views the method asks for in batch on the device, forward the method (its
loss), step the optimiser at the precomputed lr of this step, let the method do its after-step
work (DINO's EMA teacher). Per epoch: kNN accuracy on val every few epochs, the collapse check,
an atomic checkpoint (refused if any weight is non-finite), one line in metrics.jsonl.
Randomness is drawn from generators seeded by (seed, epoch, rank), so `resume` continues
bit-exactly as an uninterrupted run would on the CPU (on a GPU, up to cuDNN's nondeterminism).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ssl_blood import ui
from ssl_blood.model.augment import BatchAugment, ViewGroup
from ssl_blood.model.checkpoint import (check_weights, dataset_info, load_checkpoint, make_checkpoint,
                                  save_checkpoint)
from ssl_blood.training.config import RUNTIME_FIELDS, PretrainConfig
from ssl_blood.data import CellData, DataSource, available_splits, channel_stats, load_split, stratified_indices
from ssl_blood.device import autocast, resolve_device, uses_bf16
from ssl_blood.training.distributed import Distributed
from ssl_blood.errors import RunFailed, UserError
from ssl_blood.methods import Method, MethodSetup, build_method, method_class
from ssl_blood.model.backbones import build_backbone, resolve_stem
from ssl_blood.training.optim import (build_optimizer, effective_batch, epoch_batches, epoch_seed,
                             lr_schedule, peak_lr)
from ssl_blood.files import write_text
from ssl_blood.training.run_dir import RunDir

FINITE_CHECK_EVERY = 10  # steps between loss syncs: a sync per step would stall the GPU queue
MONITOR_GALLERY = 20_000  # labelled train cells the kNN monitor embeds, at most (stratified)


@dataclass
class PretrainResult:
    """What `pretrain` returns: the trained method, its evaluation backbone, the metrics."""

    method: nn.Module
    backbone: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None


# ----------------------------------------------------------------------------- one step


@dataclass
class Trainer:
    """What one optimisation step needs: the model that runs the forward (the method, or its
    DDP / compiled wrapper), the plain method whose hooks run around the optimiser step, the
    optimiser and the precision."""

    model: nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    autocast: torch.autocast
    channels_last: bool

    def step(self, views: list[torch.Tensor], epoch: int, step: int, total_steps: int,
             lr: float) -> torch.Tensor:
        """One step on a list of views; returns the detached loss (no device sync)."""
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with self.autocast:
            loss = self.model(views, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.method.before_optimizer_step(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.method.after_optimizer_step(step, total_steps)
        return loss.detach().float()


# ----------------------------------------------------------------------------- batches of images


class ImageFeed:
    """uint8 batches of the train split on the training device: the whole split moved there
    once ("memory"), or each batch read from disk and moved ("stream"), so memory use does not
    grow with the dataset. "auto" streams when the split would take more than half of the
    device's free memory."""

    def __init__(self, data: CellData, device: torch.device, mode: str = "auto"):
        self.device = device
        self.mode = mode if mode != "auto" else ("stream" if _too_big(data, device) else "memory")
        if self.mode == "memory":
            self.images = data.images.to(device)
            if device.type == "cpu" and data.image_file is not None:
                self.images = self.images.clone()  # off the memory map: really in memory
            self._reader = None
        else:
            self.images = data.images
            self._reader = _RowReader(data) if data.image_file is not None else None

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        if self.mode == "memory":
            return self.images[index.to(self.device)]
        rows = self._reader(index) if self._reader is not None else self.images[index]
        return rows.to(self.device, non_blocking=True)


def _too_big(data: CellData, device: torch.device) -> bool:
    need = data.images.numel()  # uint8: one byte per value
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return need > 0.5 * free


class _RowReader:
    """Rows of the decode cache read with `os.pread` in sorted order, not through a memory map:
    mapped pages stay resident (and counted) after use; read pages do not."""

    def __init__(self, data: CellData):
        self.shape = tuple(data.images.shape[1:])
        self.row_bytes = int(np.prod(self.shape))
        header = np.load(data.image_file, mmap_mode="r").offset  # type: ignore[attr-defined]
        self.base = header + data.row_offset * self.row_bytes
        self.fd = os.open(data.image_file, os.O_RDONLY)

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(index)
        out = np.empty((len(index),) + self.shape, dtype=np.uint8)
        for position, row in zip(order.tolist(), index[order].tolist()):
            out[position] = np.frombuffer(
                os.pread(self.fd, self.row_bytes, self.base + row * self.row_bytes),
                dtype=np.uint8).reshape(self.shape)
        return torch.from_numpy(out)

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.close(self.fd)


# ----------------------------------------------------------------------------- the run


@dataclass
class _Run:
    """Everything one pretraining run carries from epoch to epoch."""

    cfg: PretrainConfig
    run_dir: RunDir | None
    ddp: Distributed
    device: torch.device
    train: CellData
    monitor: tuple[CellData, CellData] | None  # (labelled train, val) for the kNN monitor
    dataset: dict[str, Any]
    stem: str
    method: Method
    trainer: Trainer
    views: list[ViewGroup]
    augment: BatchAugment
    feed: ImageFeed
    batch_size: int  # the global batch that runs
    steps_per_epoch: int
    schedule: list[float]  # lr of every step
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch


def pretrain(cfg: PretrainConfig, out_dir: str | Path | None = None, *, resume: bool = False,
             overwrite: bool = False, force: bool = False, progress: bool | None = None,
             on_epoch_end: Callable[[int, dict], None] | None = None) -> PretrainResult:
    """Pretrain a backbone with a registered method (SimCLR, DINO).

    Writes OUT/config.json, OUT/metrics.jsonl and OUT/checkpoint.pt (every epoch, atomically)
    when `out_dir` is given, holding the folder's lock meanwhile. Under torchrun each rank trains
    on a disjoint shard of every batch and rank 0 writes the files. `on_epoch_end(epoch, record)`
    runs after each saved epoch. `force` resumes in another precision.
    """
    cfg.validate()
    ddp = Distributed.setup(cfg.device)
    run_dir = RunDir(out_dir) if out_dir is not None else None
    writes = run_dir is not None and ddp.is_main
    if writes:
        run_dir.lock().refuse_if_held()  # before minutes of loading, not after
        run_dir.check_new_or_resume(resume, overwrite)
    if resume and run_dir is None:
        raise UserError("`resume` needs out_dir, the run folder to continue", param="resume")
    started = time.monotonic()
    if cfg.minutes is not None and not resume:
        cfg = size_to_minutes(cfg, ddp, started=started)
    run = _setup(cfg, run_dir, ddp, resume, force)
    with run_dir.lock() if writes else contextlib.nullcontext():
        if writes:
            _open_run_folder(run, resume, overwrite)
        bar = ui.bar(total=run.total_steps, initial=run.start_epoch * run.steps_per_epoch,
                     desc=f"pretraining {cfg.method}", unit="step",
                     enabled=False if (progress is False or not ddp.is_main) else progress)
        deadline = started + cfg.minutes * 60 if cfg.minutes is not None and not resume else None
        epoch = run.start_epoch
        while epoch < run.cfg.epochs:
            record = _train_epoch(run, epoch, bar)
            if deadline is not None and epoch == 0:
                _replan(run, deadline, record["seconds"], bar)
            _finish_epoch(run, epoch, record)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)
            epoch += 1
        bar.close()
    return PretrainResult(run.method, run.method.eval_backbone(), run.history,
                          run_dir.path if run_dir else None)


def _setup(cfg: PretrainConfig, run_dir: RunDir | None, ddp: Distributed, resume: bool,
           force: bool) -> _Run:
    """Check the inputs, load the data onto the device, build or restore model and optimiser;
    nothing is written (a refused run leaves no trace)."""
    state = None
    if resume:
        state = load_checkpoint(run_dir.checkpoint)  # type: ignore[union-attr]
        check_resumable(PretrainConfig.from_dict(state["config"]), cfg, force)
    device = ddp.device(resolve_device(cfg.device))

    source = DataSource.from_dict(cfg.data)
    train = load_split(source, "train", cfg.limit, cfg.seed)
    batch = effective_batch(cfg.batch_size, len(train), ddp.world_size)
    if batch != cfg.batch_size and ddp.is_main:
        ui.note(f"batch_size {cfg.batch_size} runs as {batch} (the training set has {len(train)} "
                f"images); the learning rate is scaled for {batch}")
    mean, std = channel_stats(train.images)
    input_size = cfg.input_size or train.image_size
    stem = resolve_stem(cfg.stem, input_size)
    if cfg.stem == "auto" and stem != "s1" and ddp.is_main and not resume:
        ui.note(f"stem {stem} for {input_size}-px views (see docs/user-guide.md, 'Any image size')")
    dataset = dataset_info(source.to_dict(), train.class_names, train.image_size, input_size,
                           train.channels, mean, std, source.name)

    torch.manual_seed(cfg.seed)
    setup = MethodSetup(cfg.epochs, input_size, tuple(cfg.augment.crop_scale), ddp.enabled)
    method = build_method(cfg.method, build_backbone(cfg.backbone, train.channels, stem),
                          cfg.method_config, setup)
    method.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    optimizer = build_optimizer(cfg.optimizer, method, peak_lr(cfg.lr, batch), cfg.weight_decay,
                                cfg.lars_trust_coefficient)
    steps_per_epoch = len(train) // batch
    start_epoch, history = 0, []
    if state is not None:
        method.load_state_dict(method_class(cfg.method).migrate_state(dict(state["method"])))
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = int(state["epoch"]), list(state.get("history", []))
        _restore_rng(state.get("rng", {}))
    model: nn.Module = ddp.wrap(method, device)
    if cfg.compile:
        model = torch.compile(model)
    trainer = Trainer(model, method, optimizer, autocast(device, cfg.precision), cfg.channels_last)
    return _Run(cfg, run_dir, ddp, device, train, _monitor_splits(source, train, cfg), dataset,
                stem, method, trainer, method.view_spec(), BatchAugment(cfg.augment, mean, std),
                ImageFeed(train, device, cfg.stream), batch, steps_per_epoch,
                lr_schedule(peak_lr(cfg.lr, batch), cfg.epochs, cfg.warmup_epochs,
                            cfg.final_lr_ratio, steps_per_epoch),
                start_epoch, history)


BUDGET_SAFETY = 0.95  # share of the remaining budget planned for training: the rest absorbs noise
MEASURE_STEPS = 8  # timed steps (after 2 untimed ones) to measure the step time


def size_to_minutes(cfg: PretrainConfig, ddp: Distributed, started: float) -> PretrainConfig:
    """`cfg` with its epochs (and warm-up, in proportion) sized so the run ends within
    `cfg.minutes` of `started`: a few steps and one kNN check are timed on a throwaway copy of
    the run (same data, model and batch), then setup, epochs and checks are planned into what
    is left. Says up front how many steps and when it ends."""
    import datetime

    if not (cfg.minutes and cfg.minutes > 0):
        raise UserError(f"`minutes` {cfg.minutes:g} must be a positive number of minutes", param="minutes")
    if ddp.enabled:
        raise UserError("`minutes` sizes a single-process run; under torchrun set `epochs`",
                        param="minutes")
    setup_started = time.monotonic()
    probe = _setup(replace(cfg, minutes=None), None, ddp, False, False)
    setup_s = time.monotonic() - setup_started
    step_s = _time_steps(probe)
    knn_s = 0.0
    if probe.monitor is not None and cfg.knn_every >= 0:
        knn_started = time.monotonic()
        _knn_monitor(probe)
        knn_s = time.monotonic() - knn_started
    steps_per_epoch = probe.steps_per_epoch
    del probe
    left = cfg.minutes * 60 - (time.monotonic() - started) - setup_s  # the real run's setup ahead
    # an epoch: its steps, plus its share of the kNN checks (every knn_every epochs; the last
    # epoch's check is counted apart)
    epoch_s = steps_per_epoch * step_s + (knn_s / cfg.knn_every if cfg.knn_every > 0 else 0.0)
    epochs = int((BUDGET_SAFETY * left - knn_s) // epoch_s) if epoch_s > 0 else 0
    if epochs < 1:
        need = (setup_s + epoch_s + knn_s) / 60 + (time.monotonic() - started) / 60
        raise UserError(f"`minutes` {cfg.minutes:g} is too short for one epoch here (a step takes "
                        f"{step_s:.2f} s, an epoch about {epoch_s / 60:.1f} min); give at least "
                        f"{math.ceil(need / BUDGET_SAFETY)} minutes, or `limit` the images", param="minutes")
    warmup = min(epochs - 1, round(cfg.warmup_epochs * epochs / max(cfg.epochs, 1))) if epochs > 1 else 0
    ends = datetime.datetime.now() + datetime.timedelta(seconds=cfg.minutes * 60 - (time.monotonic() - started))
    ui.note(f"budget {cfg.minutes:g} min: a step takes {step_s:.2f} s here, so about "
            f"{epochs * steps_per_epoch:,} steps, {epochs} epochs of {steps_per_epoch} steps "
            f"(warm-up {warmup}); ends around {ends:%H:%M}")
    return replace(cfg, epochs=epochs, warmup_epochs=warmup)


def _replan(run: _Run, deadline: float, epoch_s: float, bar) -> None:
    """After the first epoch of a run with a time budget: the epochs that fit into what is
    left at the speed the real epoch ran (a few timed steps can be off by 10-20 % on a busy or
    throttling machine). The schedule is rebuilt for the new total (the steps already taken keep
    the rates they had), and the new config is what a resume reads."""
    import datetime

    cfg = run.cfg
    left = deadline - time.monotonic()
    epochs = max(1, 1 + int(BUDGET_SAFETY * left // max(epoch_s, 1e-6)))
    if epochs == cfg.epochs:
        return
    warmup = min(cfg.warmup_epochs, epochs - 1)
    run.cfg = replace(cfg, epochs=epochs, warmup_epochs=warmup)
    run.schedule = lr_schedule(peak_lr(cfg.lr, run.batch_size), epochs, warmup, cfg.final_lr_ratio,
                               run.steps_per_epoch)
    if run.run_dir is not None and run.ddp.is_main:
        run.cfg.save(run.run_dir.config)
    if hasattr(bar, "total"):
        bar.total = epochs * run.steps_per_epoch
    ends = datetime.datetime.now() + datetime.timedelta(seconds=left)
    ui.note(f"budget {cfg.minutes:g} min: the first epoch took {epoch_s:.0f} s, so {epochs} epochs "
            f"instead of {cfg.epochs}; ends around {ends:%H:%M}")


def _time_steps(run: _Run) -> float:
    """Seconds per training step on this machine, over MEASURE_STEPS steps after 2 untimed ones
    (allocation, first-call overheads), on the throwaway run."""
    batches: list = []
    epoch = 0
    while len(batches) < MEASURE_STEPS + 2:  # a small folder has fewer batches than that per epoch
        batches += list(epoch_batches(len(run.train), run.batch_size, epoch, run.cfg.seed, 0, 1))
        epoch += 1
    gen = torch.Generator(run.device).manual_seed(run.cfg.seed)
    run.method.train()
    started = 0.0
    for i, index in enumerate(batches[:MEASURE_STEPS + 2]):
        if i == 2:
            _synchronize(run.device)
            started = time.perf_counter()
        views = run.augment.views(run.views, run.feed(index), gen)
        run.trainer.step(views, 0, i, run.total_steps, run.schedule[min(i, len(run.schedule) - 1)])
    _synchronize(run.device)
    return (time.perf_counter() - started) / MEASURE_STEPS


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _open_run_folder(run: _Run, resume: bool, overwrite: bool) -> None:
    """Under the folder's lock: check again (another process may have finished a run there
    meanwhile), then config.json and metrics.jsonl (rebuilt from the checkpoint's history, the
    truth, which repairs a line lost to a kill or torn by one)."""
    run_dir = run.run_dir
    run_dir.check_new_or_resume(resume, overwrite)  # type: ignore[union-attr]
    if resume and run.start_epoch >= run.cfg.epochs:  # a finished run: nothing to train
        run_dir.repair_metrics(run.history)  # type: ignore[union-attr]
        return
    run_dir.remove_stale_temps()  # type: ignore[union-attr]
    if not resume:
        run_dir.clear_run_files()  # type: ignore[union-attr]
    run.cfg.save(run_dir.config)  # type: ignore[union-attr]
    run_dir.write_metrics(run.history)  # type: ignore[union-attr]
    skipped = run.train.source.unreadable_files()
    if skipped:  # the note names five; the run keeps the whole list
        write_text(run_dir / RunDir.UNREADABLE, "".join(p + "\n" for p in skipped))  # type: ignore[operator]


def check_resumable(saved: PretrainConfig, requested: PretrainConfig, force: bool = False) -> None:
    """A resumed run must compute the same thing; only runtime settings may differ, and the
    precision (bf16 or fp32 here, as "auto" resolves on this device) only with `force`:
    the two give different weights."""
    a, b = saved.to_dict(), requested.to_dict()
    changed = [k for k in a if k not in RUNTIME_FIELDS | {"precision"} and a[k] != b.get(k)]
    if changed:
        details = "; ".join(f"{k}: run has {a[k]!r}, asked {b.get(k)!r}" for k in changed[:3])
        raise UserError(f"`resume` with a different config ({details}); resume with the run's "
                        f"settings or start a new run", param="resume")
    device = resolve_device(requested.device)
    if uses_bf16(device, a["precision"]) != uses_bf16(device, b["precision"]) and not force:
        raise UserError(f"`precision` {b['precision']} for a run trained in {a['precision']} changes "
                        f"the results; resume in {a['precision']}, or `force` it", param="precision")


def _restore_rng(rng: dict[str, Any]) -> None:
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _monitor_splits(source: DataSource, train: CellData,
                    cfg: PretrainConfig) -> tuple[CellData, CellData] | None:
    """Labelled train cells (at most MONITOR_GALLERY) and the labelled val split, if any."""
    if cfg.knn_every < 0 or not train.has_labels or "val" not in available_splits(source):
        return None
    val = load_split(source, "val", cfg.limit, cfg.seed).labelled()
    gallery = train.labelled()
    if len(gallery) > MONITOR_GALLERY:
        gallery = gallery.subset(stratified_indices(gallery.labels.numpy(), MONITOR_GALLERY, cfg.seed))
    return (gallery, val) if len(val) and len(gallery) else None


def _train_epoch(run: _Run, epoch: int, bar) -> dict[str, Any]:
    """One pass over this rank's batches; returns the epoch's record (loss, lr, img/s)."""
    cfg = run.cfg
    run.method.train()
    batches = epoch_batches(len(run.train), run.batch_size, epoch, cfg.seed, run.ddp.rank,
                            run.ddp.world_size)
    gen = torch.Generator(run.device).manual_seed(epoch_seed(cfg.seed, epoch, 1 + run.ddp.rank))
    loss_sum = torch.zeros((), device=run.device)
    started = time.perf_counter()
    for i, index in enumerate(batches):
        step = epoch * run.steps_per_epoch + i
        views = run.augment.views(run.views, run.feed(index), gen)
        loss_sum += run.trainer.step(views, epoch, step, run.total_steps, run.schedule[step])
        if (i + 1) % FINITE_CHECK_EVERY == 0 or i + 1 == len(batches):
            _stop_if_not_finite(run, loss_sum / (i + 1), epoch, step)
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss_sum) / (i + 1):.4f}")
        bar.update(1)
    seconds = time.perf_counter() - started
    return {"epoch": epoch + 1, "loss": float(run.ddp.mean(loss_sum / max(1, len(batches)))),
            "lr": run.schedule[(epoch + 1) * run.steps_per_epoch - 1],
            "img_s": sum(len(b) for b in batches) * run.ddp.world_size / seconds, "seconds": seconds,
            "precision": "bf16" if uses_bf16(run.device, cfg.precision) else "fp32"}  # as resolved here


def _stop_if_not_finite(run: _Run, mean_loss: torch.Tensor, epoch: int, step: int) -> None:
    """Every rank decides on the all-reduced loss, so all stop together."""
    if not math.isfinite(float(run.ddp.mean(mean_loss))):
        lars = "" if run.cfg.optimizer == "lars" else " or use the lars optimizer"
        raise RunFailed(f"the loss became non-finite at epoch {epoch + 1}, step {step + 1}; lower "
                        f"`lr` (now {run.cfg.lr}){lars}; the last good checkpoint is kept",
                        param="lr")


def _finish_epoch(run: _Run, epoch: int, record: dict[str, Any]) -> None:
    """kNN monitor when due, collapse check, then checkpoint and metrics line (rank 0)."""
    if run.monitor is not None and run.ddp.is_main and _knn_due(run.cfg, epoch):
        record["knn_val_acc"] = _knn_monitor(run)
    record.update(run.method.check_collapse(record["loss"], epoch + 1, run.ddp.mean))
    check_weights(run.method.state_dict(), run.cfg.to_dict(), epoch + 1)
    run.history.append(record)
    if run.run_dir is not None and run.ddp.is_main:
        ckpt = make_checkpoint("pretrain", run.cfg.to_dict(), run.dataset, run.cfg.backbone,
                               run.stem, run.method.eval_backbone(), run.method, epoch + 1,
                               run.history, run.trainer.optimizer)
        try:
            save_checkpoint(ckpt, run.run_dir.checkpoint)
            run.run_dir.append_metrics(record)
        except UserError as exc:  # disk full, folder gone read-only...: the run stops
            raise RunFailed(f"the run stopped after epoch {epoch + 1}: {exc}") from None
    run.ddp.barrier()


def _knn_due(cfg: PretrainConfig, epoch: int) -> bool:
    last = epoch + 1 == cfg.epochs
    return last or (cfg.knn_every > 0 and (epoch + 1) % cfg.knn_every == 0)


def _knn_monitor(run: _Run) -> float:
    from ssl_blood.features.neighbours import knn_accuracy
    from ssl_blood.model.inference import run_model

    gallery, val = run.monitor  # type: ignore[misc]
    info = run.dataset
    backbone = run.method.eval_backbone()
    features = [run_model(backbone, part.images, info["mean"], info["std"], info["input_size"],
                          run.device, precision=run.cfg.precision,
                          channels_last=run.cfg.channels_last) for part in (gallery, val)]
    return knn_accuracy(features[0], gallery.labels.numpy(), features[1], val.labels.numpy(),
                        gallery.num_classes, run.cfg.knn_k, run.cfg.knn_temperature)


def resume_config(out_dir: str | Path, overrides: dict[str, Any]) -> PretrainConfig:
    """The config of the run in `out_dir` with explicitly given settings applied (for resume)."""
    run_dir = RunDir(out_dir)
    if not run_dir.has_checkpoint():
        raise UserError(f"`resume`: no {RunDir.CHECKPOINT} in {out_dir}; start a new run without "
                        f"resume", param="resume")
    saved = PretrainConfig.from_dict(load_checkpoint(run_dir.checkpoint)["config"])
    return replace(saved, **overrides)

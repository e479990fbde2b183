"""Training with labels, end to end: the supervised reference and fine-tuning.

Both train a backbone plus a linear head on labelled train cells (all of them, or a
class-balanced seeded subset: `fraction` of train or `shots` per class, the same subsets
`few-shot` draws, see `labelled_subset`), keep the epoch with the best val accuracy, and score
test once:

- `train_supervised`: the backbone from scratch. By default MedMNIST v2's protocol:
  cross-entropy, Adam lr 1e-3 decayed x0.1 at 50 % and 75 % of the epochs, batch 128, no
  augmentation.
- `fine_tune`: the backbone of a pretrained checkpoint. The head starts as the logistic
  regression of the frozen features of the labelled cells (LP-FT: fine-tuning from a fitted
  head keeps the pretrained features from being torn up by a random one), then everything
  trains with the device augmentation; the learning rate and the backbone's share of it are
  chosen on val from a small grid, the epoch too.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ssl_blood import ui
from ssl_blood.model.augment import AugmentConfig, BatchAugment, eval_preprocess
from ssl_blood.model.checkpoint import (backbone_from_checkpoint, dataset_info, load_checkpoint,
                                  make_checkpoint, save_checkpoint)
from ssl_blood.data import CellData, DataSource, channel_stats, load_split
from ssl_blood.device import autocast, describe_device, resolve_device
from ssl_blood.errors import UserError
from ssl_blood.evaluation.frozen import classification_metrics, fit_logistic, support_indices
from ssl_blood.model.inference import run_model
from ssl_blood.model.backbones import build_backbone, resolve_stem
from ssl_blood.files import write_json
from ssl_blood.training.run_dir import RunDir


def labelled_subset(labels: np.ndarray, num_classes: int, seed: int, fraction: float | None = None,
                    shots: int | None = None) -> np.ndarray:
    """Sorted positions of the class-balanced labelled subset for `seed`: `shots` per class or
    `fraction` of the labelled cells (all of them when neither is given). Few-shot episode e of
    seed s draws exactly `labelled_subset(..., seed=s + e)`."""
    if fraction is not None and shots is not None:
        raise UserError("give fraction or shots, not both", param="fraction")
    if fraction is None and shots is None:
        return np.flatnonzero(labels >= 0)
    if fraction is not None and not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise UserError(f"`fraction` {fraction} must be in (0, 1], e.g. 0.1", param="fraction")
    setting = [1, int(shots)] if shots is not None else [2, int(round(float(fraction) * 1e6))]
    rng = np.random.default_rng([seed] + setting)
    return support_indices(labels, num_classes, rng, shots=shots, fraction=fraction)


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@dataclass
class LabelledTraining:
    """What both kinds of training with labels share: which labelled cells, where, how long."""

    epochs: int = 30
    batch_size: int = 128
    fraction: float | None = None  # labelled subset of train (None: all labelled cells)
    shots: int | None = None
    limit: int | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"


@dataclass
class SupervisedConfig(LabelledTraining):
    backbone: str = "resnet18"
    stem: str = "auto"
    epochs: int = 100
    lr: float = 1e-3
    augment: bool = False
    augment_config: AugmentConfig = field(default_factory=AugmentConfig)
    data: dict = field(default_factory=lambda: {"kind": "bloodmnist", "path": "", "size": 28})


@dataclass
class FineTuneConfig(LabelledTraining):
    # epochs (at most; the best val epoch is kept) and the rest as LabelledTraining
    lrs: tuple[float, ...] = (3e-4, 1e-3)  # AdamW learning rates of the head, chosen on val
    backbone_lr_ratios: tuple[float, ...] = (0.1, 1.0)  # backbone lr / head lr, chosen on val
    weight_decay: float = 1e-4
    augment_config: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_scale=(0.35, 1.0)))
    data: dict | None = None  # None: the data the checkpoint was trained on


@dataclass
class _Splits:
    source: DataSource
    train: CellData  # the labelled subset trained on
    val: CellData
    test: CellData
    mean: list[float]
    std: list[float]


def _load_labelled(source: DataSource, limit: int | None, seed: int, fraction: float | None,
                   shots: int | None) -> _Splits:
    parts = {}
    for split in ("train", "val", "test"):
        data = load_split(source, split, limit, seed).labelled() if split != "train" else \
            load_split(source, split, limit, seed)
        if not data.has_labels:
            raise UserError(f"training with labels needs labelled {split} cells; {source.name} has "
                            f"none in {split}", param="data")
        parts[split] = data
    train = parts["train"]
    mean, std = channel_stats(train.images)  # of every train cell, labelled or not
    rows = labelled_subset(train.labels.numpy(), train.num_classes, seed, fraction, shots)
    return _Splits(source, train.subset(rows), parts["val"], parts["test"], mean, std)


def _steps_per_epoch(n: int, batch: int) -> int:
    """At least 8 steps an epoch: a tiny labelled set would otherwise see one step per val."""
    return max(8, math.ceil(n / batch))


def _fit(model: Classifier, splits: _Splits, epochs: int, batch: int, optimizer: torch.optim.Optimizer,
         scheduler, augment: BatchAugment | None, device: torch.device, precision: str,
         seed: int, desc: str, progress: bool | None) -> dict[str, Any]:
    """Train, scoring val after each epoch; returns the best epoch's state and the history."""
    size = splits.train.image_size
    images, labels = splits.train.images.to(device), splits.train.labels.to(device)
    steps = _steps_per_epoch(len(images), batch)
    model.to(device, memory_format=torch.channels_last)
    start_acc = float((_scores(model, splits.val, splits, device, precision).argmax(1)
                       == splits.val.labels.numpy()).mean())  # epoch 0 competes too
    history = [{"epoch": 0, "val_acc": start_acc}]
    best = {"val_acc": start_acc, "epoch": 0, "state": copy.deepcopy(model.state_dict())}
    order_gen = torch.Generator().manual_seed(seed)
    view_gen = torch.Generator(device).manual_seed(seed + 1)
    for epoch in ui.bar(range(epochs), desc=desc, unit="epoch", enabled=progress):
        model.train()
        loss_sum = 0.0
        order = torch.cat([torch.randperm(len(images), generator=order_gen)
                           for _ in range(math.ceil(steps * batch / len(images)))])
        for step in range(steps):
            index = order[step * batch:(step + 1) * batch].to(device)
            x = (augment.view(images[index], view_gen, size, augment.cfg.crop_scale) if augment
                 else eval_preprocess(images[index], splits.mean, splits.std, size))
            with autocast(device, precision):
                loss = nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)).float(),
                                                   labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach())
        if scheduler is not None:
            scheduler.step()
        val_acc = float((_scores(model, splits.val, splits, device, precision).argmax(1)
                         == splits.val.labels.numpy()).mean())
        history.append({"epoch": epoch + 1, "loss": loss_sum / steps, "val_acc": val_acc})
        if val_acc > best["val_acc"]:
            best = {"val_acc": val_acc, "epoch": epoch + 1, "state": copy.deepcopy(model.state_dict())}
    return {**best, "history": history}


def _scores(model: Classifier, data: CellData, splits: _Splits, device: torch.device,
            precision: str) -> np.ndarray:
    return run_model(model, data.images, splits.mean, splits.std, data.image_size, device,
                     precision=precision, channels_last=True, post=lambda z: torch.softmax(z, 1))


def _result(model: Classifier, splits: _Splits, best: dict, device: torch.device, precision: str,
            started: float, extra: dict[str, Any]) -> dict[str, Any]:
    model.load_state_dict(best["state"])
    test = classification_metrics(splits.test.labels.numpy(),
                                  _scores(model, splits.test, splits, device, precision),
                                  splits.train.class_names)
    return {**extra, "labels": len(splits.train), "labelled_ids": splits.train.ids.tolist(),
            "best_epoch": best["epoch"], "val_acc": best["val_acc"],
            "test_acc": test["acc"], "test_auc": test["auc"],
            **{k: v for k, v in test.items() if k not in ("acc", "auc")},
            "seconds": time.perf_counter() - started, "device": describe_device(device)}


def _check_out(out_dir: str | Path | None, overwrite: bool) -> RunDir | None:
    if out_dir is None:
        return None
    run = RunDir(out_dir)
    if run.path.exists() and not run.path.is_dir():
        raise UserError(f"`out` {run.path} is a file; give a folder", param="out")
    if run.has_checkpoint() and not overwrite:
        raise UserError(f"`out` {run.path} already holds a checkpoint; overwrite it or choose "
                        f"another folder", param="out")
    return run


def _write(run: RunDir, kind: str, config: dict, model: Classifier, splits: _Splits, stem: str,
           backbone_name: str, result: dict, json_name: str, history: list[dict]) -> None:
    with run.lock():
        ckpt = make_checkpoint(kind, config, dataset_info(
            splits.source.to_dict(), splits.train.class_names, splits.train.image_size,
            splits.train.image_size, splits.train.channels, splits.mean, splits.std,
            splits.source.name), backbone_name, stem, model.backbone, model, result["best_epoch"],
            history)
        save_checkpoint(ckpt, run.checkpoint)
        write_json(result, run / json_name)


# ----------------------------------------------------------------------------- from scratch


def train_supervised(cfg: SupervisedConfig, out_dir: str | Path | None = None,
                     progress: bool | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train from scratch, keep the best-val epoch, score test once; optionally write
    supervised.json and a checkpoint.pt (same format as pretraining, so embed / probe /
    retrieve work on it)."""
    if cfg.epochs < 1 or cfg.batch_size < 1 or not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise UserError("`epochs`, batch_size and lr must be positive", param="epochs")
    run = _check_out(out_dir, overwrite)
    device = resolve_device(cfg.device)
    splits = _load_labelled(DataSource.from_dict(cfg.data), cfg.limit, cfg.seed, cfg.fraction, cfg.shots)
    stem = resolve_stem(cfg.stem, splits.train.image_size)
    torch.manual_seed(cfg.seed)
    model = Classifier(build_backbone(cfg.backbone, splits.train.channels, stem),
                       splits.train.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, [int(0.5 * cfg.epochs), int(0.75 * cfg.epochs)], gamma=0.1)
    augment = BatchAugment(cfg.augment_config, splits.mean, splits.std) if cfg.augment else None
    started = time.perf_counter()
    best = _fit(model, splits, cfg.epochs, cfg.batch_size, optimizer, scheduler, augment, device,
                cfg.precision, cfg.seed, "supervised", progress)
    result = _result(model, splits, best, device, cfg.precision, started,
                     {"backbone": cfg.backbone, "stem": stem, "epochs": cfg.epochs,
                      "fraction": cfg.fraction, "shots": cfg.shots, "seed": cfg.seed,
                      "init": "scratch", "history": best["history"]})
    if run is not None:
        config = {**asdict(cfg), "method": "supervised"}
        _write(run, "supervised", config, model, splits, stem, cfg.backbone, result,
               RunDir.SUPERVISED, best["history"])
    return result


# ----------------------------------------------------------------------------- fine-tuning


def fine_tune(checkpoint: str | Path, cfg: FineTuneConfig, out_dir: str | Path | None = None,
              progress: bool | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune a pretrained checkpoint's backbone with a linear head on labelled cells;
    learning rate, backbone-lr ratio and epoch chosen on val, test scored once."""
    if cfg.epochs < 1 or cfg.batch_size < 1 or not cfg.lrs or not cfg.backbone_lr_ratios:
        raise UserError("`epochs` and batch_size must be positive, lrs and backbone_lr_ratios "
                        "non-empty", param="epochs")
    if not all(math.isfinite(v) and v > 0 for v in (*cfg.lrs, *cfg.backbone_lr_ratios)):
        raise UserError(f"`lrs` {list(cfg.lrs)} and backbone_lr_ratios "
                        f"{list(cfg.backbone_lr_ratios)} must be finite positive numbers", param="lrs")
    run = _check_out(out_dir, overwrite)
    ckpt = load_checkpoint(checkpoint)
    source = DataSource.from_dict(cfg.data or ckpt["dataset"]["source"])
    device = resolve_device(cfg.device)
    splits = _load_labelled(source, cfg.limit, cfg.seed, cfg.fraction, cfg.shots)
    _check_fits(ckpt, splits.train)
    splits.mean, splits.std = ckpt["dataset"]["mean"], ckpt["dataset"]["std"]  # as pretrained
    initial = Classifier(backbone_from_checkpoint(ckpt), splits.train.num_classes)
    probe = _initial_head(initial, splits, device, cfg.precision)
    augment = BatchAugment(cfg.augment_config, splits.mean, splits.std)
    started = time.perf_counter()
    trials, best_trial, best_model = [], None, None
    for lr in cfg.lrs:
        for ratio in cfg.backbone_lr_ratios:
            model = copy.deepcopy(initial)
            optimizer = torch.optim.AdamW(
                [{"params": model.head.parameters(), "lr": lr},
                 {"params": model.backbone.parameters(), "lr": lr * ratio}],
                weight_decay=cfg.weight_decay)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs)
            fit = _fit(model, splits, cfg.epochs, cfg.batch_size, optimizer, scheduler, augment,
                       device, cfg.precision, cfg.seed, f"fine-tune lr {lr:g} x{ratio:g}", progress)
            trials.append({"lr": lr, "backbone_lr_ratio": ratio, "best_epoch": fit["epoch"],
                           "val_acc": fit["val_acc"]})
            if best_trial is None or fit["val_acc"] > best_trial[1]["val_acc"]:
                best_trial, best_model = (trials[-1], fit), model
    chosen, fit = best_trial  # type: ignore[misc]
    result = _result(best_model, splits, fit, device, cfg.precision, started, {
        "checkpoint": str(Path(checkpoint).resolve()), "backbone": ckpt["backbone_name"],
        "stem": ckpt["backbone_stem"], "fraction": cfg.fraction, "shots": cfg.shots,
        "seed": cfg.seed, "init": "pretrained", "initial_probe_val_acc": probe["val_acc"],
        "initial_probe_test_acc": probe["test_acc"], "chosen": chosen, "grid": trials,
        "history": fit["history"]})
    if run is not None:
        config = {**asdict(cfg), "method": "fine-tune", "pretrained": result["checkpoint"]}
        _write(run, "fine-tune", config, best_model, splits, ckpt["backbone_stem"],
               ckpt["backbone_name"], result, RunDir.FINE_TUNE, fit["history"])
    return result


def _check_fits(ckpt: dict, train: CellData) -> None:
    want = (ckpt["dataset"]["channels"], ckpt["dataset"]["image_size"])
    have = (train.channels, train.image_size)
    if want != have:
        raise UserError(f"the checkpoint was trained on {want[0]}-channel {want[1]}-px images but "
                        f"this data has {have[0]}-channel {have[1]}-px images; fine-tune on data "
                        f"like its own (size, grayscale or RGB)", param="checkpoint")


def _initial_head(model: Classifier, splits: _Splits, device: torch.device,
                  precision: str) -> dict[str, float]:
    """Fit the head as a logistic regression of the frozen features of the labelled cells
    (features standardised into the head's weights, so the head takes raw features)."""
    model.backbone.to(device)
    x, xv, xt = (run_model(model.backbone, d.images, splits.mean, splits.std, d.image_size, device,
                           precision=precision, channels_last=True)
                 for d in (splits.train, splits.val, splits.test))
    mean, std = x.mean(0), x.std(0) + 1e-6
    head = fit_logistic(torch.as_tensor((x - mean) / std), splits.train.labels,
                        splits.train.num_classes, weight_decay=1e-3, max_iter=300)
    with torch.no_grad():  # w.(x - m)/s + b = (w/s).x + (b - w.m/s)
        w = head.weight / torch.as_tensor(std)
        model.head.weight.copy_(w)
        model.head.bias.copy_(head.bias - w @ torch.as_tensor(mean))

    def accuracy(features: np.ndarray, data: CellData) -> float:
        with torch.no_grad():
            scores = model.head.cpu()(torch.as_tensor(features))
        return float((scores.argmax(1).numpy() == data.labels.numpy()).mean())

    return {"val_acc": accuracy(xv, splits.val), "test_acc": accuracy(xt, splits.test)}

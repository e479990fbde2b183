"""Pretraining throughput, measured in one run on one device with one model, batch and precision.

(A) model-only bound: the SimCLR training step on random tensors already on the device;
(B) lightly's reference pipeline: PIL + `SimCLRTransform(input_size=28, gaussian_blur=0.0)` +
    DataLoader with one worker per core and pinned memory;
(C) ssl-blood's pipeline: the dataset resident on the device as uint8, views made in batch there.
One image = its two views. Then the wall clock of SimCLR pretraining (full preset, no kNN
monitor) for `--epochs` epochs; `simclr_200_epochs_s` is filled only when 200 epochs really ran.

    python experiments/bench_pretrain.py --data-root ../shared/data            # GPU: all of it
    python experiments/bench_pretrain.py --data-root ../shared/data --epochs 0 # CPU: throughput only

Writes experiments/results/bench_pretrain.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from typing import Callable, Iterator

import torch

from ssl_blood.augment import BatchAugment
from ssl_blood.checkpoint import write_json
from ssl_blood.config import PretrainConfig, preset_config
from ssl_blood.data import channel_stats, load_split, resolve_source
from ssl_blood.device import autocast as autocast_for, describe_device, resolve_device, uses_bf16
from ssl_blood.methods import build_method
from ssl_blood.models import build_backbone
from ssl_blood.train import _PILViews, build_optimizer, pretrain, training_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(step: Callable[[], torch.Tensor], batch: int, device: torch.device,
                      warmup: int, seconds: float) -> float:
    """Run `step` `warmup` times, then as many times as fit in `seconds`; images per second."""
    for _ in range(warmup):
        step()
    sync(device)
    done, started = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - started < seconds:
        loss = step()
        done += 1
    float(loss)  # wait for the queue to drain
    sync(device)
    return done * batch / (time.perf_counter() - started)


def make_trainer(cfg: PretrainConfig, channels: int, device: torch.device):
    torch.manual_seed(0)
    method = build_method("simclr", build_backbone(cfg.backbone, channels), cfg.simclr, cfg.dino,
                          cfg.epochs)
    method.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    optimizer = build_optimizer(cfg, method)
    model = torch.compile(method) if cfg.compile else method
    autocast = autocast_for(device, cfg.precision)

    def step(views: list[torch.Tensor]) -> torch.Tensor:
        return training_step(model, method, optimizer, views, 10, 100, 1000, 0.1, autocast,
                             cfg.channels_last)

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbone", help="default: the full preset's on a GPU, the quick one on a CPU")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per pipeline")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="lightly DataLoader workers")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--epochs", type=int, default=None,
                        help="SimCLR epochs to time (default 200 on a GPU, 0 on a CPU)")
    parser.add_argument("--out", default="experiments/results/bench_pretrain.json")
    args = parser.parse_args()

    device = resolve_device(args.device)
    preset = "full" if device.type == "cuda" else "quick"
    cfg = replace(preset_config(preset), batch_size=args.batch_size, compile=args.compile,
                  backbone=args.backbone or preset_config(preset).backbone)
    source = resolve_source(args.data_root)
    train = load_split(source, "train")
    mean, std = channel_stats(train.images)
    size, batch = train.image_size, args.batch_size
    result = {"device": describe_device(device), "host": platform.node(), "torch": torch.__version__,
              "cpu_cores": os.cpu_count(), "backbone": cfg.backbone, "batch_size": batch,
              "precision": "bf16" if uses_bf16(device, cfg.precision) else "fp32",
              "channels_last": cfg.channels_last, "compile": cfg.compile,
              "image": "one image = its two views", "timed_seconds_each": args.seconds}

    # (A) model-only bound: two random views already on the device
    step = make_trainer(cfg, train.channels, device)
    random_views = [torch.randn(batch, train.channels, size, size, device=device) for _ in range(2)]
    result["model_only_img_s"] = images_per_second(lambda: step(random_views), batch, device,
                                                   args.warmup, args.seconds)
    print(json.dumps({"model_only_img_s": result["model_only_img_s"]}), flush=True)

    # (B) lightly's reference pipeline
    from lightly.transforms import SimCLRTransform

    loader = torch.utils.data.DataLoader(
        _PILViews(train, SimCLRTransform(input_size=28, gaussian_blur=0.0)), batch_size=batch,
        shuffle=True, drop_last=True, num_workers=args.workers, pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0)
    step = make_trainer(cfg, train.channels, device)

    def endless(loader) -> Iterator[list[torch.Tensor]]:
        while True:
            yield from loader

    batches = endless(loader)
    result["lightly_reference_img_s"] = images_per_second(
        lambda: step([v.to(device, non_blocking=True) for v in next(batches)]), batch, device,
        args.warmup, args.seconds)
    result["lightly_workers"] = args.workers
    del batches, loader
    print(json.dumps({"lightly_reference_img_s": result["lightly_reference_img_s"]}), flush=True)

    # (C) ssl-blood: uint8 dataset on the device, batched per-image augmentation there
    step = make_trainer(cfg, train.channels, device)
    images = train.images.to(device)
    augment = BatchAugment(cfg.augment, mean, std, size)
    gen = torch.Generator(device).manual_seed(0)
    index_gen = torch.Generator(device).manual_seed(1)

    def pipeline_step() -> torch.Tensor:
        index = torch.randint(0, len(images), (batch,), generator=index_gen, device=device)
        return step(augment.simclr_views(images[index], gen))

    result["ssl_blood_img_s"] = images_per_second(pipeline_step, batch, device, args.warmup, args.seconds)
    result["ratio_vs_lightly"] = result["ssl_blood_img_s"] / result["lightly_reference_img_s"]
    result["ratio_vs_model_only"] = result["ssl_blood_img_s"] / result["model_only_img_s"]
    print(json.dumps({k: result[k] for k in ("ssl_blood_img_s", "ratio_vs_lightly",
                                             "ratio_vs_model_only")}), flush=True)

    # SimCLR pretraining wall clock (the preset's own loop, no kNN monitor)
    epochs = args.epochs if args.epochs is not None else (200 if device.type == "cuda" else 0)
    result["simclr_200_epochs_s"] = None
    if epochs > 0:
        run_cfg = replace(cfg, epochs=epochs, knn_every=-1, data=source.to_dict(),
                          warmup_epochs=min(cfg.warmup_epochs, epochs), device=str(device))
        started = time.perf_counter()
        run = pretrain(run_cfg, None, progress=False)
        sync(device)
        seconds = time.perf_counter() - started
        result.update({"pretrain_epochs_timed": epochs, "pretrain_seconds": seconds,
                       "pretrain_final_loss": run.history[-1]["loss"]})
        if epochs == 200:
            result["simclr_200_epochs_s"] = seconds
    else:
        result["pretrain_note"] = "not timed on this device (a GPU job); pass --epochs N to time N"
    write_json(result, args.out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

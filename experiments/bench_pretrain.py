"""Pretraining throughput, measured in one run on one device with one model, batch and precision.

(A) model-only bound: the SimCLR training step on random tensors already on the device;
(B) lightly's reference pipeline: PIL + `SimCLRTransform(input_size=28, gaussian_blur=0.0)` +
    DataLoader with one worker per core and pinned memory;
(C) ssl-blood's pipeline: the dataset resident on the device as uint8, views made in batch there.
The three are timed in interleaved windows (A B C A B C ...), `--rounds` each, so drifting clock
speed or a busy neighbour hits all of them alike; the median and the spread of each are reported
and the ratios are ratios of medians. One image = its two views. Then the wall clock of SimCLR
pretraining for `--epochs` epochs; `simclr_200_epochs_s` is filled only when 200 epochs ran.

    python experiments/bench_pretrain.py --data-root ../shared/data            # GPU: all of it
    python experiments/bench_pretrain.py --data-root ../shared/data --epochs 0 # CPU: throughput only

Writes experiments/results/bench_pretrain.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lightly_pipeline import PILViews  # noqa: E402

from ssl_blood.model.augment import BatchAugment, ViewGroup
from ssl_blood.training.config import default_preset, preset_config
from ssl_blood.data import channel_stats, load_split, resolve_source
from ssl_blood.device import autocast, describe_device, resolve_device, uses_bf16
from ssl_blood.methods import MethodSetup, build_method
from ssl_blood.model.backbones import build_backbone
from ssl_blood.training.optim import build_optimizer
from ssl_blood.files import write_json
from ssl_blood.training.loop import Trainer, pretrain


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def window(step: Callable[[], torch.Tensor], batch: int, device: torch.device, seconds: float) -> float:
    """Images per second of `step` over one timed window."""
    sync(device)
    done, started = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - started < seconds:
        loss = step()
        done += 1
    float(loss)  # wait for the queue to drain
    sync(device)
    return done * batch / (time.perf_counter() - started)


def make_step(cfg, channels: int, device: torch.device) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    torch.manual_seed(0)
    method = build_method("simclr", build_backbone(cfg.backbone, channels, "s1"), cfg.method_config,
                          MethodSetup(cfg.epochs, 28, tuple(cfg.augment.crop_scale)))
    method.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    optimizer = build_optimizer(cfg.optimizer, method, 0.1, cfg.weight_decay, cfg.lars_trust_coefficient)
    model = torch.compile(method) if cfg.compile else method
    trainer = Trainer(model, method, optimizer, autocast(device, cfg.precision), cfg.channels_last)
    return lambda views: trainer.step(views, 10, 100, 1000, 0.1)


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "windows": [round(v, 3) for v in values]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbone", help="default: the full preset's on a GPU, the quick one on a CPU")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per timed window")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved windows per pipeline")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first, per pipeline")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="lightly DataLoader workers")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--epochs", type=int, default=None,
                        help="SimCLR epochs to time (default 200 on a GPU, 0 on a CPU)")
    parser.add_argument("--out", default="experiments/results/bench_pretrain.json")
    args = parser.parse_args()

    device = resolve_device(args.device)
    preset = default_preset(device.type)
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
              "image": "one image = its two views", "window_seconds": args.seconds,
              "rounds": args.rounds, "statistic": "median of interleaved windows (min, max beside)",
              "lightly_workers": args.workers}

    # (A) model-only: two random views already on the device
    model_only = make_step(cfg, train.channels, device)
    random_views = [torch.randn(batch, train.channels, size, size, device=device) for _ in range(2)]
    # (B) lightly's reference pipeline
    from lightly.transforms import SimCLRTransform

    loader = torch.utils.data.DataLoader(
        PILViews(train, SimCLRTransform(input_size=28, gaussian_blur=0.0)), batch_size=batch,
        shuffle=True, drop_last=True, num_workers=args.workers, pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0)
    lightly_step = make_step(cfg, train.channels, device)

    def endless() -> Iterator[list[torch.Tensor]]:
        while True:
            yield from loader

    batches = endless()
    # (C) ssl-blood: uint8 dataset on the device, batched per-image augmentation there
    ours_step = make_step(cfg, train.channels, device)
    images = train.images.to(device)
    augment = BatchAugment(cfg.augment, mean, std)
    groups = [ViewGroup(2, size, tuple(cfg.augment.crop_scale))]  # SimCLR's views
    gen = torch.Generator(device).manual_seed(0)
    index_gen = torch.Generator(device).manual_seed(1)

    def ours() -> torch.Tensor:
        index = torch.randint(0, len(images), (batch,), generator=index_gen, device=device)
        return ours_step(augment.views(groups, images[index], gen))

    pipelines = {"model_only": lambda: model_only(random_views),
                 "lightly_reference": lambda: lightly_step([v.to(device, non_blocking=True)
                                                            for v in next(batches)]),
                 "ssl_blood": ours}
    for step in pipelines.values():
        for _ in range(args.warmup):
            step()
    windows: dict[str, list[float]] = {name: [] for name in pipelines}
    for round_ in range(args.rounds):
        for name, step in pipelines.items():
            windows[name].append(window(step, batch, device, args.seconds))
        print(json.dumps({"round": round_ + 1, **{k: round(v[-1], 1) for k, v in windows.items()}}),
              flush=True)
    for name, values in windows.items():
        result[f"{name}_img_s"] = summary(values)
    med = {name: result[f"{name}_img_s"]["median"] for name in pipelines}
    result["ratio_vs_lightly"] = med["ssl_blood"] / med["lightly_reference"]
    result["ratio_vs_model_only"] = med["ssl_blood"] / med["model_only"]
    result["pipeline_above_model_only"] = med["ssl_blood"] > med["model_only"]
    if result["pipeline_above_model_only"]:
        overlap = result["ssl_blood_img_s"]["min"] <= result["model_only_img_s"]["max"]
        result["note"] = ("the pipeline's median is above the model-only bound: "
                          + ("within the windows' spread, i.e. noise (both are at the model's bound)"
                             if overlap else "outside the spread: look for a measurement error"))
    del batches, loader

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

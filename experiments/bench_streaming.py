"""Data bigger than memory: a synthetic folder of 200,000 cell-like images at 64 px, decoded once
into the cache, then pretraining steps with the train split streamed from the cache file
against the same steps with it loaded into memory. Each mode runs in its own process; reported:
images/s, the process's memory after setup (libraries, model, optimiser) and at its peak.

    python experiments/bench_streaming.py --folder runs/synthetic200k

Writes experiments/results/bench_streaming.json (or --out).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def synthetic_cell(rng: np.random.Generator, size: int) -> np.ndarray:
    """A pale background with a few soft coloured blobs (compresses like a stained cell)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = np.full((size, size, 3), 225, np.float32) + rng.normal(0, 4, (size, size, 3))
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(size * 0.25, size * 0.75, 2)
        radius = rng.uniform(size * 0.08, size * 0.3)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius ** 2))[..., None]
        image -= blob * rng.uniform(60, 160, 3)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_folder(folder: Path, n: int, size: int) -> float:
    from PIL import Image

    started = time.perf_counter()

    def one(i: int) -> None:
        path = folder / f"{i // 10_000:02d}" / f"cell{i:06d}.png"
        if not path.exists():
            Image.fromarray(synthetic_cell(np.random.default_rng(i), size)).save(path, compress_level=1)

    for sub in range((n + 9999) // 10_000):
        (folder / f"{sub:02d}").mkdir(parents=True, exist_ok=True)
    with futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(one, range(n), chunksize=256))
    return time.perf_counter() - started


def child(args) -> dict:
    """Pretraining steps on the folder in one mode; prints one JSON line."""
    import torch

    from ssl_blood.model.augment import BatchAugment
    from ssl_blood.training.config import preset_config
    from ssl_blood.data import channel_stats, load_split, resolve_source
    from ssl_blood.device import autocast
    from ssl_blood.methods import MethodSetup, build_method
    from ssl_blood.model.backbones import build_backbone, resolve_stem
    from ssl_blood.training.optim import build_optimizer, epoch_batches
    from ssl_blood.training.loop import ImageFeed, Trainer

    started = time.perf_counter()
    source = resolve_source(image_dir=args.folder, size=args.size, layout="flat")
    train = load_split(source, "train")
    load_seconds = time.perf_counter() - started
    cfg = preset_config("quick")
    device = torch.device("cpu")
    mean, std = channel_stats(train.images[:5000])
    method = build_method("simclr", build_backbone(cfg.backbone, 3, resolve_stem("auto", args.size)),
                          cfg.method_config, MethodSetup(1, args.size, tuple(cfg.augment.crop_scale)))
    method.to(memory_format=torch.channels_last)
    trainer = Trainer(method, method, build_optimizer("lars", method, 0.6, 1e-5, 1e-3),
                      autocast(device), True)
    feed = ImageFeed(train, device, args.child)
    augment = BatchAugment(cfg.augment, mean, std)
    views = method.view_spec()
    gen = torch.Generator().manual_seed(0)
    batches = epoch_batches(len(train), args.batch, 0, 0)
    trainer.step(augment.views(views, feed(batches[0]), gen), 0, 0, 100, 0.1)  # warm-up
    after_setup = rss_mb()[0]
    timed = time.perf_counter()
    for i, index in enumerate(batches[1:args.steps + 1]):
        trainer.step(augment.views(views, feed(index), gen), 0, i, 100, 0.1)
    seconds = time.perf_counter() - timed
    return {"mode": feed.mode, "images": len(train), "load_seconds": load_seconds,
            "img_s": args.steps * args.batch / seconds, "rss_after_setup_mb": after_setup,
            "peak_rss_mb": rss_mb()[1], "dataset_mb": train.images.numel() / 1e6,
            "batch_uint8_mb": args.batch * train.images[0].numel() / 1e6,
            "batch_views_float32_mb": 2 * args.batch * 3 * args.size ** 2 * 4 / 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="runs/synthetic200k")
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--child", choices=["stream", "memory"])
    parser.add_argument("--out", default=str(REPO / "experiments/results/bench_streaming.json"))
    parser.add_argument("--modes-only", action="store_true",
                        help="time the two training modes again, keeping the folder and cache timings of --out")
    parser.add_argument("--note", help="circumstances of the measurement, shown in docs/benchmarks.md "
                        "(e.g. another job sharing the CPU)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0
    from ssl_blood.data import load_split, resolve_source
    from ssl_blood.device import describe_device
    from ssl_blood.files import write_json

    folder = Path(args.folder)
    if args.modes_only:  # keep the folder and cache timings of the results file, time the modes again
        result = {**json.loads(Path(args.out).read_text()), "note": args.note}
    else:
        result = {"device": describe_device("cpu"), "images": args.images, "size": args.size,
                  "batch": args.batch, "steps": args.steps, "note": args.note,
                  "write_seconds": write_folder(folder, args.images, args.size)}
        started = time.perf_counter()
        load_split(resolve_source(image_dir=str(folder), size=args.size, layout="flat"), "train")
        result["first_load_seconds"] = time.perf_counter() - started  # decoding into the cache
        started = time.perf_counter()
        load_split(resolve_source(image_dir=str(folder), size=args.size, layout="flat"), "train")
        result["cached_load_seconds"] = time.perf_counter() - started
    for mode in ("stream", "memory"):
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--folder", str(folder),
                               "--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps)],
                              capture_output=True, text=True, env=os.environ)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        result[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(result[mode]), flush=True)
    stream = result["stream"]
    growth = stream["peak_rss_mb"] - stream["rss_after_setup_mb"]
    result["stream_growth_after_setup_mb"] = growth
    result["stream_vs_memory_img_s"] = stream["img_s"] / result["memory"]["img_s"]
    write_json(result, args.out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

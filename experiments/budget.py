"""Does `pretrain --minutes M` end when it says, and does a pipe see progress every 30 s?

A lab's case from the own-slide issue: a flat folder of 64-px crops (BloodMNIST train cells,
upscaled from 28 px with bicubic interpolation, written as PNG), `ssl-blood pretrain --image-dir
pool --preset quick --minutes M` run as a user runs it, its stderr a pipe. Recorded: the
announced plan, the wall time of the whole command against M (target: within 10 %), and the
gaps between progress lines (target: at most about 30 s). Device named in the JSON.

    python experiments/budget.py --cells 3000 --minutes 15

Writes experiments/results/budget.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_pool(folder: Path, cells: int, side: int, data_root: Path) -> Path:
    from PIL import Image

    if folder.is_dir() and len(list(folder.glob("*.png"))) == cells:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    images = np.load(data_root / "bloodmnist.npz")["train_images"]
    rows = np.random.default_rng(0).choice(len(images), cells, replace=False)
    for i, r in enumerate(rows):
        Image.fromarray(images[r]).resize((side, side), Image.Resampling.BICUBIC).save(folder / f"cell_{i:05d}.png")
    return folder


def main() -> None:
    from ssl_blood.device import describe_device
    from ssl_blood.files import write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=3000)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--work", default="/tmp/ssl-blood-budget")
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "budget.json"))
    args = parser.parse_args()
    data_root = Path(os.environ.get("SSL_BLOOD_DATA_ROOT", REPO.parent / "shared" / "data"))
    work = Path(args.work)
    pool = make_pool(work / f"pool-{args.cells}-{args.side}", args.cells, args.side, data_root)
    run = work / "run"
    command = [sys.executable, "-m", "ssl_blood", "pretrain", "--image-dir", str(pool), "--preset", "quick",
               "--minutes", f"{args.minutes:g}", "--out", str(run), "--overwrite", "--cache-dir", "none"]
    started = time.monotonic()
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    lines = []
    for line in proc.stderr:  # type: ignore[union-attr]
        lines.append((time.monotonic() - started, line.rstrip()))
        print(f"{lines[-1][0]:7.1f} s  {lines[-1][1]}", flush=True)
    proc.wait()
    wall = time.monotonic() - started
    plan = next((l for _, l in lines if "budget" in l and "ends around" in l), None)
    progress = [t for t, l in lines if "step (" in l]
    gaps = np.diff([0.0] + progress + [wall]) if progress else np.array([wall])
    steps = re.search(r"about ([\d,]+) steps, (\d+) epochs", plan or "")
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    result = {"device": describe_device("cpu"), "cells": args.cells, "side": args.side,
              "budget_minutes": args.minutes, "returncode": proc.returncode, "plan": plan,
              "planned_steps": int(steps.group(1).replace(",", "")) if steps else None,
              "planned_epochs": int(steps.group(2)) if steps else None, "epochs_in_config": config.get("epochs"),
              "wall_minutes": wall / 60, "wall_over_budget": wall / (60 * args.minutes),
              "within_10_percent": bool(abs(wall / (60 * args.minutes) - 1) <= 0.10),
              "progress_lines": len(progress), "max_gap_s": float(gaps.max()),
              "stdout": proc.stdout.read().strip() if proc.stdout else ""}  # type: ignore[union-attr]
    write_json(result, args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "stdout"}, indent=1))


if __name__ == "__main__":
    main()

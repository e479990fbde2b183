"""Startup: how long `ssl-blood --help`, one command's `--help` and `linear-probe` on an existing
embeddings file take in a fresh process, and which heavy libraries each imports. Targets (issue
21): --help <= 1 s, linear-probe on an embeddings file <= 8 s on the 2-core CPU. The peer in the
same run: `python -c "import torch"`, the floor any command that needs torch pays.

    python experiments/bench_cli.py [--embeddings runs/quick/embeddings.npz] [--repeats 5]

Without --embeddings a small synthetic embeddings file is made. Writes
experiments/results/bench_cli.json (or --out).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ssl_blood.device import describe_device
from ssl_blood.files import write_json

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "faiss", "umap", "bokeh", "sklearn", "matplotlib")


def seconds(argv: list[str], repeats: int) -> dict:
    """Median (and min, max) wall seconds of a fresh process running `argv`."""
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True)
        runs.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.strip()[-300:]}")
    return {"median_s": round(statistics.median(runs), 3), "min_s": round(min(runs), 3),
            "max_s": round(max(runs), 3), "runs": len(runs)}


def heavy_imports(cli_args: list[str]) -> list[str]:
    code = ("import sys; from ssl_blood.cli import main\n"
            f"try:\n    main({cli_args!r})\nexcept SystemExit:\n    pass\n"
            f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return eval(done.stdout.strip().splitlines()[-1].removeprefix("HEAVY "))  # our own printout


def synthetic_embeddings(folder: Path) -> Path:
    from ssl_blood.features.embeddings import EmbedderSpec, Embeddings

    rng = np.random.default_rng(0)
    parts = [(split, n) for split, n in (("train", 11959), ("val", 1712), ("test", 3421))]
    labels = np.concatenate([rng.integers(0, 8, n) for _, n in parts])
    features = (rng.normal(size=(len(labels), 512)) + labels[:, None] * 0.1).astype(np.float32)
    spec = EmbedderSpec(kind="pixels", identity="pixels:bench", image_size=28, channels=3,
                        num_classes=8, source={"kind": "npz", "path": "/none.npz", "size": 28})
    emb = Embeddings(features, labels, np.concatenate([[s] * n for s, n in parts]),
                     np.concatenate([np.arange(n) for _, n in parts]),
                     tuple(f"class {i}" for i in range(8)), spec)
    return emb.save(folder / "embeddings.npz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embeddings")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "bench_cli.json"))
    args = parser.parse_args()
    cli = [sys.executable, "-m", "ssl_blood"]
    with tempfile.TemporaryDirectory() as tmp:
        emb = args.embeddings or str(synthetic_embeddings(Path(tmp)))
        result = {
            "device": describe_device("cpu"),
            "peer_import_torch": seconds([sys.executable, "-c", "import torch"], args.repeats),
            "help": {**seconds(cli + ["--help"], args.repeats), "heavy_imports": heavy_imports(["--help"])},
            "pretrain_help": {**seconds(cli + ["pretrain", "--help"], args.repeats),
                              "heavy_imports": heavy_imports(["pretrain", "--help"])},
            "linear_probe": seconds(cli + ["linear-probe", "--embeddings", emb, "--json", "--out",
                                           str(Path(tmp) / "lp")], max(1, args.repeats // 2)),
            "embeddings": "synthetic (17,092 x 512)" if not args.embeddings else emb,
        }
    result["targets"] = {"help_s": 1.0, "linear_probe_s": 8.0,
                         "help_met": result["help"]["median_s"] <= 1.0,
                         "linear_probe_met": result["linear_probe"]["median_s"] <= 8.0}
    write_json(result, args.out)
    print(result)


if __name__ == "__main__":
    main()

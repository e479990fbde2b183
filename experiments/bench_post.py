"""After pretraining: how long `embed`, `linear-probe` and `report` take on a finished quick run,
their peak memory, the size of what they write, the effect of float16 embeddings, and the
interactive map's size and time to interactive in headless Chromium (3,421 test cells, and a
50,000-cell map). Each command runs as a user would run it: a fresh process, timed by
/usr/bin/time (wall clock and peak RSS).

    python experiments/bench_post.py --run runs/reproduce/simclr-quick-seed0

Writes experiments/results/bench_post.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ssl_blood.device import describe_device
from ssl_blood.features.embeddings import Embeddings
from ssl_blood.evaluation.frozen import linear_probe, labelled_split
from ssl_blood.files import write_json

REPO = Path(__file__).resolve().parents[1]


def timed(*argv: str, repeats: int = 1) -> dict:
    """Wall seconds and peak RSS (MB) of one ssl-blood command in a fresh process; with repeats,
    the median (min and max beside) of that many runs. `{i}` in an argument is the run's number."""
    runs = []
    for i in range(repeats):
        args = [a.replace("{i}", str(i)) for a in argv]
        proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "ssl_blood", *args],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        seconds, kb = proc.stderr.strip().splitlines()[-1].split()
        runs.append((float(seconds), int(kb) / 1024))
    seconds = [r[0] for r in runs]
    return {"command": "ssl-blood " + " ".join(argv[:1]), "seconds": statistics.median(seconds),
            "min_s": min(seconds), "max_s": max(seconds), "runs": repeats,
            "peak_rss_mb": max(r[1] for r in runs)}


def probe_imports_seconds() -> float:
    """Seconds a fresh process spends importing what `linear-probe` needs before any work:
    torch, scikit-learn (medmnist's Evaluator), matplotlib, and torch._dynamo, which torch.optim
    imports the first time an optimizer is built."""
    code = ("import torch, sklearn.metrics, matplotlib.pyplot, ssl_blood.cli, ssl_blood.evaluation.frozen;"
            "torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])")
    proc = subprocess.run(["/usr/bin/time", "-f", "%e", sys.executable, "-c", code], capture_output=True, text=True)
    return float(proc.stderr.strip().splitlines()[-1])


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def import_floor() -> dict:
    """Peak RSS of a process that only imports what a report imports (the floor under it)."""
    code = "import torch, sklearn.cluster, umap, matplotlib.pyplot, bokeh.plotting, faiss, pandas, ssl_blood.analysis.report"
    proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", sys.executable, "-c", code], capture_output=True,
                          text=True)
    seconds, kb = proc.stderr.strip().splitlines()[-1].split()
    torch_only = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-c", "import torch"],
                                capture_output=True, text=True).stderr.strip().splitlines()[-1]
    return {"imports_peak_rss_mb": int(kb) / 1024, "imports_seconds": float(seconds),
            "torch_alone_peak_rss_mb": int(torch_only) / 1024}


def float16_effect(emb_path: Path, tmp: Path) -> dict:
    emb = Embeddings.load(emb_path)
    half_path = tmp / "half.npz"
    emb.save(half_path, dtype="float16")
    half = Embeddings.load(half_path)
    out = {"float32_mb": emb_path.stat().st_size / 1e6, "float16_mb": half_path.stat().st_size / 1e6}
    for name, e in (("float32", emb), ("float16", half)):
        parts = [labelled_split(e, s)[:2] for s in ("train", "val", "test")]
        started = time.perf_counter()
        probe = linear_probe(*parts[0], *parts[1], *parts[2], e.class_names)
        out[f"{name}_probe_seconds_in_process"] = time.perf_counter() - started
        out[f"{name}_probe_test_acc"], out[f"{name}_probe_weight_decay"] = probe["test_acc"], probe["weight_decay"]
    return out


def map_timing(html: Path) -> dict:
    """Seconds from navigation until the bokeh document is rendered, in headless Chromium."""
    sys.path.insert(0, str(REPO))
    from tests.helpers import CHROMEDRIVER, CHROMIUM, chrome, wait_for

    if not (CHROMIUM and CHROMEDRIVER):
        return {"note": "chromium not installed"}
    driver = chrome()
    try:
        started = time.monotonic()
        driver.get(html.as_uri())
        ready = wait_for(lambda: driver.execute_script(
            "return !!(window.Bokeh && Bokeh.index && [...Bokeh.index.roots].length)"), 60, 0.02)
        seconds = time.monotonic() - started
        return {"seconds_to_interactive": seconds if ready else None, "mb": html.stat().st_size / 1e6}
    finally:
        driver.quit()


def big_map(emb_path: Path, tmp: Path, n: int) -> tuple[Path, dict]:
    """A map of n cells: the test cells drawn with replacement, with a little noise on the
    features; thumbnails from the split's images, the default cap of 20,000 sampled."""
    from dataclasses import replace

    from ssl_blood.analysis.explore import explore_page

    emb = Embeddings.load(emb_path)
    x, y, ids = emb.select("test")
    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(x), n)
    big = replace(emb, features=x[rows] + 0.01 * rng.normal(size=(n, x.shape[1])).astype(np.float32),
                  labels=y[rows], split=np.array(["test"] * n), ids=ids[rows], metadata={}, coords=None)
    out = tmp / f"map-{n}.html"
    started = time.perf_counter()
    info = explore_page(big, out, "test")
    return out, {**info, "build_seconds": time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/reproduce/simclr-quick-seed0")
    parser.add_argument("--big-map", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3, help="runs of embed and linear-probe (median)")
    parser.add_argument("--out", default=str(REPO / "experiments/results/bench_post.json"))
    args = parser.parse_args()
    run = Path(args.run)
    result = {"device": describe_device("auto"), "run": str(run), "floor": import_floor()}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        emb = tmp / "emb.npz"
        result["embed"] = timed("embed", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(tmp / "emb{i}.npz"),
                                repeats=args.repeats)
        shutil.copy(tmp / "emb0.npz", emb)
        result["embed"]["file_mb"] = emb.stat().st_size / 1e6
        result["linear_probe"] = timed("linear-probe", "--embeddings", str(emb), "--out", str(tmp / "lp{i}"), "--json",
                                       repeats=args.repeats)
        result["linear_probe"]["imports_seconds"] = probe_imports_seconds()
        probe = json.loads((tmp / "lp0" / "linear_probe.json").read_text())
        result["linear_probe"].update(test_acc=probe["test_acc"], weight_decay=probe["weight_decay"])
        result["float16"] = float16_effect(emb, tmp)
        copy = tmp / "run"
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("analysis", "report.html", "eval"))
        result["report"] = timed("report", "--run", str(copy))
        result["report"]["analysis_mb"] = folder_mb(copy / "analysis")
        result["report"]["report_html_mb"] = (copy / "report.html").stat().st_size / 1e6
        result["report_again"] = timed("report", "--run", str(copy))  # everything cached
        result["map_test_split"] = map_timing(copy / "analysis" / "map.html")
        big, info = big_map(copy / "analysis" / "embeddings-model.npz", tmp, args.big_map)
        result["map_50k"] = {**info, **map_timing(big)}
    write_json(result, args.out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The benchmark and ablation scripts run end to end at tiny size (the GPU session depends on
them working the first time); their numbers are checked for consistency, never for speed."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from ssl_blood.embed import Embeddings

REPO = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / name), *args],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def clustered_embeddings(path: Path) -> Path:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 32)).astype(np.float32)
    labels = np.repeat(np.arange(4), 100)
    features = centres[labels] + 0.5 * rng.standard_normal((400, 32)).astype(np.float32)
    split = np.array(["train"] * 300 + ["test"] * 100)
    order = rng.permutation(400)
    Embeddings(features[order], labels[order], split, np.arange(400), ("a", "b", "c", "d"),
               {"kind": "pixels", "image_size": 28, "channels": 3}).save(path)
    return path


def assert_sweep_consistent(part: dict, nlist: int) -> None:
    recalls = [s["recall_at_10"] for s in part["sweep"]]
    assert recalls == sorted(recalls), "recall must not fall as nprobe grows"
    exhaustive = [s for s in part["sweep"] if s["nprobe"] == nlist]
    assert exhaustive and exhaustive[0]["recall_at_10"] == 1.0, "probing every list is exact search"


def test_bench_retrieval_tiny(tmp_path):
    emb = clustered_embeddings(tmp_path / "emb.npz")
    out = tmp_path / "bench_retrieval.json"
    for synthetic in ("resampled", "gaussian"):
        run_script("bench_retrieval.py", "--embeddings", str(emb), "--device", "cpu", "--synthetic", synthetic,
                   "--synthetic-n", "3000", "--synthetic-dim", "32", "--clusters", "20", "--queries", "50",
                   "--nlist", "16", "--real-nlist", "8", "--nprobes", "1,8,16", "--repeats", "1",
                   "--out", str(out))
        result = json.loads(out.read_text())
        assert result["real"]["torch_agrees_with_faiss"] == 1.0
        assert result["real"]["gallery"] == 300 and result["real"]["queries"] == 100
        assert_sweep_consistent(result["real_ivf"], 8)
        assert_sweep_consistent(result["synthetic_ivf"], 16)
        assert result["synthetic_ivf"]["gallery"] == 3000


def test_bench_pretrain_tiny(data_root, tmp_path):
    out = tmp_path / "bench_pretrain.json"
    run_script("bench_pretrain.py", "--data-root", str(data_root), "--device", "cpu", "--backbone", "cnn6",
               "--batch-size", "32", "--seconds", "0.5", "--warmup", "1", "--workers", "0",
               "--epochs", "0", "--out", str(out))
    result = json.loads(out.read_text())
    for key in ("model_only_img_s", "lightly_reference_img_s", "ssl_blood_img_s"):
        assert result[key] > 0
    assert result["ratio_vs_lightly"] == result["ssl_blood_img_s"] / result["lightly_reference_img_s"]
    assert result["device"].startswith("CPU") and result["simclr_200_epochs_s"] is None


def test_ablate_tiny_writes_val_metrics(data_root, tmp_path):
    out = tmp_path / "ablations.json"
    run_script("ablate.py", "--data-root", str(data_root), "--preset", "quick",
               "--candidate", "tiny=epochs=1;limit=200;backbone=cnn6;knn_every=-1",
               "--runs", str(tmp_path / "runs"), "--out", str(out))
    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == ["tiny"]
    row = rows[0]
    assert row["config"]["backbone"] == "cnn6" and row["config"]["epochs"] == 1
    assert row["overrides"]["epochs"] == 1
    assert 0 <= row["probe_val_acc"] <= 1 and 0 <= row["knn_val_acc"] <= 1
    assert not [key for key in row if key.startswith("test")], "ablations select on val only"

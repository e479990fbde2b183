import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_reproduce_smoke_runs_end_to_end(data_root, tmp_path):
    out, docs = tmp_path / "bloodmnist.json", tmp_path / "results.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "reproduce.py"), "--smoke", "--seeds", "0",
         "--methods", "simclr,dino", "--data-root", str(data_root), "--runs", str(tmp_path / "runs"),
         "--out", str(out), "--docs", str(docs)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["device"] and result["commit"]
    for method in ("simclr", "dino"):
        run = result["methods"][method]["runs"][0]
        for key in ("linear_probe_test_acc", "linear_probe_test_auc", "knn_test_acc"):
            assert 0 <= run[key] <= 1
        assert {r["setting"] for r in run["few_shot"]} == {"1-shot", "5-shot", "0.1 of train"}
        assert all(r["chosen_on"] == "val" and r["head"] in r["heads"] for r in run["few_shot"])
        assert 0 <= run["kmeans_nmi"] <= 1 and run["linear_probe_weight_decay"] in run["linear_probe_weight_decay_grid"]
        assert result["methods"][method]["summary"]["linear_probe_test_acc"]["n"] == 1
    assert set(result["baselines"]) == {"pixels", "random-init"}
    assert 0 <= result["supervised"]["test_acc"] <= 1
    text = docs.read_text()
    assert "smoke run on a tiny subset: not a result" in text and "| baseline: raw pixels |" in text
    assert "Anchors" in text and "supervised" in text and "k-means NMI" in text
    assert "### Few-shot heads: simclr" in text and "chosen (runs)" in text

    # --reuse-runs evaluates the finished runs again and keeps the matching supervised reference
    again = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "reproduce.py"), "--smoke", "--seeds", "0",
         "--methods", "simclr", "--data-root", str(data_root), "--runs", str(tmp_path / "runs"),
         "--out", str(out), "--docs", str(docs), "--reuse-runs"],
        capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    reused = json.loads(out.read_text())
    assert reused["methods"]["simclr"]["runs"][0]["reused"] is True
    assert reused["supervised"]["reused"] is True
    assert reused["supervised"]["test_acc"] == result["supervised"]["test_acc"]

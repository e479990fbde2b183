"""The experiment scripts run end to end at tiny size (the long runs and the GPU session depend
on them working the first time); their numbers are checked for consistency, never for speed."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ssl_blood.features.embeddings import Embeddings, EmbedderSpec
from tests.helpers import REPO


def run_script(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / name), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def clustered_embeddings(path: Path) -> Path:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 32)).astype(np.float32)
    labels = np.repeat(np.arange(4), 100)
    features = centres[labels] + 0.5 * rng.standard_normal((400, 32)).astype(np.float32)
    split = np.array(["train"] * 300 + ["test"] * 100)
    order = rng.permutation(400)
    ids = np.concatenate([np.arange(300), np.arange(100)])
    spec = EmbedderSpec(kind="pixels", identity="pixels:t", image_size=4, channels=1, num_classes=4,
                        source={"kind": "npz", "path": "/gone.npz", "size": 4})
    Embeddings(features[order], labels[order], split[order], ids[order], ("a", "b", "c", "d"), spec).save(path)
    return path


def assert_sweep_consistent(part: dict, nlist: int) -> None:
    for index in part["indices"].values():
        recalls = [s["recall_at_10"] for s in index["sweep"]]
        assert recalls == sorted(recalls), "recall must not fall as nprobe grows"
        for s in index["sweep"]:
            assert s["min_s"] <= s["median_s"] <= s["max_s"]
            assert s["speedup_vs_exact"] == pytest.approx(part["exact"]["median_s"] / s["median_s"])
    exhaustive = [s for s in part["indices"][f"ivf-nlist{nlist}"]["sweep"] if s["nprobe"] == nlist]
    assert exhaustive and exhaustive[0]["recall_at_10"] == 1.0, "probing every list is exact search"


def test_bench_retrieval_tiny(tmp_path):
    emb = clustered_embeddings(tmp_path / "emb.npz")
    out = tmp_path / "bench_retrieval.json"
    run_script("bench_retrieval.py", "--embeddings", str(emb), "--device", "cpu", "--repeats", "2",
               "--real-configs", "ivf:nlist=8:1,8", "--synthetic-n", "3000",
               "--configs", "ivf:nlist=16:1,4,16;hnsw::16,64;ivfpq:nlist=16:4,16", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["real"]["torch_agrees_with_faiss_top1"] == 1.0
    assert result["real"]["gallery"] == 300 and result["real"]["queries"] == 100
    assert set(result["real"]["timings"]) == {"faiss_cpu", "torch_cpu"}
    assert_sweep_consistent(result["real_ivf"], 8)
    assert_sweep_consistent(result["synthetic"], 16)
    assert result["synthetic"]["gallery"] == 3000
    assert {i["kind"] for i in result["synthetic"]["indices"].values()} == {"ivf", "hnsw", "ivfpq"}
    assert all(i["bytes"] > 0 and i["build_s"] > 0 for i in result["synthetic"]["indices"].values())


def test_bench_pretrain_tiny(data_root, tmp_path):
    out = tmp_path / "bench_pretrain.json"
    run_script("bench_pretrain.py", "--data-root", str(data_root), "--device", "cpu", "--backbone", "cnn6",
               "--batch-size", "32", "--seconds", "0.3", "--rounds", "2", "--warmup", "1", "--workers", "0",
               "--epochs", "0", "--out", str(out))
    result = json.loads(out.read_text())
    import statistics

    for key in ("model_only", "lightly_reference", "ssl_blood"):
        stats = result[f"{key}_img_s"]
        windows = stats["windows"]  # every window was measured: two rounds, all positive
        assert len(windows) == 2 and all(w > 0 for w in windows)
        assert stats["median"] == pytest.approx(statistics.median(windows), rel=1e-3)
        assert (stats["min"], stats["max"]) == pytest.approx((min(windows), max(windows)), rel=1e-3)
    assert result["pipeline_above_model_only"] is (result["ratio_vs_model_only"] > 1)
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


def test_label_efficiency_tiny(tiny_run, tmp_path):
    run, _ = tiny_run
    out, docs = tmp_path / "le.json", tmp_path / "le.md"
    args = ["--checkpoint", str(run / "checkpoint.pt"), "--seeds", "2", "--epochs", "1", "--epochs-full", "1",
            "--out", str(out), "--docs", str(docs), "--figure", str(tmp_path / "le.png")]
    run_script("label_efficiency.py", *args)
    data = json.loads(out.read_text())
    keys = set(data["entries"])
    assert {"probe/typiclust/8/0", "probe/kcenter/16/1", "probe/pixels/40/0", "finetune/0.01/1",
            "scratch/1.0/0"} <= keys
    assert all(0 <= e["value"] <= 1 for k, e in data["entries"].items() if k.startswith("probe/"))
    before = out.read_text()
    run_script("label_efficiency.py", *args)  # resumable: nothing is computed twice
    assert json.loads(out.read_text())["entries"] == json.loads(before)["entries"]
    text = docs.read_text()
    assert "## Targets" in text and "linear probe, TypiClust cells" in text and (tmp_path / "le.png").exists()


def test_standard_preset_tiny(data_root, tiny_run, tmp_path):
    quick = tmp_path / "quick"
    quick.mkdir()
    (quick / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "loss": 1.0, "seconds": 60.0}) + "\n")
    import shutil

    shutil.copy(tiny_run[0] / "checkpoint.pt", quick / "checkpoint.pt")
    run_script("standard_preset.py", "--data-root", str(data_root), "--quick-run", str(quick),
               "--runs", str(tmp_path / "runs"), "--budgets", "1,2", "--limit", "120",
               "--search", str(tmp_path / "search.json"), "--out", str(tmp_path / "curve.json"),
               "--figure", str(tmp_path / "curve.png"))
    search = json.loads((tmp_path / "search.json").read_text())
    assert [r["name"] for r in search] == ["base-1min", "temp0.1-1min", "batch512-1min"]
    assert not [k for r in search for k in r if k.startswith(("probe_test", "knn_test"))]
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert [p["budget"] for p in curve["curve"]] == ["quick (8 epochs)", "1 min", "2 min"]
    assert curve["curve"][2]["epochs"] == 2 and "verdict" in curve


def test_bench_streaming_tiny(tmp_path):
    out = tmp_path / "stream.json"
    run_script("bench_streaming.py", "--folder", str(tmp_path / "cells"), "--images", "300", "--size", "32",
               "--batch", "16", "--steps", "3", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["stream"]["mode"] == "stream" and result["memory"]["mode"] == "memory"
    assert result["stream"]["images"] == 300 and result["stream"]["img_s"] > 0
    assert result["stream"]["images"] == result["memory"]["images"]  # both modes read the same cache


def test_classifier_experiment_review_metrics_and_document(tmp_path):
    """experiments/classifier.py's review-rate numbers on a case worked by hand, and its page."""
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import classifier as experiment
    finally:
        sys.path.pop(0)
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.55, 0.45], [0.95, 0.05], [0.8, 0.2]])
    correct = np.array([True, False, False, True, True])
    at_40 = experiment.review_at_rate(probabilities.max(1), correct, 0.4)  # flags the two least sure
    assert at_40["accepted_accuracy"] == 1.0 and at_40["error_enrichment"] == pytest.approx(1 / 1e-9)
    at_20 = experiment.review_at_rate(probabilities.max(1), correct, 0.2)  # flags cell 2 only
    assert at_20["accepted_accuracy"] == 0.75 and at_20["error_enrichment"] == pytest.approx(1 / 0.25)
    entry = {"labels": 40, "test_accuracy": 0.7, "ece_before": 0.1, "ece_after": 0.05, "nll_before": 1.0,
             "nll_after": 0.9, "own_threshold": {"review_rate": 0.2, "accepted_accuracy": 0.8},
             "review_15": {"accepted_accuracy": 0.78}, "review_20": {"error_enrichment": 3.0},
             "count_abs_error_pp": {"a": 2.0, "b": 4.0}}
    one = {**entry, "views": 1, "test_accuracy": 0.6}
    page = experiment.document({"device": "CPU", "entries": {"40-seed0-views8": {**entry, "views": 8},
                                                             "40-seed0-views1": one}})
    assert "| logistic | 8 | 40 | 0.700 | 0.100 → 0.050 | 1.000 → 0.900 | 20.0%, 0.800 | 0.780 | 3.0x | 3.00 |" in page
    assert "| logistic | 1 | 40 | 0.600 |" in page
    assert "enrichment >= 6x at no labels; ECE <= 0.03 at no labels." in page  # about the 8-view rows
    # another checkpoint's table is a tagged section; rewriting the page keeps it
    doc = tmp_path / "classifier.md"
    section = experiment.section({"device": "CPU", "checkpoint": "runs/standard/checkpoint.pt",
                                  "results_file": "classifier_standard.json",
                                  "entries": {"40-seed0-views8": {**entry, "views": 8}}})
    doc.write_text(page + "\n<!-- std:start -->\n" + "\n".join(section) + "\n<!-- std:end -->\n")
    rewritten = experiment.page_keeping_sections(doc, page.replace("0.700", "0.710"))
    assert "| logistic | 8 | 40 | 0.710 |" in rewritten and rewritten.count("<!-- std:start -->") == 1
    assert "## Checkpoint `runs/standard/checkpoint.pt`" in rewritten and "| logistic | 8 | 40 | 0.700 |" in rewritten


def test_review_score_candidates_on_a_worked_case():
    """experiments/review_score.py's neighbour scores: agreement counts the neighbours that share
    the call, smoothed averages the call's probability over the cell and its k neighbours."""
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import review_score as experiment
    finally:
        sys.path.pop(0)
    p = np.array([[0.7, 0.3], [0.4, 0.6]])
    pool_p = np.array([[0.9, 0.1]] * 10 + [[0.2, 0.8]] * 10)
    neighbours = np.tile(np.arange(20), (2, 1))  # the first 5 and 10 neighbours say class 0
    s = experiment.scores(p, pool_p, neighbours)
    assert s["agreement-k10"][0] == pytest.approx(1 + 1e-3 * 0.7)
    assert s["agreement-k10"][1] == pytest.approx(0 + 1e-3 * 0.6)
    assert s["agreement-k20"][1] == pytest.approx(0.5 + 1e-3 * 0.6)
    assert s["smoothed-k5"][0] == pytest.approx((0.7 + 5 * 0.9) / 6)
    assert s["smoothed-k20"][1] == pytest.approx((0.6 + 10 * 0.1 + 10 * 0.8) / 21)
    assert s["margin"] == pytest.approx([0.4, 0.2]) and s["top"] == pytest.approx([0.7, 0.6])
    one = {name: {"accepted_accuracy": 0.8, "error_enrichment": 3.0} for name in s}
    better = {**one, "smoothed-k10": {"accepted_accuracy": 0.85, "error_enrichment": 4.0},
              "smoothed-k10@kept": {"accepted_accuracy": 0.9, "error_enrichment": 5.0}}  # never chosen
    results = {"device": "CPU", "checkpoint": "runs/x/checkpoint.pt", "results_file": "r.json",
               "entries": {"40-seed0": {"val": better, "test": better}}}
    text = experiment.section(results)
    assert "| 40 | smoothed-k10 | 0.800 → 0.850 | 0.800 → 0.850 | 3.0x → 4.0x | 0.900 |" in text
    assert "+5.0 points at 40 labels (smoothed-k10, +10.0 with the kept cells)" in text


def test_label_loop_tiny(tiny_run, tmp_path):
    """Every strategy runs its rounds; labels grow by the round size; the doc section and the
    figure are written where asked."""
    run, _ = tiny_run
    out, doc, fig = tmp_path / "loop.json", tmp_path / "doc.md", tmp_path / "loop.png"
    doc.write_text("# Label efficiency\n\nkept text\n")
    run_script("label_loop.py", "--checkpoint", str(run / "checkpoint.pt"), "--seeds", "1", "--rounds", "2",
               "--size", "8", "--cold", "12", "--out", str(out), "--doc", str(doc), "--figure", str(fig))
    result = json.loads(out.read_text())
    assert set(result["summary"]) == {"random", "typiclust", "probcover", "margin"}
    for row in result["summary"].values():
        assert row["labels"] == [12, 20, 28]
        assert all(0 <= a <= 1 for a in row["accuracy_mean"])
    text = doc.read_text()
    assert "kept text" in text and text.count("label-loop:start") == 1 and fig.stat().st_size > 5000


def test_semi_supervised_tiny(tiny_run, tmp_path):
    run, _ = tiny_run
    out, doc = tmp_path / "semi.json", tmp_path / "doc.md"
    run_script("semi_supervised.py", "--checkpoint", str(run / "checkpoint.pt"), "--seeds", "1",
               "--budgets", "8,16", "--selections", "random", "--out", str(out), "--doc", str(doc))
    entries = json.loads(out.read_text())["entries"]
    assert set(entries) == {f"random-{b}-{h}-seed0" for b in (8, 16) for h in ("logistic", "propagate")}
    for e in entries.values():
        assert 0 <= e["accuracy"] <= 1 and set(e["recall"]) and e["seconds"] >= 0
        assert (e["pseudo_per_label"] in (0, 5, 20)) and (e["head"] == "propagate" or not e["propagation"])
    assert "semi-supervised:start" in doc.read_text() and "Targets of" not in doc.read_text()  # no target budget
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import semi_supervised as experiment
    finally:
        sys.path.pop(0)
    rows = {("random", 40, "logistic"): [{"accuracy": 0.84}, {"accuracy": 0.88}],
            ("random", 40, "propagate"): [{"accuracy": 0.80}], ("random", 80, "logistic"): [{"accuracy": 0.9}]}
    assert experiment.targets(rows) == ("Targets of the semi-supervised issue, best frozen-feature row: "
                                        "40 labels 86.0 % (target 85 %: met); 80 labels 90.0 % (target 89 %: met).")


def test_shift_tiny(tiny_run, tmp_path):
    run, _ = tiny_run
    out, doc = tmp_path / "shift.json", tmp_path / "robustness.md"
    run_script("shift.py", "--checkpoint", str(run / "checkpoint.pt"), "--labels", "24", "--batch", "20",
               "--clean-batches", "3", "--shift-batches", "2", "--out", str(out), "--doc", str(doc))
    result = json.loads(out.read_text())
    assert 0 <= result["clean_fire_rate"] <= 1 and set(result["fire_rate"]) == {"stain", "blur", "resample", "brightness"}
    assert all(len(v) == 5 for v in result["fire_rate"].values())
    assert set(result["accuracy"]) == {"clean", "stain", "blur", "resample", "brightness"}
    assert "| stain |" in doc.read_text()


def test_consistency_tiny(tiny_run, tmp_path):
    """Every recipe on seed 0, the one chosen on val for every seed, the from-scratch reference,
    and the doc's computed verdict."""
    run, _ = tiny_run
    out, doc = tmp_path / "consistency.json", tmp_path / "doc.md"
    run_script("consistency.py", "--checkpoint", str(run / "checkpoint.pt"), "--steps", "3", "--seeds", "2",
               "--budgets", "8", "--out", str(out), "--doc", str(doc))
    result = json.loads(out.read_text())
    chosen = result["chosen"]
    assert set(result["val"]) == {"fixmatch", "fixmatch-fast", "flexmatch", "fixmatch-calibrated",
                                  "fixmatch-ema-teacher", "fixmatch-ema-aligned"}
    assert result["val"][chosen] == max(result["val"].values())
    reported = {k for k, e in result["entries"].items() if e["reported"]}
    assert reported == {f"{h}-8-seed{s}" for h in ("logistic", chosen, f"scratch-{chosen}") for s in (0, 1)}
    for e in result["entries"].values():
        assert 0 <= e["accuracy"] <= 1 and e["steps"] in (0, 3) and set(e["recall"])
    text = doc.read_text()
    assert "consistency:start" in text and f"At 8 labels: {chosen}" in text


def test_consistency_on_loop_picked_labels_tiny(tiny_run, tmp_path):
    """--picks loop: the labelling loop's cells (typiclust, then a margin round filling the budget)
    train every head, and the doc says which cells and which checkpoint they were."""
    run, _ = tiny_run
    out, doc = tmp_path / "consistency.json", tmp_path / "doc.md"
    run_script("consistency.py", "--checkpoint", str(run / "checkpoint.pt"), "--steps", "2", "--seeds", "1",
               "--budgets", "48", "--variants", "fixmatch-calibrated", "--picks", "loop", "--out", str(out),
               "--doc", str(doc))
    result = json.loads(out.read_text())
    assert result["picks"] == "loop"
    assert {e["labelled_cells"] for e in result["entries"].values()} == {48}
    assert "chosen as the labelling loop does" in doc.read_text()
    assert f"Checkpoint `{run / 'checkpoint.pt'}` ({result['checkpoint_sha256'][:19]})" in doc.read_text()
    assert not list((tmp_path / "consistency").glob("*.state*.pt")), "a finished entry keeps no resume state"


def test_robustness_tiny(tiny_run, tmp_path):
    run, _ = tiny_run
    out, doc = tmp_path / "robustness.json", tmp_path / "robustness.md"
    run_script("robustness.py", "--checkpoint", str(run / "checkpoint.pt"), "--labels", "48",
               "--picks", "loop", "--corruptions", "stain,blur", "--views", "2", "--out", str(out),
               "--doc", str(doc), "--keep", str(tmp_path / "kept"))
    result = json.loads(out.read_text())
    assert len(result["rows"]) == (1 + 2 * 5) * 3 and set(result["summary"]) == {"none", "adabn", "auto"}
    assert result["views"] == 2 and result["picks"] == "loop"
    kept = json.loads((tmp_path / "kept" / "robustness" / "card.json").read_text())
    assert sum(kept["labels_per_class"].values()) == 48  # 40 typiclust + a margin round of 8
    assert "loop-chosen (40 typiclust, then rounds of 40" in doc.read_text()
    for row in result["rows"]:  # auto adapts exactly the rows the shift check warned on
        assert row["adapted"] == {"none": "none", "adabn": "adabn",
                                  "auto": "adabn" if row["shift_warning"] else "none"}[row["adapt"]]
    assert "robustness:start" in doc.read_text() and "| blur |" in doc.read_text()


def test_robustness_of_a_consistency_trained_classifier_keeps_it_for_a_rerun(tiny_run, tmp_path):
    run, _ = tiny_run
    out, doc = tmp_path / "fixmatch.json", tmp_path / "robustness.md"
    args = ("--checkpoint", str(run / "checkpoint.pt"), "--labels", "24", "--corruptions", "blur",
            "--views", "1", "--head", "fixmatch", "--steps", "3", "--calibration-folds", "0",
            "--shift-augment", "0.5", "--severities", "3", "--out", str(out), "--doc", str(doc),
            "--tag", "robustness-fixmatch", "--keep", str(tmp_path / "kept"))
    first = run_script("robustness.py", *args)
    assert "measuring the classifier kept" not in first.stdout
    card = json.loads((tmp_path / "kept" / "fixmatch" / "card.json").read_text())
    assert card["head"] == "fixmatch" and card["consistency"]["config"]["shift_augment"] == 0.5
    result = json.loads(out.read_text())
    assert result["head"] == "fixmatch" and result["severities"] == [3] and result["shift_augment"] == 0.5
    assert result["checkpoint_sha256"].startswith("sha256:")
    assert [(r["corruption"], r["severity"]) for r in result["rows"]] == [("clean", 0)] * 3 + [("blur", 3)] * 3
    assert "head fixmatch: the backbone consistency-trained for 3 steps" in doc.read_text()
    again = run_script("robustness.py", *args)  # the same settings: measured again, not retrained
    assert "measuring the classifier kept" in again.stdout
    assert json.loads(out.read_text())["rows"] == result["rows"]
    run_script("robustness.py", "--compare", str(out), f"{out},{out}", "--doc", str(doc), "--tag", "compared")
    section = doc.read_text().split("<!-- compared:start -->")[1]
    assert "| blur | " in section and "| clean | " in section
    assert section.count("+0.0") >= 4  # the same results against themselves (two draws' mean of one)
    assert "changes clean accuracy by +0.0 points" in section


def test_shift_copies_tiny_compares_the_heads_and_resumes(tiny_run, tmp_path):
    run, _ = tiny_run
    out, doc = tmp_path / "shift_copies.json", tmp_path / "robustness.md"
    args = ["--checkpoint", str(run / "checkpoint.pt"), "--labels", "24", "--copies", "2", "--seeds", "0",
            "--corruptions", "stain,blur", "--out", str(out), "--doc", str(doc)]
    run_script("shift_copies.py", *args)
    result = json.loads(out.read_text())
    assert set(result["entries"]) == {"seed0-copies0", "seed0-copies2"}
    assert [r["corruption"] for r in result["entries"]["seed0-copies2"]["rows"]] == ["clean", "stain", "blur"]
    written = out.read_text()
    run_script("shift_copies.py", *args)  # resumable: nothing is computed twice
    assert out.read_text() == written
    text = doc.read_text()
    assert "shift-copies:start" in text and "| stain | " in text and "with 2 copies" in text


def test_trained_head_temperature_compares_the_rules_on_a_known_case():
    """A trained model twice as sharp as calibrated, fold models calibrated, held-out logits four
    times too sharp: the matched temperature lands near the truth (2), the held-out rule far off."""
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import trained_head_temperature as experiment
    finally:
        sys.path.pop(0)
    from ssl_blood.classify.calibration import softmax

    rng = np.random.default_rng(0)
    honest = rng.normal(size=(4000, 4)) * 2
    val_labels = np.array([rng.choice(4, p=p) for p in softmax(honest)])  # calibrated by construction
    oof = rng.normal(size=(120, 4)) * 2
    labels = np.array([rng.choice(4, p=p) for p in softmax(oof)])
    draw = {"members": np.stack([2 * honest, honest, honest, honest]), "oof": 4 * oof, "labels": labels,
            "folds": np.arange(120) % 3, "val_labels": val_labels}
    result = experiment.compare(draw)
    t = result["temperature"]
    assert result["fold_models"] == 3 and t["oracle"] == pytest.approx(2, rel=0.15)
    assert t["held_out_rule"] > 3 and 1.2 < t["matched"] < 2  # 120 held-out cells: a noisy 4
    assert result["matched"]["ece"] < result["held_out_rule"]["ece"]
    assert result["matched"]["ece"] < result["uncalibrated"]["ece"]
    assert result["ensemble"]["accuracy"] == pytest.approx(result["uncalibrated"]["accuracy"])  # same argmax


def test_trained_head_temperature_runs_end_to_end_and_resumes(tiny_run, tmp_path):
    """The val comparison at tiny size: every model trained, the section written; run again, it
    reads the kept logits instead of training."""
    run, _ = tiny_run
    out, doc = tmp_path / "t.json", tmp_path / "classifier.md"
    args = ("--checkpoint", str(run / "checkpoint.pt"), "--labels", "24", "--seeds", "0", "--steps", "2",
            "--out", str(out), "--doc", str(doc))
    first = run_script("trained_head_temperature.py", *args)
    assert "the training runs again" in first.stderr  # the fold models were trained
    entry = json.loads(out.read_text())["entries"]["fine-tune-24-seed0"]
    assert entry["fold_models"] >= 2 and all(entry["temperature"][r] > 0 for r in ("held_out_rule", "matched", "oracle"))
    kept = tmp_path / "t" / "fine-tune-24-seed0.npz"
    assert kept.is_file() and "| fine-tune | 24 | 0 |" in doc.read_text()
    again = run_script("trained_head_temperature.py", *args)
    assert "the training runs again" not in again.stderr  # nothing trained twice


def test_loop_classifier_tables_every_budget_and_reads_each_against_its_target():
    """experiments/loop_classifier.py's page: a row per budget and picks, recalls where measured,
    the best picks per budget by accepted accuracy, each budget against its own target."""
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import loop_classifier as experiment
    finally:
        sys.path.pop(0)
    probabilities = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    figures = experiment.review_figures(probabilities, probabilities.max(1), np.zeros(4, bool),
                                        np.array([0, 1, 1, 2]))
    assert figures["recall"] == [1.0, 0.5, 1.0] and figures["balanced_accuracy"] == pytest.approx(2.5 / 3)

    def entry(picks, labels, seed, accuracy, accepted, recall=True):
        e = {"picks": picks, "labels": labels, "seed": seed, "accuracy": accuracy, "ece": 0.03,
             "own_threshold": {"review_rate": 0.15, "accepted_accuracy": accepted},
             "review_15": {"accepted_accuracy": accepted}, "review_20": {"error_enrichment": 5.0},
             "labels_per_class": [5, 6]}
        return {**e, "balanced_accuracy": accuracy - 0.05, "recall": [0.4, 0.9]} if recall else e
    loop, once = "loop: typiclust then margin", "typiclust at once"
    entries = [entry(loop, 120, 0, 0.84, 0.91), entry(loop, 120, 1, 0.82, 0.89),
               entry(once, 120, 0, 0.80, 0.85, recall=False), entry(loop, 40, 0, 0.86, 0.88)]
    results = {"device": "CPU", "checkpoint": "c.pt", "checkpoint_sha256": "sha256:0123456789abcdef",
               "class_names": ["basophil", "immature granulocytes"],
               "entries": {f"{e['picks']}-{e['labels']}-seed{e['seed']}": e for e in entries}}
    import argparse
    page = experiment.document(results, argparse.Namespace(out="r/loop_classifier.json", cold=40, size=40, views=8))
    assert f"| 40 | {loop} | 1 | 0.860 ± 0.000 | 0.810 | 0.900 | 0.400 | 0.030 ± 0.000 |" in page
    assert f"| 120 | {loop} | 2 | 0.830 ± 0.010 | 0.780 | 0.900 | 0.400 |" in page
    assert f"| 120 | {once} | 1 | 0.800 ± 0.000 | – | – | – |" in page  # measured before recalls were kept
    assert page.index("| 40 |") < page.index("| 120 |")
    assert "40 labels: **loop: typiclust then margin** (accuracy 86.0%, accepted accuracy at 15 % review " \
           "88.0%; semi-supervised issue's 85% accuracy: met)" in page
    assert "120 labels: **loop: typiclust then margin** (accuracy 83.0%, accepted accuracy at 15 % review " \
           "90.0%; classifier issue's 90 % accepted: met)" in page
    assert page.startswith("<!-- loop-classifier:start -->\n## Which cells to label: all at once, or round by round\n")
    tagged = experiment.document(results, argparse.Namespace(out="r/l.json", cold=40, size=40, views=8, tag="loop-standard"))
    assert tagged.startswith(f"<!-- loop-standard:start -->\n## Which cells to label: all at once, or round by round, "
                             f"checkpoint `{results['checkpoint']}`\n") and tagged.endswith("<!-- loop-standard:end -->\n")


def test_ensemble_page_reads_the_ensemble_against_the_120_label_targets():
    """experiments/ensemble.py's reading: the ensemble's change per head, and at 120 labels its
    accepted accuracy and enrichment against the classifier issue's targets, draw by draw."""
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import ensemble as experiment
    finally:
        sys.path.pop(0)

    def model(accuracy, accepted, enrichment, ece, cells_per_s):
        return {"accuracy": accuracy, "ece": ece, "nll": 0.5, "cells_per_s": cells_per_s,
                "own_threshold": {"review_rate": 0.15, "accepted_accuracy": accepted},
                "review_15": {"accepted_accuracy": accepted}, "review_20": {"error_enrichment": enrichment}}
    entries = {f"fixmatch-120-seed{s}-loop": {
        "head": "fixmatch", "labels": 120, "picks": "loop", "seed": s, "models": 4,
        "single": model(0.84, single, 5.0, 0.06, 300.0), "ensemble": model(0.85, ens, enr, 0.03, 75.0)}
        for s, (single, ens, enr) in enumerate([(0.89, 0.93, 7.0), (0.88, 0.88, 5.0)])}
    page = experiment.document({"device": "CPU", "results_file": "ensemble.json", "checkpoint": "c.pt",
                                "checkpoint_sha256": "sha256:0123456789abcdef0123", "entries": entries})
    assert "| fixmatch | 120 (loop) | 2 | 4 | 0.850 ± 0.000 | 0.030 ± 0.000 |" in page
    assert ("the ensemble changes accuracy by +1.0 points, ECE by -0.030 (to 0.030: target ≤ 0.03 met; "
            "lower in 2 of 2 draws), accepted accuracy at 15 % review by +2.0 points (higher in 1 of 2)") in page
    assert ("(ensemble's accepted accuracy 90.5%: target ≥ 90 % met, reached in 1 of 2 draws; "
            "enrichment 6.0x: target ≥ 6x met, reached in 1 of 2)") in page
    assert ("(the trained model alone: accepted accuracy 88.5%: target ≥ 90 % missed, reached in 0 of 2 draws; "
            "enrichment 5.0x: target ≥ 6x missed, reached in 0 of 2)") in page
    assert page.startswith("<!-- ensemble:start -->\n## An ensemble of the calibration folds' models (`train-classifier --ensemble`)\n")
    other = experiment.document({"device": "CPU", "results_file": "e.json", "checkpoint": "runs/standard/checkpoint.pt",
                                 "checkpoint_sha256": "sha256:0123456789abcdef0123", "entries": entries}, "ensemble-standard")
    assert other.startswith("<!-- ensemble-standard:start -->\n## An ensemble") and other.endswith("<!-- ensemble-standard:end -->\n")
    assert ", checkpoint `runs/standard/checkpoint.pt`\n" in other


def test_record_checkpoint_names_it_and_refuses_results_of_another(tmp_path):
    """A resumed experiment never mixes two checkpoints' numbers in one results file."""
    import types
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        from frozen_features import record_checkpoint
    finally:
        sys.path.pop(0)
    first, second = (types.SimpleNamespace(identity=f"sha256:{c * 64}") for c in "ab")
    results = {"entries": {"done": {}}}
    record_checkpoint(results, "runs/standard/checkpoint.pt", first, tmp_path / "r.json")
    assert results["checkpoint"] == "runs/standard/checkpoint.pt" and results["checkpoint_sha256"] == first.identity
    record_checkpoint(results, "runs/standard/checkpoint.pt", first, tmp_path / "r.json")  # the same one resumes
    with pytest.raises(SystemExit, match=r"r\.json holds results of another checkpoint; give a new --out"):
        record_checkpoint(results, "runs/quick/checkpoint.pt", second, tmp_path / "r.json")
    assert results["checkpoint_sha256"] == first.identity, "the refused checkpoint is not recorded"


def test_new_lab_adds_a_new_labs_labels_and_resumes(tiny_run, tmp_path):
    run, _ = tiny_run
    out, doc = tmp_path / "new_lab.json", tmp_path / "robustness.md"
    args = ("--checkpoint", str(run / "checkpoint.pt"), "--labels", "24", "--shifts", "stain,blur",
            "--ks", "4,16", "--draws", "1", "--views", "1", "--out", str(out), "--doc", str(doc))
    run_script("new_lab.py", *args)
    result = json.loads(out.read_text())
    rows = [r for r in result["rows"] if r["adapt"] != "refused"]
    assert {(r["shift"], r["arm"], r["k"]) for r in rows} >= {
        ("clean", "clean", 0), ("stain", "as it is", 0), ("blur", "added", 4), ("blur", "added", 16),
        ("blur", "added, first lab's slides", 16)}
    first_lab = [r for r in rows if r["arm"] == "added, first lab's slides"]
    assert first_lab and all(r["cells"] == result["cells"] for r in first_lab)  # the clean test split
    assert {r["adapt"] for r in rows if r["arm"] in ("clean", "as it is")} == {"none", "adabn", "auto"}
    for r in result["rows"]:
        if r["arm"] in ("added", "alone"):  # the new lab's labels: k of its (shifted val) cells
            assert sum(r.get("new_labels_per_class", [])) == r["k"] or r["adapt"] == "refused"
    refused = [r for r in result["rows"] if r["adapt"] == "refused"]
    assert all(r["arm"] == "alone" and r["reason"] for r in refused)  # 4 labels cannot cover every class
    assert ("stain", "alone", 4) in {(r["shift"], r["arm"], r["k"]) for r in refused}
    section = doc.read_text().split("<!-- new-lab:start -->")[1]
    assert "| stain | " in section and "+16 new-lab labels" in section and "| blur | 16 | " in section
    run_script("new_lab.py", *args)  # resumes: every entry done, nothing measured twice
    assert len(json.loads(out.read_text())["rows"]) == len(result["rows"])
    earlier = {**result, "rows": [r for r in result["rows"] if r["arm"] != "added, first lab's slides"]}
    out.write_text(json.dumps(earlier))  # results of before the first lab's arm: only that is measured
    run_script("new_lab.py", *args)
    again = json.loads(out.read_text())["rows"]
    assert sorted(map(json.dumps, again)) != sorted(map(json.dumps, earlier["rows"]))
    assert len(again) == len(result["rows"]) and [r for r in again if r["arm"] == "added"] == \
        [r for r in result["rows"] if r["arm"] == "added"]
    only = tmp_path / "added_only.json"
    run_script("new_lab.py", *args[:-4], "--arms", "added", "--out", str(only), "--doc", str(doc))
    assert {r["arm"] for r in json.loads(only.read_text())["rows"]} == {"clean", "added", "added, first lab's slides"}


def test_weight_decay_rule_chooses_by_the_rules_and_reads_paired_differences():
    """The one-standard-error rules pick the strongest penalty within noise of the smallest loss;
    the verdict calls a rule better or worse only beyond twice the paired standard error."""
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import weight_decay_rule as experiment
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(0)
    base = rng.exponential(0.5, 400)
    losses = {0.01: base, 0.1: base + 0.005 + rng.normal(0, 0.02, 400), 1.0: base + 0.5}
    assert experiment.smallest_loss(losses) == 0.01
    # 0.005 is within the loss's own standard error (about 0.025), not within the paired one (0.001)
    assert experiment.one_se(losses, paired=False) == 0.1 and experiment.one_se(losses, paired=True) == 0.01
    noise = {0.01: base, 0.1: base + rng.normal(0, 0.02, 400), 1.0: base + 0.5}
    assert experiment.one_se(noise, paired=True) == 0.1

    def setting(**ece):
        return {rule: {"ece": e, "new_lab": {"ece": e}, "first_lab": {"ece": e}} for rule, e in ece.items()}
    own = [setting(**{"min": 0.05, "1se": 0.08 + 0.002 * i, "1se-paired": 0.05 + 0.01 * (-1) ** i}) for i in range(10)]
    added = [{"shift": "medmnistc-defocus_blur", **setting(min=0.1, base=0.05 + 0.002 * i, stronger=0.1, fine=0.1)}
             for i in range(10)]
    said = experiment.verdict({"own_labels": own, "added_labels": added})
    assert "own labels, 1se: ECE +0.039" in said and "(worse)" in said
    assert "own labels, 1se-paired: ECE +0.000 ± 0.003 against min (level)" in said
    assert "base: ECE -0.041" in said and "A rule calibrates better than `min` here" in said
    assert "No rule calibrates better" in experiment.verdict({"own_labels": own, "added_labels": [
        {**x, "base": x["min"]} for x in added]})

"""Reproduce the BloodMNIST results end to end: pretrain, embed, evaluate, baselines, report.

For each method and pretraining seed: pretrain with the preset, embed train/val/test, linear
probe (weight decay chosen on val, test scored once), weighted kNN (k=20, T=0.07), k-means
cluster metrics of test, and few-shot heads (the head chosen on val per setting). Baselines (raw
pixels, the untrained backbone) get the same; the supervised reference trains the backbone
end-to-end (MedMNIST v2 protocol). Writes experiments/results/bloodmnist.json and
docs/results.md (tables generated from it and from the other results files, with the anchors
of the published and measured reference numbers beside them).

    python experiments/reproduce.py --data-root ../shared/data                 # preset for the device
    python experiments/reproduce.py --preset quick --seeds 0 --methods simclr  # one CPU run
    python experiments/reproduce.py --smoke --out /tmp/r.json --docs /tmp/r.md # the test's path
    python experiments/reproduce.py --docs-only          # docs/results.md from the results file
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ssl_blood.training.config import default_preset, preset_config
from ssl_blood.data import load_split, resolve_source
from ssl_blood.device import describe_device, resolve_device
from ssl_blood.features.embeddings import Embedder, embed_checkpoint, embed_splits
from ssl_blood.evaluation.frozen import few_shot_embeddings, knn_embeddings, probe_embeddings
from ssl_blood.files import write_json, write_text
from ssl_blood.evaluation.supervised import SupervisedConfig, train_supervised
from ssl_blood.training.loop import pretrain

REPO = Path(__file__).resolve().parents[1]
# Published and measured reference numbers (BloodMNIST-28, test split), shown beside ours.
ANCHORS = [
    ("raw pixels (ANCHORS.md, measured)", 0.825, 0.726, None),
    ("DINO ViT-B/16 ImageNet weights, frozen (Doerrich et al. 2024)", 0.888, 0.852, None),
    ("SimCLR ResNet-18, up to 2000 epochs (thesis)", 0.911, None, "77.1 % with 100 labels"),
    ("SimCLR ResNet-18, 224 epochs, 180 s on an H100 (ANCHORS.md)", 0.909, 0.876, None),
    ("same, weak colour jitter + 90-degree rotations, 88 epochs", 0.921, 0.888, None),
    ("supervised ResNet-18 (28), MedMNIST v2, end-to-end", 0.958, None, None),
    ("Google AutoML Vision, MedMNIST v2, end-to-end", 0.966, None, None),
]
TARGETS = {"linear_probe_test_acc": 0.960, "knn_test_acc": 0.950,
           "few_shot_1pct": 0.90, "few_shot_10_per_class": 0.85}


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def evaluate(emb, few_shot_kwargs: dict) -> dict[str, Any]:
    probe = probe_embeddings(emb)
    knn = knn_embeddings(emb, cluster_seed=None)  # the probe holds the cluster metrics
    shots = few_shot_embeddings(emb, **few_shot_kwargs)["results"]
    clusters = probe["test_clusters"]
    return {"linear_probe_val_acc": probe["val_acc"], "linear_probe_test_acc": probe["test_acc"],
            "linear_probe_test_auc": probe["test_auc"], "linear_probe_weight_decay": probe["weight_decay"],
            "linear_probe_weight_decay_grid": probe["weight_decay_grid"],
            "balanced_acc": probe["balanced_acc"], "macro_f1": probe["macro_f1"],
            "knn_test_acc": knn["acc"], "knn_test_auc": knn["auc"], "few_shot": shots,
            "kmeans_nmi": clusters["nmi"], "kmeans_ari": clusters["ari"], "kmeans_purity": clusters["purity"],
            "per_class_f1": {n: m["f1"] for n, m in probe["per_class"].items()}}


def few_shot_row(few: list[dict], setting: str) -> dict | None:
    """The row of a setting: its head was chosen on val (never on test)."""
    return next((r for r in few if r["setting"] == setting), None)


def summarise(runs: list[dict]) -> dict[str, Any]:
    """Mean and sample std over seeds of the headline numbers."""
    def stat(values):
        values = [v for v in values if v is not None]
        return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                "n": len(values)} if values else None

    keys = ("linear_probe_test_acc", "linear_probe_test_auc", "knn_test_acc", "pretrain_seconds",
            "kmeans_nmi", "kmeans_ari", "kmeans_purity")
    out = {key: stat([r.get(key) for r in runs]) for key in keys}
    for setting, key in (("0.01 of train", "few_shot_1pct"), ("10-shot", "few_shot_10_per_class")):
        out[key] = stat([(few_shot_row(r["few_shot"], setting) or {}).get("mean_acc") for r in runs])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="simclr,dino")
    parser.add_argument("--preset", choices=["quick", "standard", "full"],
                        help="default: full on a GPU, else quick")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--supervised-epochs", type=int, default=100, help="0 skips the reference")
    parser.add_argument("--runs", default="runs/reproduce")
    parser.add_argument("--reuse-runs", action="store_true",
                        help="continue each run folder that already holds a checkpoint of the same "
                             "config (finished runs are only evaluated) instead of pretraining anew")
    parser.add_argument("--smoke", action="store_true", help="tiny subset, 1 epoch: checks the path")
    parser.add_argument("--docs-only", action="store_true",
                        help="only regenerate --docs from the results file --out (e.g. after new ablations)")
    parser.add_argument("--out", default=str(REPO / "experiments/results/bloodmnist.json"))
    parser.add_argument("--docs", default=str(REPO / "docs/results.md"))
    args = parser.parse_args()
    if args.docs_only:
        write_text(args.docs, results_markdown(json.loads(Path(args.out).read_text()), load_ablations()))
        print(f"wrote {args.docs} from {args.out}", file=sys.stderr)
        return 0

    device = resolve_device("auto")
    preset = args.preset or default_preset(device.type)
    source = resolve_source(args.data_root)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    limit = 240 if args.smoke else None
    few_kwargs = {"shots": (1, 5, 10, 20), "fractions": (0.01, 0.1),
                  "episodes": 2 if args.smoke else args.episodes}
    if args.smoke:
        few_kwargs.update(shots=(1, 5), fractions=(0.1,))
    started = time.perf_counter()
    result: dict[str, Any] = {
        "device": describe_device(device), "commit": git_commit(), "preset": preset,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.smoke, "limit": limit, "seeds": seeds, "methods": {}, "baselines": {},
        "targets": TARGETS}
    for method in methods:
        cfg = replace(preset_config(preset, method), data=source.to_dict(), limit=limit)
        if args.smoke:
            small = (dict(projection_hidden_dim=64, projection_dim=32) if method == "simclr" else
                     dict(output_dim=256, hidden_dim=64, bottleneck_dim=32))
            cfg = replace(cfg, backbone="cnn6", epochs=1, warmup_epochs=0, batch_size=64, knn_every=-1,
                          method_config=replace(cfg.method_config, **small))
        runs = []
        for seed in seeds:
            run_dir = Path(args.runs) / f"{method}-{preset}-seed{seed}"
            reuse = args.reuse_runs and (run_dir / "checkpoint.pt").is_file()
            trained = pretrain(replace(cfg, seed=seed), run_dir, resume=reuse, overwrite=not reuse,
                               progress=False)
            # Training time = sum of the epoch times in metrics.jsonl (excludes the kNN monitor),
            # so a reused run reports the time it took when it was trained.
            seconds = sum(record["seconds"] for record in trained.history)
            emb = embed_checkpoint(run_dir / "checkpoint.pt", source, limit=limit)
            row = {"seed": seed, "pretrain_seconds": seconds, "run_dir": str(run_dir), "reused": reuse,
                   **evaluate(emb, few_kwargs)}
            runs.append(row)
            print(json.dumps({"method": method, **{k: v for k, v in row.items() if k != "few_shot"}}),
                  file=sys.stderr, flush=True)
        result["methods"][method] = {"config": cfg.to_dict(), "runs": runs, "summary": summarise(runs)}
    backbone = preset_config(preset).backbone
    train = load_split(source, "train", limit)
    for kind in ("pixels", "random-init"):
        emb = embed_splits(Embedder.baseline(kind, train, backbone), source, ["train", "val", "test"], limit)
        result["baselines"][kind] = {"backbone": backbone if kind == "random-init" else None,
                                     **evaluate(emb, few_kwargs)}
        print(json.dumps({"baseline": kind, "test_acc": result["baselines"][kind]["linear_probe_test_acc"]}),
              file=sys.stderr, flush=True)
    epochs = 1 if args.smoke else args.supervised_epochs
    previous = _reusable_supervised(Path(args.out), backbone, epochs, limit) if args.reuse_runs else None
    if previous:
        result["supervised"] = {**previous, "reused": True}
    elif epochs > 0:
        sup = train_supervised(SupervisedConfig(backbone=backbone, epochs=epochs, data=source.to_dict(),
                                                limit=limit), progress=False)
        result["supervised"] = {k: v for k, v in sup.items()
                                if k not in ("history", "per_class", "confusion_matrix", "labelled_ids")}
    result["seconds"] = time.perf_counter() - started
    out = write_json(result, args.out)
    write_text(args.docs, results_markdown(result, load_ablations()))
    print(f"wrote {out} and {args.docs}", file=sys.stderr)
    return 0


def _reusable_supervised(path: Path, backbone: str, epochs: int, limit: int | None) -> dict | None:
    """With --reuse-runs, the supervised reference of the results file being replaced, when it
    was trained with the same backbone, epochs and limit (it does not depend on pretraining)."""
    if epochs < 1 or not path.is_file():
        return None
    old = json.loads(path.read_text())
    sup = old.get("supervised")
    if sup and old.get("limit") == limit and (sup["backbone"], sup["epochs"]) == (backbone, epochs):
        return sup
    return None


# ----------------------------------------------------------------------------- docs/results.md


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _mean_std(s: dict | None) -> str:
    if not s:
        return "–"
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f} %" if s["std"] is not None else _pct(s["mean"])


ABLATION_FILES = {  # title: (file, note)
    "quick preset search (CPU, pretraining configs scored on val only)": (
        REPO / "experiments/results/quick_preset_search.json",
        "Written by experiments/ablate.py --preset quick. Some of these runs shared the two cores "
        "with other work, so their seconds are upper bounds; the chosen preset is timed alone in "
        "the table at the top."),
    "standard preset search (CPU, 15-minute candidates scored on val only)": (
        REPO / "experiments/results/standard_preset_search.json",
        "Written by experiments/standard_preset.py: candidates trained for the same number of "
        "epochs (about 15 minutes each), the best val linear probe chosen; test never looked at."),
    "GPU ablations": (REPO / "experiments/results/ablations.json", ""),
}
OTHER_RESULTS = {
    "own_cells": REPO / "experiments/results/bloodmnist_folder64.json",
    "standard": REPO / "experiments/results/standard_preset.json",
}


def load_ablations() -> dict[str, tuple[list[dict], str]]:
    return {title: (json.loads(path.read_text()), note)
            for title, (path, note) in ABLATION_FILES.items() if path.exists()}


def ablation_markdown(title: str, rows: list[dict], note: str = "") -> list[str]:
    lines = ["", f"## Ablations: {title}", ""] + ([note, ""] if note else []) + [
             "| run | method, backbone, epochs, crop scale | overrides | device | pretraining | "
             "kNN val ACC | linear probe val ACC |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        overrides = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in r.get("overrides", {}).items()) or "none"
        cfg = r.get("config") or {}
        setting = (f"{cfg['method']}, {cfg['backbone']}, {cfg['epochs']}, "
                   f"{'-'.join(map(str, cfg['augment']['crop_scale']))}") if cfg else "–"
        lines.append(f"| {r['name']} | {setting} | {overrides} | {r['device']} | {r['pretrain_seconds']:.0f} s | "
                     f"{_pct(r.get('knn_val_acc'))} | {_pct(r.get('probe_val_acc'))} |")
    return lines


def _num(s: dict | None) -> str:
    if not s:
        return "–"
    return f"{s['mean']:.3f} ± {s['std']:.3f}" if s["std"] is not None else f"{s['mean']:.3f}"


def _few_shot_heads(rows_by_run: list[list[dict]]) -> dict[str, dict[str, dict]]:
    """setting -> head -> mean val / test accuracy over runs, and how often it was chosen."""
    table: dict[str, dict[str, dict]] = {}
    for rows in rows_by_run:
        for row in rows:
            for head, h in row["heads"].items():
                cell = table.setdefault(row["setting"], {}).setdefault(
                    head, {"val": [], "test": [], "chosen": 0, "labels": row["labels"]})
                cell["val"].append(h["val_acc"])
                cell["test"].append(h["test_acc"])
                cell["chosen"] += head == row["head"]
    return table


def few_shot_markdown(name: str, rows_by_run: list[list[dict]]) -> list[str]:
    lines = ["", f"### Few-shot heads: {name}", "",
             "Each setting's head is chosen on val (mean val accuracy over episodes); the test "
             "column of the other heads is shown for comparison only, it chose nothing.", "",
             "| setting | labels | head | val ACC | test ACC | chosen (runs) |", "|---|---|---|---|---|---|"]
    for setting, heads in _few_shot_heads(rows_by_run).items():
        for head, c in heads.items():
            lines.append(f"| {setting} | {c['labels']} | {head} | {_pct(float(np.mean(c['val'])))} | "
                         f"{_pct(float(np.mean(c['test'])))} | {c['chosen']} of {len(c['val'])} |")
    return lines


def results_markdown(r: dict[str, Any], ablations: dict[str, tuple[list[dict], str]] | None = None) -> str:
    """docs/results.md from the results files: our numbers, the anchors, the targets, ablations."""
    lines = ["# Results on BloodMNIST (28 x 28, test split)", "",
             "<!-- generated by experiments/reproduce.py from experiments/results/*.json; "
             "do not edit by hand -->", "",
             f"Device: **{r['device']}** · preset `{r['preset']}` · commit `{r['commit'][:12]}` · "
             f"{r['date']} · seeds {', '.join(map(str, r['seeds']))}"
             + (" · **smoke run on a tiny subset: not a result**" if r.get("smoke") else ""), "",
             "Frozen backbone; linear probe = logistic regression, weight decay chosen on val, test "
             "scored once; kNN = weighted cosine kNN (k=20, T=0.07) with train as the gallery; "
             "k-means = spherical k-means with k = 8 on the test features, NMI against the classes; "
             "few-shot = the head (prototype / kNN / logistic) with the best val accuracy, its test "
             "accuracy as the mean over episodes; mean ± std over pretraining seeds.", "",
             "| features | linear probe ACC | linear probe AUC | kNN ACC | k-means NMI | 1 % labels | 10 per class | pretraining (training time) |",
             "|---|---|---|---|---|---|---|---|"]
    for method, m in r["methods"].items():
        s = m["summary"]
        secs = s["pretrain_seconds"]["mean"] if s.get("pretrain_seconds") else None
        lines.append(f"| {method} ({m['config']['backbone']}, {m['config']['epochs']} epochs) | "
                     f"{_mean_std(s['linear_probe_test_acc'])} | {_mean_std(s['linear_probe_test_auc'])} | "
                     f"{_mean_std(s['knn_test_acc'])} | {_num(s.get('kmeans_nmi'))} | "
                     f"{_mean_std(s['few_shot_1pct'])} | {_mean_std(s['few_shot_10_per_class'])} | "
                     f"{'–' if secs is None else f'{secs:.0f} s'} |")
    for kind, b in r["baselines"].items():
        one, ten = few_shot_row(b["few_shot"], "0.01 of train"), few_shot_row(b["few_shot"], "10-shot")
        name = "raw pixels" if kind == "pixels" else f"random-init {b['backbone']}"
        lines.append(f"| baseline: {name} | {_pct(b['linear_probe_test_acc'])} | "
                     f"{_pct(b['linear_probe_test_auc'])} | {_pct(b['knn_test_acc'])} | "
                     f"{b['kmeans_nmi']:.3f} | {_pct(one and one['mean_acc'])} | "
                     f"{_pct(ten and ten['mean_acc'])} | – |")
    if "supervised" in r:
        s = r["supervised"]
        lines.append(f"| supervised {s['backbone']} end-to-end ({s['epochs']} epochs) | "
                     f"{_pct(s['test_acc'])} | {_pct(s['test_auc'])} | – | – | – | – | {s['seconds']:.0f} s |")
    lines += ["", "k-means cluster metrics in full (test split, mean ± std over seeds):", "",
              "| features | NMI | ARI | purity |", "|---|---|---|---|"]
    for method, m in r["methods"].items():
        s = m["summary"]
        lines.append(f"| {method} | {_num(s.get('kmeans_nmi'))} | {_num(s.get('kmeans_ari'))} | "
                     f"{_num(s.get('kmeans_purity'))} |")
    for kind, b in r["baselines"].items():
        lines.append(f"| baseline: {kind} | {b['kmeans_nmi']:.3f} | {b['kmeans_ari']:.3f} | "
                     f"{b['kmeans_purity']:.3f} |")
    grid = next(iter(r["methods"].values()))["runs"][0].get("linear_probe_weight_decay_grid") or []
    chosen = [(f"{method} seed {run['seed']}", run["linear_probe_weight_decay"])
              for method, m in r["methods"].items() for run in m["runs"]]
    chosen += [(f"baseline {kind}", b["linear_probe_weight_decay"]) for kind, b in r["baselines"].items()]
    at_edge = [name for name, wd in chosen if grid and wd in (min(grid), max(grid))]
    lines += ["", f"Weight decay of the linear probe, chosen on val from the grid {grid}: "
              + "; ".join(f"{name} {wd:g}" for name, wd in chosen) + ". "
              + ("Every choice lies inside the grid." if not at_edge else
                 f"At the edge of the grid: {', '.join(at_edge)} (values beyond it were not tried).")]
    lines += _own_cells_markdown() + _standard_markdown()
    for method, m in r["methods"].items():
        lines += few_shot_markdown(method, [run["few_shot"] for run in m["runs"]])
    for kind, b in r["baselines"].items():
        lines += few_shot_markdown(f"baseline {kind}", [b["few_shot"]])
    lines += ["", "## Anchors (the project's reference numbers, not measured here)", "",
              "| reference | linear probe | kNN | few labels |", "|---|---|---|---|"]
    for name, lp, knn, few in ANCHORS:
        lines.append(f"| {name} | {_pct(lp)} | {_pct(knn)} | {few or '–'} |")
    lines += ["", "## Targets (mean of 3 pretraining seeds)", ""]
    for method, m in r["methods"].items():
        s = m["summary"]
        checks = []
        for key, target in TARGETS.items():
            got = s.get(key)
            verdict = "not measured" if not got else ("reached" if got["mean"] >= target else "not reached")
            checks.append(f"{key} >= {_pct(target)}: {verdict}"
                          + ("" if not got else f" ({_pct(got['mean'])})"))
        lines.append(f"- **{method}**: " + "; ".join(checks))
    for title, (rows, note) in (ablations or {}).items():
        lines += ablation_markdown(title, rows, note)
    lines.append("")
    return "\n".join(lines)


def _own_cells_markdown() -> list[str]:
    path = OTHER_RESULTS["own_cells"]
    if not path.exists():
        return []
    o = json.loads(path.read_text())
    return ["", "## BloodMNIST as a folder of your own cells (64 px)", "",
            f"The same images written as PNG files in class folders (`DIR/{{train,val,test}}/<class>/`), "
            f"upsampled to 64 px, loaded with `--image-dir` and pretrained with the quick preset "
            f"(stem {o['stem']} chosen for {o['size']} px) on **{o['device']}**; "
            f"{o['pretrain_seconds']:.0f} s of training{' (' + o['note'] + ')' if o.get('note') else ''}. "
            f"Written by experiments/own_cells.py.", "",
            "| data | linear probe ACC | kNN ACC | k-means NMI |", "|---|---|---|---|",
            f"| BloodMNIST npz, 28 px (table above, seed 0) | {_pct(o.get('npz28_probe_test_acc'))} | "
            f"{_pct(o.get('npz28_knn_test_acc'))} | – |",
            f"| BloodMNIST as a 64-px labelled folder | {_pct(o['probe_test_acc'])} | "
            f"{_pct(o['knn_test_acc'])} | {o['kmeans_nmi']:.3f} |"]


def _standard_markdown() -> list[str]:
    path = OTHER_RESULTS["standard"]
    if not path.exists():
        return []
    st = json.loads(path.read_text())
    lines = ["", "## The standard preset (an hour on a 2-core CPU) and accuracy against pretraining time", "",
             f"Chosen on val by experiments/standard_preset.py (search below); one seed measured in "
             f"full on **{st['device']}**. Targets: linear probe >= 92.0 %, kNN >= 89 %.", "",
             "| budget | run | epochs | training time | linear probe val / test ACC | kNN val / test ACC |",
             "|---|---|---|---|---|---|"]
    for p in st["curve"]:
        lines.append(f"| {p['budget']} | {p['name']} | {p['epochs']} | {p['pretrain_seconds'] / 60:.1f} min | "
                     f"{_pct(p['probe_val_acc'])} / {_pct(p.get('probe_test_acc'))} | "
                     f"{_pct(p['knn_val_acc'])} / {_pct(p.get('knn_test_acc'))} |")
    lines += ["", f"Each budget's epochs are sized from the quick run's mean epoch time ({st['epoch_seconds']:.0f} s); "
              f"the training time column is what each run measured (the CPU's epoch time varies by a few %).",
              "", st.get("verdict", ""), "", "![probe accuracy against pretraining minutes](figures/standard_curve.png)"]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())

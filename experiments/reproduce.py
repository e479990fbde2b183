"""Reproduce the BloodMNIST results end to end: pretrain, embed, evaluate, baselines, report.

For each method and pretraining seed: pretrain with the preset, embed train/val/test, linear
probe (weight decay chosen on val, test scored once), weighted kNN (k=20, T=0.07) and few-shot
heads. Baselines (raw pixels, the untrained backbone) get the same heads; the supervised
reference trains the backbone end-to-end (MedMNIST v2 protocol). Writes
experiments/results/bloodmnist.json and docs/results.md (a table generated from it, with the
anchors of ../shared/ANCHORS.md beside it).

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

from ssl_blood.checkpoint import write_json
from ssl_blood.config import preset_config
from ssl_blood.data import load_split, resolve_source
from ssl_blood.device import describe_device, resolve_device
from ssl_blood.embed import Embedder, embed_splits
from ssl_blood.evaluate import few_shot_embeddings, knn_embeddings, probe_embeddings
from ssl_blood.supervised import SupervisedConfig, train_supervised
from ssl_blood.train import pretrain

REPO = Path(__file__).resolve().parents[1]
# Reference numbers from ../shared/ANCHORS.md (BloodMNIST-28, test split), shown beside ours.
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
    knn = knn_embeddings(emb)
    shots = few_shot_embeddings(emb, **few_shot_kwargs)
    return {"linear_probe_val_acc": probe["val_acc"], "linear_probe_test_acc": probe["test_acc"],
            "linear_probe_test_auc": probe["test_auc"], "linear_probe_weight_decay": probe["weight_decay"],
            "balanced_acc": probe["balanced_acc"], "macro_f1": probe["macro_f1"],
            "knn_test_acc": knn["acc"], "knn_test_auc": knn["auc"], "few_shot": shots,
            "per_class_f1": {n: m["f1"] for n, m in probe["per_class"].items()}}


def best_few_shot(few: list[dict], setting: str) -> dict | None:
    rows = [r for r in few if r["setting"] == setting]
    return max(rows, key=lambda r: r["mean_acc"]) if rows else None


def summarise(runs: list[dict]) -> dict[str, Any]:
    """Mean and sample std over seeds of the headline numbers."""
    def stat(values):
        values = [v for v in values if v is not None]
        return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                "n": len(values)} if values else None

    out = {key: stat([r[key] for r in runs]) for key in
           ("linear_probe_test_acc", "linear_probe_test_auc", "knn_test_acc", "pretrain_seconds")}
    for setting, key in (("0.01 of train", "few_shot_1pct"), ("10-shot", "few_shot_10_per_class")):
        out[key] = stat([(best_few_shot(r["few_shot"], setting) or {}).get("mean_acc") for r in runs])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="simclr,dino")
    parser.add_argument("--preset", choices=["quick", "full"], help="default: full on a GPU, else quick")
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
        Path(args.docs).write_text(results_markdown(json.loads(Path(args.out).read_text()), load_ablations()))
        print(f"wrote {args.docs} from {args.out}", file=sys.stderr)
        return 0

    device = resolve_device("auto")
    preset = args.preset or ("full" if device.type == "cuda" else "quick")
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
            cfg = replace(cfg, backbone="cnn6", epochs=1, warmup_epochs=0, batch_size=64, knn_every=-1,
                          simclr=replace(cfg.simclr, projection_hidden_dim=64, projection_dim=32),
                          dino=replace(cfg.dino, output_dim=256, hidden_dim=64, bottleneck_dim=32))
        runs = []
        for seed in seeds:
            run_dir = Path(args.runs) / f"{method}-{preset}-seed{seed}"
            reuse = args.reuse_runs and (run_dir / "checkpoint.pt").is_file()
            trained = pretrain(replace(cfg, seed=seed), run_dir, resume=reuse, overwrite=not reuse,
                               progress=False)
            # Training time = sum of the epoch times in metrics.jsonl (excludes the kNN monitor),
            # so a reused run reports the time it took when it was trained.
            seconds = sum(record["seconds"] for record in trained.history)
            emb = embed_splits(Embedder.from_checkpoint(run_dir / "checkpoint.pt"), source,
                               ["train", "val", "test"], limit)
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
    if epochs > 0:
        sup = train_supervised(SupervisedConfig(backbone=backbone, epochs=epochs, data=source.to_dict(),
                                                limit=limit), progress=False)
        result["supervised"] = {k: v for k, v in sup.items() if k not in ("history", "per_class",
                                                                         "confusion_matrix")}
    result["seconds"] = time.perf_counter() - started
    out = write_json(result, args.out)
    Path(args.docs).parent.mkdir(parents=True, exist_ok=True)
    Path(args.docs).write_text(results_markdown(result, load_ablations()))
    print(f"wrote {out} and {args.docs}", file=sys.stderr)
    return 0


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
    "GPU ablations": (REPO / "experiments/results/ablations.json", ""),
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


def results_markdown(r: dict[str, Any], ablations: dict[str, tuple[list[dict], str]] | None = None) -> str:
    """docs/results.md from a results file: our numbers, the anchors, the targets, ablations."""
    lines = ["# Results on BloodMNIST (28 x 28, test split)", "",
             "<!-- generated by experiments/reproduce.py from experiments/results/bloodmnist.json; "
             "do not edit by hand -->", "",
             f"Device: **{r['device']}** · preset `{r['preset']}` · commit `{r['commit'][:12]}` · "
             f"{r['date']} · seeds {', '.join(map(str, r['seeds']))}"
             + (" · **smoke run on a tiny subset: not a result**" if r.get("smoke") else ""), "",
             "Frozen backbone; linear probe = logistic regression, weight decay chosen on val, test "
             "scored once; kNN = weighted cosine kNN (k=20, T=0.07) with train as the gallery; "
             "few-shot = best of the prototype / kNN / logistic heads, mean over episodes; mean ± "
             "std over pretraining seeds.", "",
             "| features | linear probe ACC | linear probe AUC | kNN ACC | 1 % labels | 10 per class | pretraining (training time) |",
             "|---|---|---|---|---|---|---|"]
    for method, m in r["methods"].items():
        s = m["summary"]
        secs = s["pretrain_seconds"]["mean"] if s.get("pretrain_seconds") else None
        lines.append(f"| {method} ({m['config']['backbone']}, {m['config']['epochs']} epochs) | "
                     f"{_mean_std(s['linear_probe_test_acc'])} | {_mean_std(s['linear_probe_test_auc'])} | "
                     f"{_mean_std(s['knn_test_acc'])} | {_mean_std(s['few_shot_1pct'])} | "
                     f"{_mean_std(s['few_shot_10_per_class'])} | "
                     f"{'–' if secs is None else f'{secs:.0f} s'} |")
    for kind, b in r["baselines"].items():
        one = best_few_shot(b["few_shot"], "0.01 of train")
        ten = best_few_shot(b["few_shot"], "10-shot")
        name = "raw pixels" if kind == "pixels" else f"random-init {b['backbone']}"
        lines.append(f"| baseline: {name} | {_pct(b['linear_probe_test_acc'])} | "
                     f"{_pct(b['linear_probe_test_auc'])} | {_pct(b['knn_test_acc'])} | "
                     f"{_pct(one and one['mean_acc'])} | {_pct(ten and ten['mean_acc'])} | – |")
    if "supervised" in r:
        s = r["supervised"]
        lines.append(f"| supervised {s['backbone']} end-to-end ({s['epochs']} epochs) | "
                     f"{_pct(s['test_acc'])} | {_pct(s['test_auc'])} | – | – | – | {s['seconds']:.0f} s |")
    lines += ["", "## Anchors (from ../shared/ANCHORS.md, not measured here)", "",
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


if __name__ == "__main__":
    raise SystemExit(main())

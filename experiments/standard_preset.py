"""How the `standard` preset (about an hour of pretraining on a 2-core CPU) was chosen, and what
a user gets for 8 (quick), 15, 30 and 60 minutes of pretraining.

1. Candidates, each trained for the epochs that fit about 15 minutes on this CPU, scored on val
   only (kNN and linear probe): the quick recipe, a lower NT-Xent temperature, a larger batch.
2. The best candidate (val linear probe) trained for 30 and for 60 minutes: the 60-minute run is
   the `standard` preset. Each budget's run is scored once on test (one number per budget), with
   the quick preset's seed-0 run from experiments/reproduce.py as the first point.
Resumable: runs are continued or reused.

    python experiments/standard_preset.py --data-root ../shared/data

Writes experiments/results/standard_preset_search.json (val only), experiments/results/
standard_preset.json (the curve) and docs/figures/standard_curve.png.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from ssl_blood.training.config import apply_settings, parse_settings, preset_config
from ssl_blood.data import resolve_source
from ssl_blood.device import describe_device
from ssl_blood.features.embeddings import embed_checkpoint
from ssl_blood.evaluation.frozen import knn_embeddings, probe_embeddings
from ssl_blood.files import write_json
from ssl_blood.training.loop import pretrain

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = {"base": "", "temp0.1": "simclr.temperature=0.1", "batch512": "batch_size=512"}


def epoch_seconds(quick_run: Path) -> float:
    """Mean seconds of a quick-preset epoch on this CPU (from the reproduce run's record)."""
    history = [json.loads(l) for l in (quick_run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return sum(r["seconds"] for r in history) / len(history)


def train(name: str, settings: str, epochs: int, data: dict, runs: Path,
          limit: int | None = None) -> tuple[dict, Path]:
    cfg = apply_settings(replace(preset_config("quick", "simclr"), data=data),
                         parse_settings([s for s in settings.split(";") if s]))
    cfg = replace(cfg, epochs=epochs, warmup_epochs=max(1, round(epochs / 20)), knn_every=0, limit=limit)
    run = runs / name
    reuse = (run / "checkpoint.pt").is_file()
    result = pretrain(cfg, run, resume=reuse, overwrite=not reuse, progress=False)
    return {"name": name, "settings": settings, "epochs": epochs, "config": cfg.to_dict(),
            "pretrain_seconds": sum(r["seconds"] for r in result.history)}, run


def score(run: Path, with_test: bool, limit: int | None = None) -> dict:
    emb = embed_checkpoint(run / "checkpoint.pt", splits=["train", "val", "test"] if with_test else ["train", "val"],
                           limit=limit)
    if not with_test:  # val only: the val split plays the test split's part in the helpers
        from ssl_blood.evaluation.frozen import linear_probe
        from ssl_blood.features.neighbours import knn_accuracy

        (tx, ty, _), (vx, vy, _) = emb.select("train"), emb.select("val")
        return {"probe_val_acc": linear_probe(tx, ty, vx, vy, None, None, emb.class_names)["val_acc"],
                "knn_val_acc": knn_accuracy(tx, ty, vx, vy, len(emb.class_names))}
    probe, knn = probe_embeddings(emb), knn_embeddings(emb, cluster_seed=None)
    val_knn = knn_embeddings(emb, query_split="val", cluster_seed=None)
    return {"probe_val_acc": probe["val_acc"], "probe_test_acc": probe["test_acc"],
            "knn_val_acc": val_knn["acc"], "knn_test_acc": knn["acc"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--quick-run", default="runs/reproduce/simclr-quick-seed0")
    parser.add_argument("--runs", default="runs/standard")
    parser.add_argument("--budgets", default="15,30,60", help="minutes")
    parser.add_argument("--epochs-override", help="budget=epochs,... (for a smoke run)")
    parser.add_argument("--limit", type=int, help="stratified subset per split (for a smoke run)")
    parser.add_argument("--search", default=str(REPO / "experiments/results/standard_preset_search.json"))
    parser.add_argument("--out", default=str(REPO / "experiments/results/standard_preset.json"))
    parser.add_argument("--figure", default=str(REPO / "docs/figures/standard_curve.png"))
    args = parser.parse_args()

    data = resolve_source(args.data_root).to_dict()
    per_epoch = epoch_seconds(Path(args.quick_run))
    budgets = [int(b) for b in args.budgets.split(",")]
    epochs = {b: max(1, int(b * 60 / per_epoch)) for b in budgets}
    if args.epochs_override:
        epochs.update({int(k): int(v) for k, v in (p.split("=") for p in args.epochs_override.split(","))})
    device = describe_device("auto")
    runs = Path(args.runs)
    search = []
    for name, settings in CANDIDATES.items():
        row, run = train(f"{name}-{budgets[0]}min", settings, epochs[budgets[0]], data, runs, args.limit)
        search.append({**row, "device": device, "overrides": parse_settings([s for s in settings.split(";") if s]),
                       **score(run, with_test=False, limit=args.limit)})
        write_json(search, args.search)
    best = max(search, key=lambda r: (r["probe_val_acc"], r["knn_val_acc"]))
    chosen = next(n for n in CANDIDATES if best["name"].startswith(n + "-"))
    curve = [{"budget": "quick (8 epochs)", "name": Path(args.quick_run).name, "epochs": 8,
              "pretrain_seconds": per_epoch * 8, **score(Path(args.quick_run), with_test=True, limit=args.limit)}]
    for budget in budgets:
        name = f"{chosen}-{budget}min"
        row, run = train(name, CANDIDATES[chosen], epochs[budget], data, runs, args.limit)
        curve.append({"budget": f"{budget} min", **row, **score(run, with_test=True, limit=args.limit)})
        write_json({"device": device, "chosen": chosen, "epoch_seconds": per_epoch, "curve": curve}, args.out)
    final = curve[-1]
    reached = final["probe_test_acc"] >= 0.92 and final["knn_test_acc"] >= 0.89
    verdict = (f"The {budgets[-1]}-minute run of `{chosen}` ({final['epochs']} epochs) reaches linear probe "
               f"{100 * final['probe_test_acc']:.1f} % and kNN {100 * final['knn_test_acc']:.1f} % on test: the "
               f"targets (92.0 %, 89 %) are {'reached' if reached else 'not both reached'}.")
    write_json({"device": device, "chosen": chosen, "epoch_seconds": per_epoch, "curve": curve,
                "verdict": verdict}, args.out)
    from ssl_blood.analysis.plots import curves_png

    minutes = [p["pretrain_seconds"] / 60 for p in curve]
    curves_png([{"label": "linear probe, test", "x": minutes, "y": [p["probe_test_acc"] for p in curve]},
                {"label": "linear probe, val", "x": minutes, "y": [p["probe_val_acc"] for p in curve], "style": "s--"},
                {"label": "kNN, test", "x": minutes, "y": [p["knn_test_acc"] for p in curve], "style": "^-"}],
               args.figure, "pretraining minutes (2-core CPU)", "accuracy",
               "SimCLR cnn6-wide on BloodMNIST: accuracy against pretraining time")
    print(verdict)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

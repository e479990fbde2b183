"""How many cells must a lab label, and which? The label-efficiency curve on the quick preset's
SimCLR features (CPU).

For budgets of 8-400 labelled train cells and 1 %, 10 %, 100 % of train, 5 seeds each:
- linear probe (the few-shot logistic head, fixed in advance: L2-normalised features scaled to
  norm sqrt(D), weight decay 1e-3; no val set is used, as a lab with a handful of labels would
  have none) on cells
  chosen without labels by random / typiclust / kcenter (`ssl_blood.analysis.select`), and on raw pixels
  of randomly chosen cells;
- fine-tuning the pretrained backbone (`ssl-blood fine-tune`) at 1 %, 10 %, 100 %, class-balanced
  subsets; learning rate and backbone-lr ratio chosen on val for seed 0 and kept for the others
  (the CPU budget), the epoch chosen on val in every run;
- the same backbone trained from scratch on the same subsets (`ssl-blood supervised --fraction`,
  with the same augmentation and epochs).
Resumable: every number is written to the results file as soon as it exists and reused.

    python experiments/label_efficiency.py --checkpoint runs/reproduce/simclr-quick-seed0/checkpoint.pt

Writes experiments/results/label_efficiency.json, docs/label-efficiency.md and
docs/figures/label_efficiency.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ssl_blood.model.augment import AugmentConfig
from ssl_blood.data import load_split
from ssl_blood.device import describe_device
from ssl_blood.features.embeddings import Embedder, embed_checkpoint, embed_splits
from ssl_blood.evaluation.frozen import FEW_SHOT_LOGREG_WEIGHT_DECAY, FEW_SHOT_PREDICTORS
from ssl_blood.files import write_json, write_text
from ssl_blood.analysis.select import select_cells
from ssl_blood.evaluation.supervised import FineTuneConfig, SupervisedConfig, fine_tune, train_supervised

REPO = Path(__file__).resolve().parents[1]
BUDGETS = (8, 16, 40, 80, 160, 400)
FRACTIONS = (0.01, 0.1, 1.0)
STRATEGIES = ("random", "typiclust", "kcenter")
FINE_TUNE_AUGMENT = AugmentConfig(crop_scale=(0.35, 1.0))


class Results:
    """The results file as a cache: `get(key, compute)` computes each number once."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {**header, "entries": {}}
        if not path.exists():
            self.save()

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.data["entries"]:
            started = time.perf_counter()
            value = compute()
            self.data["entries"][key] = {"value": value, "seconds": time.perf_counter() - started}
            self.save()
            print(json.dumps({key: value if not isinstance(value, dict) else value.get("test_acc")}), flush=True)
        return self.data["entries"][key]["value"]

    def save(self) -> None:
        write_json(self.data, self.path)


def probe_accuracy(emb, rows: np.ndarray) -> float:
    """The fixed logistic head on the chosen train rows, scored on test."""
    tx, ty, _ = emb.select("train")
    sx, sy, _ = emb.select("test")
    predicted, = FEW_SHOT_PREDICTORS["logreg"](tx[rows], ty[rows], [sx], len(emb.class_names))
    return float((predicted == sy).mean())


def chosen_rows(emb, budget: int, strategy: str, seed: int) -> np.ndarray:
    _, _, ids = emb.select("train")
    picks = [p["id"] for p in select_cells(emb, budget, strategy, seed=seed)["picks"]]
    position = {int(i): r for r, i in enumerate(ids)}
    return np.array([position[i] for i in picks])


def run(args) -> dict:
    source_emb = embed_checkpoint(args.checkpoint)
    source = source_emb.source
    pixels = embed_splits(Embedder.baseline("pixels", load_split(source, "train")), source, ["train", "test"])
    n_train = int((source_emb.split == "train").sum())
    head = (f"logistic regression on L2-normalised features scaled to norm sqrt(D), weight decay "
            f"{FEW_SHOT_LOGREG_WEIGHT_DECAY} (fixed)")
    results = Results(Path(args.out), {"device": describe_device("auto"), "checkpoint": str(args.checkpoint),
                                       "identity": source_emb.identity, "seeds": args.seeds, "probe_head": head})
    if results.data.get("probe_head") != head:  # probe numbers of another head are not reused
        results.data["entries"] = {k: v for k, v in results.data["entries"].items() if not k.startswith("probe/")}
        results.data["probe_head"] = head
        results.save()
    started = time.perf_counter()
    for cells in list(BUDGETS) + [round(f * n_train) for f in FRACTIONS]:
        for seed in range(args.seeds):
            if cells >= n_train:
                every = np.arange(n_train)
                for strategy in STRATEGIES:
                    results.get(f"probe/{strategy}/{cells}/{seed}", lambda: probe_accuracy(source_emb, every))
                results.get(f"probe/pixels/{cells}/{seed}", lambda: probe_accuracy(pixels, every))
                continue
            for strategy in STRATEGIES:
                results.get(f"probe/{strategy}/{cells}/{seed}",
                            lambda: probe_accuracy(source_emb, chosen_rows(source_emb, cells, strategy, seed)))
            results.get(f"probe/pixels/{cells}/{seed}",
                        lambda: probe_accuracy(pixels, chosen_rows(pixels, cells, "random", seed)))
    train_seeds = args.seeds if args.train_seeds is None else args.train_seeds
    for fraction in [float(f) for f in args.train_fractions.split(",") if f]:
        epochs = args.epochs_full if fraction == 1.0 else args.epochs
        grid = dict(lrs=(1e-3,), backbone_lr_ratios=(0.1, 1.0)) if fraction == 1.0 else \
            dict(lrs=(3e-4, 1e-3), backbone_lr_ratios=(0.1, 1.0))
        first = results.get(f"finetune/{fraction}/0", lambda: _fine_tune(args.checkpoint, fraction, 0, epochs, grid))
        chosen = dict(lrs=(first["chosen"]["lr"],), backbone_lr_ratios=(first["chosen"]["backbone_lr_ratio"],))
        for seed in range(1, train_seeds):
            results.get(f"finetune/{fraction}/{seed}",
                        lambda: _fine_tune(args.checkpoint, fraction, seed, epochs, chosen))
        for seed in range(train_seeds):
            results.get(f"scratch/{fraction}/{seed}",
                        lambda: _scratch(source.to_dict(), source_emb.embedder.backbone, fraction, seed, epochs))
    results.data["seconds_this_invocation"] = time.perf_counter() - started
    results.data["seconds_total"] = sum(e["seconds"] for e in results.data["entries"].values())
    results.save()
    return results.data


def _fine_tune(checkpoint: str, fraction: float, seed: int, epochs: int, grid: dict) -> dict:
    cfg = FineTuneConfig(epochs=epochs, fraction=fraction if fraction < 1 else None, seed=seed,
                         augment_config=FINE_TUNE_AUGMENT, **grid)
    r = fine_tune(checkpoint, cfg, progress=False)
    return {k: r[k] for k in ("test_acc", "val_acc", "labels", "best_epoch", "chosen", "grid",
                              "initial_probe_test_acc", "seconds")}


def _scratch(data: dict, backbone: str, fraction: float, seed: int, epochs: int) -> dict:
    cfg = SupervisedConfig(backbone=backbone, epochs=epochs, augment=True, augment_config=FINE_TUNE_AUGMENT,
                           data=data, fraction=fraction if fraction < 1 else None, seed=seed)
    r = train_supervised(cfg, progress=False)
    return {k: r[k] for k in ("test_acc", "val_acc", "labels", "best_epoch", "seconds")}


# ----------------------------------------------------------------------------- summary, page


def summarise(data: dict) -> dict:
    entries = {k: v["value"] for k, v in data["entries"].items()}
    curves: dict[str, dict[int, list[float]]] = {}
    for key, value in entries.items():
        kind, *rest = key.split("/")
        if kind == "probe":
            strategy, cells, _ = rest
            curves.setdefault(f"probe/{strategy}", {}).setdefault(int(cells), []).append(value)
        else:
            fraction, _ = rest
            curves.setdefault(kind, {}).setdefault(value["labels"], []).append(value["test_acc"])
    return {name: {cells: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                           "n": len(v)} for cells, v in sorted(points.items())}
            for name, points in curves.items()}


def verdicts(summary: dict, total_seconds: float) -> list[str]:
    out = []
    random, typi = summary.get("probe/random", {}), summary.get("probe/typiclust", {})
    small = [b for b in BUDGETS[:3] if b in random and b in typi]
    gains = {b: 100 * (typi[b]["mean"] - random[b]["mean"]) for b in random if b in typi}
    if small:
        ok = all(gains[b] >= 5 for b in small)
        out.append(f"TypiClust beats random by >= 5 points at budgets 8-40: {'met' if ok else 'missed'} ("
                   + ", ".join(f"{b}: {gains[b]:+.1f}" for b in small) + ").")
    if gains:
        worst = min(gains.values())
        out.append(f"TypiClust never loses by more than 1 point at any budget: "
                   f"{'met' if worst >= -1 else 'missed'} (worst {worst:+.1f}).")
    ft, sc = summary.get("finetune", {}), summary.get("scratch", {})
    every = max(random, default=None)  # all of train: the largest probe budget
    for cells in sorted(set(ft) & set(sc)):
        diff = 100 * (ft[cells]["mean"] - sc[cells]["mean"])
        if cells == every:
            verdict = ("met" if abs(diff) <= 0.5 else
                       "missed: fine-tuning is better by more than that" if diff > 0 else "missed")
            out.append(f"Fine-tuning at {cells} labels matches from-scratch within 0.5 points: "
                       f"{verdict} ({diff:+.1f}).")
        else:
            out.append(f"Fine-tuning at {cells} labels beats from-scratch by >= 5 points: "
                       f"{'met' if diff >= 5 else 'missed'} ({diff:+.1f}).")
    if every is not None and every not in ft:
        out.append(f"Fine-tuning against from-scratch at 100 % of train ({every} labels): not measured yet "
                   f"(CPU time; `--train-fractions 1` continues the results file).")
    out.append(f"The whole experiment within 60 minutes of this CPU: "
               f"{'missed' if total_seconds > 3600 else 'within it so far'} ({total_seconds / 60:.0f} "
               f"minutes for the numbers above, summed over the runs).")
    return out


def answer(summary: dict) -> list[str]:
    """"How many cells must we label?": the smallest budget of the random-cell probe within 1, 3
    and 5 points of the probe on all of train."""
    random = summary.get("probe/random", {})
    if len(random) < 2:
        return []
    every = max(random)
    full = random[every]["mean"]
    parts = []
    for points in (1, 3, 5):
        enough = min(c for c in random if random[c]["mean"] >= full - points / 100)
        parts.append(f"within {points} point{'s' if points > 1 else ''}: {enough:,} cells "
                     f"({100 * random[enough]['mean']:.1f} %)")
    return ["", f"How many cells to label, on these features with the fixed head and cells chosen at "
                f"random: all {every:,} train labels give {100 * full:.1f} %; the fewest measured budget "
                + "; ".join(parts) + "."]


def page(data: dict, summary: dict, figure: str) -> str:
    names = {"probe/random": "linear probe, random cells", "probe/typiclust": "linear probe, TypiClust cells",
             "probe/kcenter": "linear probe, k-center cells", "probe/pixels": "raw pixels, random cells",
             "finetune": "fine-tuned (SSL checkpoint)", "scratch": "from scratch (same backbone)"}
    cells = sorted({c for curve in summary.values() for c in curve})
    fractions = sorted({float(k.split("/")[1]) for k in data["entries"] if not k.startswith("probe/")})
    named = [f"{100 * f:g} %" for f in fractions]
    trained = (" and ".join([", ".join(named[:-1]), named[-1]]) if len(named) > 1 else
               (named[0] if named else "(none yet)"))
    lines = ["# Label efficiency: how many cells to label, and which", "",
             "<!-- generated by experiments/label_efficiency.py; do not edit by hand -->", "",
             f"Device: **{data['device']}**. Features: the quick preset's SimCLR checkpoint "
             f"`{Path(data['checkpoint']).parent.name}` (seed 0). Test accuracy on the BloodMNIST test "
             f"split, mean ± std over seeds (selection seed, or training seed; n per cell in the table "
             f"where fewer than {data['seeds']}).", "",
             f"Probe head, fixed in advance: {data['probe_head']}. Cells for the probe are chosen "
             "without looking at labels (random: uniform; TypiClust and k-center: `ssl-blood select`). "
             f"Fine-tuning and from-scratch training use class-balanced subsets of {trained} of "
             "train (`ssl-blood fine-tune` / `ssl-blood supervised --fraction`), epoch chosen on val; "
             "fine-tuning's learning rate and backbone-lr ratio chosen on val for seed 0 and kept.", "",
             f"![test accuracy against labelled cells]({figure})", "",
             "| labelled cells | " + " | ".join(names[n] for n in names if n in summary) + " |",
             "|---|" + "---|" * sum(n in summary for n in names)]
    for c in cells:
        row = []
        for n in names:
            if n in summary:
                p = summary[n].get(c)
                row.append("–" if p is None else f"{100 * p['mean']:.1f} ± {100 * p['std']:.1f}"
                           + (f" (n={p['n']})" if p["n"] < data["seeds"] else ""))
        lines.append(f"| {c} | " + " | ".join(row) + " |")
    lines += answer(summary)
    lines += ["", "## Targets", ""] + [f"- {v}" for v in verdicts(summary, sum(e["seconds"] for e in data["entries"].values()))]
    if data.get("note"):
        lines += ["", f"Note: {data['note']}"]
    lines += ["", "The numbers of every single run are in experiments/results/label_efficiency.json.", ""]
    return "\n".join(lines)


def figure(summary: dict, path: Path) -> Path:
    from ssl_blood.analysis.plots import curves_png

    labels = {"probe/random": ("linear probe, random", "o-"), "probe/typiclust": ("linear probe, TypiClust", "s-"),
              "probe/kcenter": ("linear probe, k-center", "^-"), "probe/pixels": ("raw pixels, random", "x:"),
              "finetune": ("fine-tuned (SSL)", "D--"), "scratch": ("from scratch", "v--")}
    series = [{"label": label, "style": style, "x": list(summary[n]), "y": [p["mean"] for p in summary[n].values()],
               "std": [p["std"] for p in summary[n].values()]} for n, (label, style) in labels.items() if n in summary]
    return curves_png(series, path, "labelled training cells (log scale)", "test accuracy",
                      "BloodMNIST: accuracy against labelled cells (CPU, quick SimCLR features)", log_x=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/reproduce/simclr-quick-seed0/checkpoint.pt")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--train-seeds", type=int, help="seeds of fine-tuning / from-scratch runs "
                        "(default --seeds): the training runs are what costs CPU time")
    parser.add_argument("--train-fractions", default=",".join(f"{f:g}" for f in FRACTIONS),
                        help="fractions of train to fine-tune and train from scratch on")
    parser.add_argument("--epochs", type=int, default=15, help="fine-tune / scratch epochs at 1 % and 10 %")
    parser.add_argument("--epochs-full", type=int, default=8, help="epochs at 100 % of train")
    parser.add_argument("--out", default=str(REPO / "experiments/results/label_efficiency.json"))
    parser.add_argument("--docs", default=str(REPO / "docs/label-efficiency.md"))
    parser.add_argument("--figure", default=str(REPO / "docs/figures/label_efficiency.png"))
    parser.add_argument("--docs-only", action="store_true")
    parser.add_argument("--note", help="circumstances of the run (e.g. a shared CPU), kept in the "
                        "results file and shown on the page")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = json.loads(Path(args.out).read_text()) if args.docs_only else run(args)
    if args.note:
        data["note"] = args.note
        write_json(data, args.out)
    summary = summarise(data)
    fig = figure(summary, Path(args.figure))
    rel = Path(fig).resolve().relative_to(Path(args.docs).resolve().parent)
    write_text(args.docs, page(data, summary, str(rel)))
    print(f"wrote {args.docs}, {fig}, {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

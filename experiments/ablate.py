"""Ablations: pretrain candidate configs, score them on val only, append to a results file.

Each candidate is a preset plus `--set`-style overrides (`NAME=key=value;key=value`), or lines of
a file with that form (`--candidates-file`). Per candidate: the device, the wall clock of
pretraining, kNN val accuracy (k=20, T=0.07) and the linear probe's val accuracy (weight decay
chosen on val: optimistic, but the same for every candidate). The test split is never touched;
test numbers of a chosen config come from reproduce.py.

    # how the quick preset was chosen (2-core CPU)
    python experiments/ablate.py --preset quick --data-root ../shared/data \
        --candidate base= --candidate "e24=epochs=24;knn_every=-1" --out experiments/results/quick_preset_search.json
    # GPU round
    python experiments/ablate.py --preset full --candidates-file experiments/configs/gpu_round1_simclr.txt \
        --out experiments/results/ablations.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dataclasses import replace

from ssl_blood.training.config import apply_settings, parse_settings, preset_config
from ssl_blood.data import resolve_source
from ssl_blood.device import describe_device
from ssl_blood.features.embeddings import embed_checkpoint
from ssl_blood.evaluation.frozen import linear_probe
from ssl_blood.features.neighbours import knn_accuracy
from ssl_blood.files import write_json
from ssl_blood.training.loop import pretrain


def score_on_val(checkpoint: Path) -> dict:
    """kNN and linear-probe accuracy on val; the test split is never loaded."""
    emb = embed_checkpoint(checkpoint, splits=["train", "val"])
    (tx, ty, _), (vx, vy, _) = emb.select("train"), emb.select("val")
    probe = linear_probe(tx, ty, vx, vy, None, None, emb.class_names)
    return {"knn_val_acc": knn_accuracy(tx, ty, vx, vy, len(emb.class_names)),
            "probe_val_acc": probe["val_acc"], "probe_weight_decay": probe["weight_decay"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--preset", default="quick", choices=["quick", "standard", "full"])
    parser.add_argument("--candidate", action="append", default=[],
                        help="NAME=key=value;key=value (empty overrides for the preset itself)")
    parser.add_argument("--candidates-file", help="one candidate per line, '#' comments")
    parser.add_argument("--runs", default="runs/ablations")
    parser.add_argument("--reuse-runs", action="store_true",
                        help="continue (or only score) runs whose folder already holds a checkpoint")
    parser.add_argument("--out", default="experiments/results/ablations.json")
    args = parser.parse_args()
    if args.candidates_file:
        lines = Path(args.candidates_file).read_text().splitlines()
        args.candidate += [l.strip() for l in lines if l.strip() and not l.lstrip().startswith("#")]
    if not args.candidate:
        parser.error("give --candidate or --candidates-file")

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else []
    for candidate in args.candidate:
        name, _, spec = candidate.partition("=")
        settings = parse_settings([s for s in spec.split(";") if s])
        cfg = apply_settings(preset_config(args.preset, args.method), settings)
        cfg = replace(cfg, data=resolve_source(args.data_root).to_dict())
        run_dir = Path(args.runs) / name
        reuse = args.reuse_runs and (run_dir / "checkpoint.pt").is_file()
        result = pretrain(cfg, run_dir, resume=reuse, overwrite=not reuse, progress=False)
        seconds = sum(r["seconds"] for r in result.history)  # training time, kNN monitor excluded
        config = {k: v for k, v in cfg.to_dict().items() if k != "data"}
        row = {"name": name, "overrides": settings, "config": config, "device": describe_device(cfg.device),
               "pretrain_seconds": round(seconds, 1), "epochs": cfg.epochs,
               "final_loss": result.history[-1]["loss"], **score_on_val(run_dir / "checkpoint.pt")}
        print(json.dumps(row), file=sys.stderr)
        results = [r for r in results if r["name"] != name] + [row]
        write_json(results, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

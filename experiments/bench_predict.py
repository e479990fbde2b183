"""How fast `predict` classifies cells on this machine: cells/s of the whole command (a fresh
process: imports, loading, embedding, head, writing) and of its parts in-process (embedding,
head + OOD score), on BloodMNIST's test split (3,421 cells, 28 px) with a classifier trained on
120 labels of the given checkpoint. Target (issue 22): >= 1,000 cells/s on the 2-core CPU.

    python experiments/bench_predict.py --checkpoint runs/quick/checkpoint.pt

Writes experiments/results/bench_predict.json (or --out).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ssl_blood.classify.classifier import Classifier
from ssl_blood.data import load_split
from ssl_blood.device import describe_device
from ssl_blood.features.embeddings import Embedder
from ssl_blood.files import write_json

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "bench_predict.json"))
    args = parser.parse_args()
    embedder = Embedder.from_checkpoint(args.checkpoint, "cpu")
    source = embedder.spec.data_source()
    train, test = load_split(source, "train"), load_split(source, "test")
    rows = np.sort(np.random.default_rng(0).choice(len(train), 120, replace=False))
    labelled = train.subset(rows)
    model = Classifier.from_features(embedder, embedder(labelled.images), labelled)
    embed_s, head_s = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        features = embedder(test.images)
        embed_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        model.review_flags(model.probabilities(features), model.ood_scores(features))
        head_s.append(time.perf_counter() - started)
    with tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp) / "clf")
        command = [sys.executable, "-m", "ssl_blood", "predict", "--classifier", str(Path(tmp) / "clf"),
                   "--npz", str(Path(source.path) / "bloodmnist.npz"), "--split", "test",
                   "--device", "cpu", "--out", str(Path(tmp) / "p.csv")]
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        command_s = time.perf_counter() - started
    n = len(test)
    result = {"device": describe_device("cpu"), "cells": n, "checkpoint": args.checkpoint,
              "embedding_cells_per_s": round(n / min(embed_s), 1),
              "head_and_ood_cells_per_s": round(n / min(head_s), 1),
              "in_process_cells_per_s": round(n / (min(embed_s) + min(head_s)), 1),
              "command_seconds": round(command_s, 2), "command_cells_per_s": round(n / command_s, 1),
              "target_cells_per_s": 1000}
    write_json(result, args.out)
    print(result)


if __name__ == "__main__":
    main()

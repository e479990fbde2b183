"""How fast `predict` classifies cells on this machine, at 1 and at 8 dihedral views per cell:
cells/s of its parts in-process (embedding, head + OOD score, the batch shift check) on
BloodMNIST's test split (3,421 cells, 28 px), and of the whole command in a fresh process
(imports, loading, embedding, head, writing) on the train split (11,959 cells, so that start-up
weighs as it does on a real folder). The classifier: 120 random train labels of the given
checkpoint, trained as train-classifier trains it. Peers measured in the same run: the
embedding in fp32 (what `--precision auto` chooses against), and the classifier exported to
ONNX under onnxruntime (the whole graph: preprocessing, views, backbone, head, softmax).
The backbone's multiply-accumulates per cell say how close to the CPU's bound it runs.
Target (issue 22): >= 1,000 cells/s on the 2-core CPU.

    python experiments/bench_predict.py --checkpoint runs/quick/checkpoint.pt

Writes experiments/results/bench_predict.json (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ssl_blood.classify.classifier import Classifier
from ssl_blood.data import load_split
from ssl_blood.device import _bf16_speedup, describe_device, uses_bf16
from ssl_blood.features.embeddings import Embedder
from ssl_blood.files import write_json

REPO = Path(__file__).resolve().parents[1]


def best_seconds(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def review(model: Classifier, features: np.ndarray) -> np.ndarray:
    """What predict does after embedding: probabilities, OOD score, review score, flags."""
    probabilities = model.probabilities(features)
    return model.review_flags(probabilities, model.ood_scores(features),
                              scores=model.review_scores(probabilities, features))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "bench_predict.json"))
    args = parser.parse_args()
    import torch

    embedder = Embedder.from_checkpoint(args.checkpoint, "cpu")
    source = embedder.spec.data_source()
    train, test = load_split(source, "train"), load_split(source, "test")
    rows = np.random.default_rng(0).choice(len(train), 120, replace=False)
    model = Classifier.train(embedder, train.labelled_only_at(rows), "logistic")
    fp32 = Embedder(dataclasses.replace(embedder.spec, precision="fp32"), embedder.model, embedder.device,
                    embedder.trained)
    n, repeats = len(test), args.repeats
    result = {"device": describe_device("cpu"), "cells": n, "checkpoint": args.checkpoint,
              "precision": "bf16" if uses_bf16(torch.device("cpu"), embedder.spec.precision) else "fp32",
              "bf16_over_fp32_measured_at_start": round(_bf16_speedup(), 2),
              "backbone_mmacs_per_cell": round(macs_per_cell(embedder) / 1e6, 1), "views": {}}
    for views in (1, 8):
        features = model.features(test.images, views=views)
        embed_s = best_seconds(lambda: model.features(test.images, views=views), repeats)
        fp32_s = best_seconds(lambda: fp32(test.images, views=views), repeats)
        head_s = best_seconds(lambda: review(model, features), repeats)
        shift_s = best_seconds(lambda: model.shift_check(features, test.images), repeats)
        result["views"][views] = {
            "embedding_cells_per_s": round(n / embed_s, 1),
            "embedding_fp32_cells_per_s": round(n / fp32_s, 1),
            "embedding_gflops": round(2 * views * result["backbone_mmacs_per_cell"] * 1e6 * n / embed_s / 1e9, 1),
            "head_and_ood_cells_per_s": round(n / head_s, 1), "shift_check_seconds": round(shift_s, 3),
            "in_process_cells_per_s": round(n / (embed_s + head_s + shift_s), 1)}
    with tempfile.TemporaryDirectory() as tmp:
        clf = Path(tmp) / "clf"
        model.save(clf)
        for views in (1, 8):
            onnx_s = onnx_seconds(clf, test.images.numpy(), repeats, views)
            result["views"][views]["onnxruntime_cells_per_s"] = round(n / onnx_s, 1) if onnx_s else None
            command = [sys.executable, "-m", "ssl_blood", "predict", "--classifier", str(clf),
                       "--npz", str(Path(source.path) / "bloodmnist.npz"), "--split", "train",
                       "--device", "cpu", "--views", str(views), "--out", str(Path(tmp) / f"p{views}.csv")]
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            command_s = time.perf_counter() - started
            result["views"][views].update(command_cells=len(train), command_seconds=round(command_s, 2),
                                          command_cells_per_s=round(len(train) / command_s, 1))
    result["target_cells_per_s"] = 1000
    write_json(result, args.out)
    print(result)


def macs_per_cell(embedder: Embedder) -> int:
    """Multiply-accumulates of the backbone's convolutions and linear layers for one cell."""
    import torch

    spec, total = embedder.spec, [0]

    def count(module, _, out):
        if isinstance(module, torch.nn.Conv2d):
            total[0] += out[0].numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
        else:
            total[0] += module.in_features * module.out_features
    hooks = [m.register_forward_hook(count) for m in embedder.model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        embedder.model.eval()(torch.zeros(1, len(spec.mean), int(spec.input_size), int(spec.input_size)))
    for hook in hooks:
        hook.remove()
    return total[0]


def onnx_seconds(clf: Path, images: np.ndarray, repeats: int, views: int) -> float | None:
    """Best time of onnxruntime (CPU) over `images` with the classifier exported at `views`
    views per cell; None without onnx / onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    import json

    from ssl_blood.classify.export import export_onnx

    config = json.loads((clf / "classifier.json").read_text())
    out = clf.with_name(f"clf-{views}.onnx")
    if config["views"] != views:  # the same classifier at another number of views
        variant = clf.with_name(f"clf-{views}")
        variant.mkdir()
        for f in clf.iterdir():
            (variant / f.name).write_bytes(f.read_bytes())
        (variant / "classifier.json").write_text(json.dumps({**config, "views": views}))
        clf = variant
    export_onnx(clf, out)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return best_seconds(lambda: [session.run(None, {"images": images[s:s + 256]})
                                 for s in range(0, len(images), 256)], repeats)


if __name__ == "__main__":
    main()

"""BloodMNIST as a lab's own data: written as PNG files in class folders, upsampled to 64 px,
loaded with --image-dir, pretrained with the quick preset, probed. Writes
experiments/results/bloodmnist_folder64.json (the 64-px row of docs/results.md).

    python experiments/own_cells.py --data-root ../shared/data --folder runs/bloodmnist64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ssl_blood.training.recipe import build_config
from ssl_blood.data import available_splits, medmnist_info, resolve_source
from ssl_blood.device import describe_device
from ssl_blood.features.embeddings import embed_checkpoint
from ssl_blood.evaluation.frozen import knn_embeddings, probe_embeddings
from ssl_blood.files import write_json
from ssl_blood.training.loop import pretrain

REPO = Path(__file__).resolve().parents[1]


def write_folder(npz_root: str, folder: Path, size: int) -> None:
    """DIR/{train,val,test}/<class name>/<id>.png, each image upsampled (bicubic) to `size`."""
    names = [n.split("(")[0].strip() for _, n in sorted(medmnist_info().INFO["bloodmnist"]["label"].items(),
                                                         key=lambda kv: int(kv[0]))]
    arrays = np.load(Path(npz_root) / "bloodmnist.npz")
    for split in ("train", "val", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"][:, 0]
        for i, (image, label) in enumerate(zip(images, labels)):
            path = folder / split / names[label] / f"{i:05d}.png"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC).save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--folder", default="runs/bloodmnist64")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--runs", default="runs/own_cells")
    parser.add_argument("--out", default=str(REPO / "experiments/results/bloodmnist_folder64.json"))
    parser.add_argument("--note", help="circumstances of the timing, shown in docs/results.md")
    args = parser.parse_args()

    folder = Path(args.folder)
    write_folder(args.data_root, folder, args.size)
    source = resolve_source(image_dir=str(folder), size=args.size)
    assert available_splits(source) == ("train", "val", "test")
    cfg = build_config("quick", "simclr", None, {}, source, "cpu")
    run = Path(args.runs) / "simclr-quick-64"
    reuse = (run / "checkpoint.pt").is_file()
    result = pretrain(cfg, run, resume=reuse, overwrite=not reuse, progress=False)
    emb = embed_checkpoint(run / "checkpoint.pt")
    probe, knn = probe_embeddings(emb), knn_embeddings(emb, cluster_seed=None)
    from ssl_blood.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run / "checkpoint.pt")
    out = {"device": describe_device("auto"), "note": args.note, "size": args.size, "stem": ckpt["backbone_stem"],
           "layout": "splits (DIR/{train,val,test}/<class>/)", "epochs": cfg.epochs,
           "pretrain_seconds": sum(r["seconds"] for r in result.history),
           "probe_test_acc": probe["test_acc"], "probe_val_acc": probe["val_acc"],
           "probe_weight_decay": probe["weight_decay"], "knn_test_acc": knn["acc"],
           "kmeans_nmi": probe["test_clusters"]["nmi"], "cells": {s: int((emb.split == s).sum()) for s in emb.splits()}}
    reference = REPO / "experiments/results/bloodmnist.json"
    if reference.exists():
        seed0 = json.loads(reference.read_text())["methods"]["simclr"]["runs"][0]
        out.update(npz28_probe_test_acc=seed0["linear_probe_test_acc"], npz28_knn_test_acc=seed0["knn_test_acc"])
    write_json(out, args.out)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Everything a run's report shows, computed with the library's own functions and kept in
RUN/analysis/ so a second report is fast.

Stages (each cached): embeddings of every split with the run's checkpoint and the baselines
(raw pixels are recomputed, not stored: standardising pixels is faster than loading them),
linear probe, kNN and k-means cluster metrics per feature set, one UMAP of the test split (used
by the static maps and the interactive map), the immature-granulocyte analysis, the interactive
map, and a retrieval montage. The cache is redone when the checkpoint, the subset (`limit`) or
the baselines change; inputs are checked before anything in the folder is touched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ssl_blood import ui
from ssl_blood.errors import UserError
from ssl_blood.files import sha256_file, write_json
from ssl_blood.training.run_dir import RunDir

ANALYSIS_FORMAT = 2
STAGES = ("embeddings", "probes", "kNN", "UMAP and IG analysis", "interactive map", "retrieval montage")


def check_inputs(run: RunDir, limit: int | None, baselines: Sequence[str]) -> dict[str, Any]:
    """Refuse bad input before anything is written; returns the loaded checkpoint."""
    from ssl_blood.model.checkpoint import load_checkpoint
    from ssl_blood.features.embeddings import BASELINES

    if not run.path.is_dir():
        raise UserError(f"`run` {run.path}: no such folder; give the folder of a pretraining run",
                        param="run")
    if not run.has_checkpoint():
        raise UserError(f"{run.path} has no checkpoint.pt; the run has not finished an epoch yet "
                        f"(or this is not a run folder)", param="run")
    if limit is not None and limit < 1:
        raise UserError(f"`limit` {limit} must be a positive number of images", param="limit")
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise UserError(f"`baselines` {unknown[0]}: choose from {', '.join(BASELINES)}", param="baselines")
    return load_checkpoint(run.checkpoint)


def run_history(run: RunDir, checkpoint: dict[str, Any]) -> list[dict]:
    """Per-epoch records: the checkpoint's (the truth), else metrics.jsonl."""
    history = checkpoint.get("history") or run.read_metrics()
    if not history:
        raise UserError(f"{run.path} has no training history (checkpoint and metrics.jsonl are "
                        f"empty); give the folder of a pretraining run", param="run")
    return history


def _cached_json(path: Path, compute: Callable[[], Any]) -> Any:
    if path.exists():
        return json.loads(path.read_text())
    return json.loads(write_json(compute(), path).read_text())


def prepare_analysis(run_dir: str | Path, limit: int | None = None, device: str = "auto",
                     baselines: Sequence[str] = ("pixels", "random-init"),
                     progress: bool | None = None) -> dict[str, Any]:
    """Compute (or reuse) everything the report shows; returns paths and results."""
    from ssl_blood.data import available_splits, load_split
    from ssl_blood.features.embeddings import Embedder
    from ssl_blood.analysis.plots import training_curves_png

    run = RunDir(run_dir)
    checkpoint = check_inputs(run, limit, baselines)
    history = run_history(run, checkpoint)
    out = run.analysis_dir
    stamp = {"format": ANALYSIS_FORMAT, "checkpoint_sha256": sha256_file(run.checkpoint),
             "limit": limit, "baselines": list(baselines)}
    stamp_path = out / "analysis.json"
    if not stamp_path.exists() or json.loads(stamp_path.read_text()) != stamp:
        # another checkpoint or subset, or files of unknown origin (an earlier report stopped
        # before its stamp): start clean, stamp first so that what follows is known to match
        for old in sorted(out.rglob("*"), reverse=True) if out.exists() else ():
            old.unlink() if old.is_file() else old.rmdir()
        write_json(stamp, stamp_path)
    bar = ui.bar(total=len(STAGES), desc="report", unit="stage", enabled=progress)
    curves = out / "training_curves.png"  # the history is the checkpoint's: cached with it
    result: dict[str, Any] = {"dir": out, "history": history,
                              "curves": curves if curves.exists() else training_curves_png(history, curves)}
    bar.set_description("report: embeddings")
    model = Embedder.from_checkpoint(run.checkpoint, device)
    source = model.spec.data_source()
    splits = list(available_splits(source))
    train = load_split(source, "train", limit) if baselines else None
    embedders = {"model": model, **{kind: Embedder.baseline(kind, train, model.spec.backbone, 0, device,
                                                            model.spec.stem or "auto")
                                    for kind in baselines}}
    result["embeddings"] = {name: _embeddings(out, name, e, source, splits, limit)
                            for name, e in embedders.items()}
    bar.update(1)
    emb = result["embeddings"]["model"]
    labelled = set(splits) >= {"train", "val", "test"} and all(
        (emb.labels[emb.split == s] >= 0).any() for s in ("train", "val", "test"))
    result["labelled"] = labelled
    if labelled:
        bar.set_description("report: probes and kNN")
        result.update(_evaluations(out, result["embeddings"]))
        if "pixels" in result["embeddings"]:  # only its test split is drawn from here on
            result["embeddings"]["pixels"] = _only(result["embeddings"]["pixels"], "test")
        bar.update(2)
        bar.set_description("report: UMAP and IG analysis")
        result["umap"] = _umap(out, result["embeddings"], result["probes"]["model"])
        bar.update(1)
    else:
        bar.update(3)
    bar.set_description("report: interactive map")
    result["map"] = _map(out, emb, result.get("probes", {}).get("model"), "test" if "test" in splits else "train")
    bar.update(1)
    bar.set_description("report: retrieval montage")
    result["montage"] = _montage(out, emb, splits)
    bar.update(1)
    bar.close()
    return result


def _embeddings(out: Path, name: str, embedder, source, splits: list[str], limit: int | None):
    """Stored embeddings of every split; raw pixels are recomputed instead of stored."""
    from ssl_blood.features.embeddings import Embeddings, embed_splits

    path = out / f"embeddings-{name}.npz"
    if name == "pixels":
        return embed_splits(embedder, source, splits, limit)
    if not path.exists():
        embed_splits(embedder, source, splits, limit, progress=False).save(path)
    return Embeddings.load(path)


def _only(emb, split: str):
    """The embeddings of one split (frees the memory of the others)."""
    from dataclasses import replace

    mask = emb.mask(split)
    return replace(emb, features=emb.features[mask].copy(), labels=emb.labels[mask],
                   split=emb.split[mask], ids=emb.ids[mask],
                   metadata={k: v[mask] for k, v in emb.metadata.items()},
                   coords=None if emb.coords is None else emb.coords[mask])


def _evaluations(out: Path, embeddings: dict) -> dict[str, Any]:
    from ssl_blood.evaluation.frozen import knn_embeddings, probe_embeddings
    from ssl_blood.analysis.plots import confusion_matrix_png

    probes = {n: _cached_json(out / f"linear_probe-{n}.json", lambda e=e: probe_embeddings(e))
              for n, e in embeddings.items()}
    knns = {n: _cached_json(out / f"knn-{n}.json", lambda e=e: knn_embeddings(e, cluster_seed=None))
            for n, e in embeddings.items()}  # the probe's file holds the cluster metrics
    confusion = out / "confusion_matrix.png"
    if not confusion.exists():
        confusion_matrix_png(probes["model"]["confusion_matrix"], embeddings["model"].class_names,
                             confusion, "Linear probe, test split")
    return {"probes": probes, "knns": knns, "confusion": confusion}


def _umap(out: Path, embeddings: dict, probe: dict) -> dict[str, Any] | None:
    """One UMAP of the test split, stored in the model's embeddings file (the interactive map
    reuses it), and the IG analysis when the data has that class."""
    from ssl_blood.analysis.umap_ig import IG, fit_umap, has_class, umap_report

    emb = embeddings["model"]
    path = out / "umap" / "ig_analysis.json"
    if path.exists():
        return json.loads(path.read_text())
    if emb.coords is None:
        mask = emb.split == "test"
        coords = np.full((len(emb.features), 2), np.nan, dtype=np.float32)
        coords[mask], emb.umap_params = fit_umap(emb.features[mask])
        emb.coords = coords
        emb.save(out / "embeddings-model.npz")
    if not has_class(emb.class_names, IG):
        return None
    return umap_report(emb, out / "umap", "test", IG, embeddings.get("pixels"), 0, probe)


def _map(out: Path, emb, probe: dict | None, split: str) -> Path:
    from ssl_blood.analysis.explore import explore_page

    path = out / "map.html"
    if not path.exists():
        explore_page(emb, path, split, probe if split == "test" else None)
    return path


def _montage(out: Path, emb, splits: list[str]) -> Path:
    """A few query cells (one per class from test, else the first cells) and their neighbours."""
    from ssl_blood.features.index import CellIndex
    from ssl_blood.analysis.plots import retrieval_montage
    from ssl_blood.features.neighbours import neighbours
    from ssl_blood.features.retrieval import describe, montage_rows

    path = out / "retrieval.png"
    if path.exists():
        return path
    query_split = "test" if "test" in splits else "train"
    index = CellIndex.from_embeddings(emb, "train", kind="flat", use_gpu=False)
    qx, qy, qids = emb.select(query_split)
    classes = [c for c in np.unique(qy) if c >= 0]
    picks = [int(np.flatnonzero(qy == c)[0]) for c in classes][:8] or list(range(min(4, len(qy))))
    exclude = qids[picks] if query_split == "train" else None
    sims, pos = neighbours(index, qx[picks], 7, exclude)
    names = list(emb.class_names)
    queries = [{"split": query_split, "id": int(qids[p])} for p in picks]
    answers = describe(index, sims, pos, queries)
    gallery, query_images = emb.split_images("train"), emb.split_images(query_split)
    if gallery is None or query_images is None:
        return path
    captions = [f"{query_split} #{qids[p]}\n" + (names[qy[p]] if qy[p] >= 0 else "query") for p in picks]
    return retrieval_montage(montage_rows(gallery, [query_images[qids[p]] for p in picks], captions,
                                          answers), names, path)

"""What the frozen-feature experiments share (classifier.py, label_loop.py, semi_supervised.py,
shift.py): one checkpoint's train and test features, embedded once and kept beside it; their
resumable results file; their section of a doc page."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ssl_blood.data.sources import DataSource
from ssl_blood.device import describe_device
from ssl_blood.features.embeddings import Embedder, Embeddings, embed_splits
from ssl_blood.files import write_text


def repo_relative(path: str | Path) -> str:
    """`path` as the docs name it: relative to the repository when inside it, whatever the
    directory the experiment ran from."""
    resolved = Path(path).resolve()
    repo = Path(__file__).resolve().parents[1]
    return str(resolved.relative_to(repo)) if resolved.is_relative_to(repo) else str(path)


def checkpoint_features(checkpoint: str | Path) -> tuple[Embedder, DataSource, Embeddings]:
    """The checkpoint's embedder (CPU), its data and the train + test embeddings, read from
    CHECKPOINT_DIR/classifier_embeddings.npz or embedded and written there once."""
    embedder = Embedder.from_checkpoint(checkpoint, "cpu")
    source = embedder.spec.data_source()
    path = Path(checkpoint).with_name("classifier_embeddings.npz")
    if path.exists():
        return embedder, source, Embeddings.load(path)
    emb = embed_splits(embedder, source, ["train", "test"], progress=True)
    emb.save(path)
    return embedder, source, emb


def view_features(checkpoint: str | Path, embedder: Embedder, source: DataSource,
                  views: int) -> dict[str, np.ndarray]:
    """{split: features} of train and test averaged over `views` dihedral views (what a
    classifier with that many views reads), kept as CHECKPOINT_DIR/classifier_features_views<V>.npz.
    (The single-view embeddings of `checkpoint_features` stay what `ssl-blood select` reads.)"""
    from ssl_blood.data import load_split

    path = Path(checkpoint).with_name(f"classifier_features_views{views}.npz")
    if path.exists():
        return dict(np.load(path))
    features = {split: embedder(load_split(source, split).images, progress=True, views=views)
                for split in ("train", "test")}
    np.savez(path, **features)
    return features


def load_results(out: Path) -> dict:
    """The results written so far (a run resumes), or a new file naming this device."""
    return json.loads(out.read_text()) if out.exists() else {"device": describe_device("cpu"), "entries": {}}


def record_checkpoint(results: dict, checkpoint: str | Path, embedder: Embedder, out: Path) -> None:
    """Name the checkpoint (path as the docs say it, SHA-256) in `results`; results written from
    another checkpoint are refused, as a resumed run would mix two checkpoints' numbers."""
    if results.get("checkpoint_sha256", embedder.identity) != embedder.identity:
        raise SystemExit(f"{out} holds results of another checkpoint; give a new --out (and --tag)")
    results.update(checkpoint=repo_relative(checkpoint), checkpoint_sha256=embedder.identity)


def put_section(doc: Path, start: str, end: str, section: str) -> None:
    """`section` (which begins with `start` and ends with `end`) in place of the old one in
    `doc`, or appended; the rest of the page is kept."""
    text = doc.read_text() if doc.exists() else ""
    text = (text[:text.index(start)] + section + text[text.index(end) + len(end) + 1:]
            if start in text else text.rstrip() + "\n\n" + section)
    write_text(doc, text)

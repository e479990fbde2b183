"""CellIndex: cosine nearest-neighbour search over a gallery of cell embeddings, with faiss.

Cosine similarity is inner product of L2-normalised vectors (`faiss.normalize_L2` +
`IndexFlatIP`). Where the installed faiss has GPUs, the index is built and searched on GPU 0
(`StandardGpuResources` + `index_cpu_to_gpu`) and moved back with `index_gpu_to_cpu` to be saved.
An index directory holds `index.faiss` and `meta.json` (dimension, kind, gallery ids and labels,
class names, the embedder spec with the checkpoint's SHA-256).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ssl_blood.errors import UserError

INDEX_KINDS = ("flat", "ivf", "ivfpq")
INDEX_FILE, META_FILE = "index.faiss", "meta.json"
META_VERSION = 1


def faiss_gpus() -> int:
    """Number of GPUs the installed faiss build can use (0 for faiss-cpu)."""
    import faiss

    return int(getattr(faiss, "get_num_gpus", lambda: 0)())


def _as_float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _normalized(x: np.ndarray) -> np.ndarray:
    import faiss

    x = _as_float32(x).copy()
    faiss.normalize_L2(x)
    return x


class CellIndex:
    """A faiss index over L2-normalised gallery vectors plus what describes each vector.

    >>> index = CellIndex.build(train_features, labels=train_labels, ids=train_ids)
    >>> similarity, position = index.search(query_features, k=10)
    >>> index.gallery_labels[position]  # labels of the neighbours
    """

    def __init__(self, index: Any, meta: dict[str, Any]):
        self.index, self.meta = index, meta
        self.gallery_ids = np.asarray(meta["gallery_ids"], dtype=np.int64)
        self.gallery_labels = np.asarray(meta["gallery_labels"], dtype=np.int64)
        self._gpu_resources = None

    # -- build -------------------------------------------------------------------

    @classmethod
    def build(cls, features: np.ndarray, labels: np.ndarray | None = None,
              ids: np.ndarray | None = None, kind: str = "flat", nlist: int | None = None,
              nprobe: int | None = None, pq_m: int | None = None, use_gpu: bool | None = None,
              meta: dict[str, Any] | None = None, seed: int = 0) -> "CellIndex":
        """Index `features` (N, D); `use_gpu=None` means: on the GPU when faiss has one."""
        import faiss

        if kind not in INDEX_KINDS:
            raise UserError(f"unknown index kind '{kind}'; choose one of {', '.join(INDEX_KINDS)}")
        if features.ndim != 2 or len(features) == 0:
            raise UserError(f"cannot index features of shape {features.shape}; need (N, D), N > 0")
        n, dim = features.shape
        vectors = _normalized(features)
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        else:
            nlist = nlist or default_nlist(n)
            if nlist > n:
                raise UserError(f"--nlist {nlist} exceeds the {n} gallery vectors; use fewer lists")
            quantizer = faiss.IndexFlatIP(dim)
            if kind == "ivf":
                index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            else:
                pq_m = pq_m or _default_pq_m(dim)
                if dim % pq_m:
                    raise UserError(f"--pq-m {pq_m} must divide the dimension {dim}")
                index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            train = vectors
            if n > 256 * nlist:  # k-means needs ~40-256 points per list; more only costs time
                rng = np.random.default_rng(seed)
                train = vectors[np.sort(rng.choice(n, 256 * nlist, replace=False))]
            index.train(train)
            index.nprobe = nprobe or default_nprobe(nlist)
        index.add(vectors)
        meta = dict(meta or {})
        meta.update({
            "format_version": META_VERSION, "dim": dim, "kind": kind, "metric": "cosine",
            "ntotal": n, "faiss_version": faiss.__version__,
            "nlist": getattr(index, "nlist", None), "nprobe": getattr(index, "nprobe", None),
            "pq_m": pq_m if kind == "ivfpq" else None,
            "gallery_ids": (np.arange(n) if ids is None else np.asarray(ids)).astype(int).tolist(),
            "gallery_labels": (np.full(n, -1) if labels is None else np.asarray(labels)).astype(int).tolist(),
        })
        built = cls(index, meta)
        if use_gpu or (use_gpu is None and faiss_gpus() > 0):
            built.to_gpu()
        return built

    def to_gpu(self, device: int = 0) -> "CellIndex":
        import faiss

        if faiss_gpus() == 0:
            raise UserError("the installed faiss has no GPU support; install ssl-blood[gpu] "
                            "(faiss-gpu) or search on the CPU")
        self._gpu_resources = faiss.StandardGpuResources()
        self.index = faiss.index_cpu_to_gpu(self._gpu_resources, device, self.index)
        return self

    @property
    def on_gpu(self) -> bool:
        return self._gpu_resources is not None

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    # -- search ------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities (Q, k) and gallery positions (Q, k), best first."""
        queries = np.atleast_2d(queries)
        if queries.shape[1] != self.dim:
            raise UserError(f"queries have dimension {queries.shape[1]} but the index holds "
                            f"{self.dim}-d vectors; embed them with the index's checkpoint")
        if k < 1:
            raise UserError(f"--k {k} must be at least 1")
        k = min(k, self.ntotal)
        similarity, position = self.index.search(_normalized(queries), k)
        return similarity, position.astype(np.int64)

    # -- files -------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        import faiss

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cpu_index = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index
        tmp = directory / f".{INDEX_FILE}.tmp"
        faiss.write_index(cpu_index, str(tmp))
        tmp.replace(directory / INDEX_FILE)
        (directory / META_FILE).write_text(json.dumps(self.meta) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, expected_identity: str | None = None,
             expected_dim: int | None = None, use_gpu: bool | None = None) -> "CellIndex":
        """Load an index directory; refuse one made with another checkpoint or dimension."""
        import faiss

        directory = Path(directory)
        meta_path, index_path = directory / META_FILE, directory / INDEX_FILE
        if not directory.is_dir():
            raise UserError(f"--index {directory}: no such folder; build one with ssl-blood index")
        if not meta_path.is_file() or not index_path.is_file():
            raise UserError(f"{directory} lacks {META_FILE} or {INDEX_FILE}; it is not an "
                            f"ssl-blood index: build one with ssl-blood index")
        try:
            meta = json.loads(meta_path.read_text())
            index = faiss.read_index(str(index_path))
        except Exception as exc:
            raise UserError(f"cannot read the index in {directory} ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); it is corrupt: "
                            f"rebuild it with ssl-blood index") from None
        if index.d != meta.get("dim") or index.ntotal != meta.get("ntotal"):
            raise UserError(f"{directory}: {INDEX_FILE} ({index.ntotal} x {index.d}) does not "
                            f"match {META_FILE}; rebuild the index")
        if expected_dim is not None and expected_dim != index.d:
            raise UserError(f"{directory} holds {index.d}-d vectors but the embeddings are "
                            f"{expected_dim}-d; build an index from these embeddings")
        if expected_identity is not None and meta.get("checkpoint_sha256") != expected_identity:
            raise UserError(f"{directory} was built from checkpoint "
                            f"{str(meta.get('checkpoint_sha256'))[:12]}, not "
                            f"{expected_identity[:12]}; build an index from this checkpoint's "
                            f"embeddings")
        loaded = cls(index, meta)
        if use_gpu or (use_gpu is None and faiss_gpus() > 0):
            loaded.to_gpu()
        return loaded


def default_nlist(n: int) -> int:
    """About 4 sqrt(N) lists (faiss's guideline), at least 39 vectors per list."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def default_nprobe(nlist: int) -> int:
    """Lists visited per query: 1/16 of them, at least 8 (recall over speed by default)."""
    return min(nlist, max(8, nlist // 16))


def _default_pq_m(dim: int) -> int:
    for m in (64, 32, 16, 8, 4, 2, 1):
        if dim % m == 0 and dim // m >= 4:
            return m
    return 1

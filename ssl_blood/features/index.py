"""CellIndex: cosine nearest-neighbour search over a gallery of cell embeddings, with faiss.

Cosine similarity is inner product of L2-normalised vectors (`faiss.normalize_L2` +
`IndexFlatIP`). Kinds: `flat` (exact), `ivf` (IVF-Flat), `ivfpq` (IVF-PQ codes, the shortlist
re-ranked exactly: `IndexRefineFlat`), `hnsw` (graph), and `auto`, which picks by gallery size
(`choose_kind`, measured in docs/benchmarks.md). Where the installed faiss has GPUs, flat and
IVF indices are built and searched on GPU 0 (`StandardGpuResources` + `index_cpu_to_gpu`) and
moved back with `index_gpu_to_cpu` to be saved.

Approximate indices may find fewer than k neighbours (an IVF query whose probed lists hold
fewer than k vectors); faiss pads those places with position -1. `search` keeps the padding
(position -1, similarity -inf) and every consumer masks it; `found` counts the real ones.

An index directory holds `index.faiss` and `meta.json` (dimension, kind, gallery split, ids and
labels, class names, the embedder spec with its identity, the embeddings file it came from).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ssl_blood.errors import UserError
from ssl_blood.files import atomic_path, write_json

INDEX_KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw")
INDEX_FILE, META_FILE = "index.faiss", "meta.json"
META_VERSION = 2
AUTO_FLAT_BELOW = 200_000  # gallery size from which `auto` stops searching exactly
HNSW_M = 32


def faiss_gpus() -> int:
    """Number of GPUs the installed faiss build can use (0 for faiss-cpu)."""
    import faiss

    return int(getattr(faiss, "get_num_gpus", lambda: 0)())


def _normalized(x: np.ndarray) -> np.ndarray:
    import faiss

    x = np.array(x, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(x)
    return x


def choose_kind(n: int, on_gpu: bool = False) -> str:
    """`auto`: exact search below AUTO_FLAT_BELOW vectors; above it HNSW on a CPU (the fastest
    index reaching recall@10 >= 0.95 on a 1M-cell gallery on a 2-core CPU, 37x exact search:
    docs/benchmarks.md) and IVF-Flat on a GPU (faiss has no GPU HNSW)."""
    if n < AUTO_FLAT_BELOW:
        return "flat"
    return "ivf" if on_gpu else "hnsw"


def default_nlist(n: int) -> int:
    """About 4 sqrt(N) lists (faiss's guideline), at least 39 vectors per list."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def default_nprobe(nlist: int) -> int:
    """Lists visited per query: 16 gave recall@10 >= 0.99 with 128 to 4,096 lists on BloodMNIST
    features (12k and 1M cells, docs/benchmarks.md); visiting more only costs time."""
    return min(nlist, 16)


def _default_pq_m(dim: int) -> int:
    for m in (64, 32, 16, 8, 4, 2, 1):
        if dim % m == 0 and dim // m >= 4:
            return m
    return 1


class CellIndex:
    """A faiss index over L2-normalised gallery vectors plus what describes each vector.

    >>> index = CellIndex.build(train_features, labels=train_labels, ids=train_ids)
    >>> similarity, position = index.search(query_features, k=10)   # -1 where not found
    >>> index.gallery_labels[position[position >= 0]]               # labels of the neighbours
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
            raise UserError(f"unknown index `kind` '{kind}'; choose one of {', '.join(INDEX_KINDS)}",
                            param="kind")
        features = np.asarray(features)
        if features.ndim != 2 or len(features) == 0:
            raise UserError(f"cannot index features of shape {features.shape}; need (N, D), N > 0",
                            param="features")
        n, dim = features.shape
        if kind == "auto":
            kind = choose_kind(n, on_gpu=use_gpu or (use_gpu is None and faiss_gpus() > 0))
        vectors = _normalized(features)
        settings: dict[str, Any] = {"nlist": None, "nprobe": None, "pq_m": None, "hnsw_m": None}
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
            index.hnsw.efSearch = max(64, nprobe or 64)
            settings.update(hnsw_m=HNSW_M, nprobe=index.hnsw.efSearch)
        else:
            index, settings = _build_ivf(vectors, kind, nlist, nprobe, pq_m, seed)
        index.add(vectors)
        meta = {"class_names": [], "identity": "unknown", "embedder": {}, "gallery_split": "train",
                **(meta or {})}
        meta.update({
            "format_version": META_VERSION, "dim": dim, "kind": kind, "metric": "cosine", "ntotal": n,
            "faiss_version": faiss.__version__, **settings,
            "gallery_ids": (np.arange(n) if ids is None else np.asarray(ids)).astype(int).tolist(),
            "gallery_labels": (np.full(n, -1) if labels is None else np.asarray(labels)).astype(int).tolist(),
        })
        built = cls(index, meta)
        if kind in ("flat", "ivf") and (use_gpu or (use_gpu is None and faiss_gpus() > 0)):
            built.to_gpu()
        return built

    @classmethod
    def from_embeddings(cls, emb, gallery_split: str = "train", embeddings_file: str | None = None,
                        **build_args: Any) -> "CellIndex":
        """An index over one split of an Embeddings object, with the metadata retrieval needs."""
        x, y, ids = emb.select(gallery_split)
        meta = {"gallery_split": gallery_split, "class_names": list(emb.class_names),
                "identity": emb.identity, "embedder": emb.embedder.to_dict(),
                "embeddings_file": embeddings_file, "subset": emb.subset}
        return cls.build(x, labels=y, ids=ids, meta=meta, **build_args)

    def to_gpu(self, device: int = 0) -> "CellIndex":
        import faiss

        if faiss_gpus() == 0:
            raise UserError("the installed faiss has no GPU support; install ssl-blood[gpu] "
                            "(faiss-gpu) or search on the CPU", param="use_gpu")
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

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "flat"))

    # -- search ------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities (Q, k) and gallery positions (Q, k), best first; where fewer
        than k neighbours were found, position -1 and similarity -inf."""
        queries = np.atleast_2d(queries)
        if queries.shape[1] != self.dim:
            raise UserError(f"`queries` have dimension {queries.shape[1]} but the index holds "
                            f"{self.dim}-d vectors; embed them with the index's checkpoint",
                            param="queries")
        if k < 1:
            raise UserError(f"`k` {k} must be at least 1", param="k")
        k = min(k, self.ntotal)
        similarity, position = self.index.search(_normalized(queries), k)
        position = position.astype(np.int64)
        similarity = np.where(position >= 0, similarity, -np.inf).astype(np.float32)
        return similarity, position

    # -- files -------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        import faiss

        directory = Path(directory)
        cpu_index = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index
        with atomic_path(directory / INDEX_FILE) as tmp:
            faiss.write_index(cpu_index, str(tmp))
        write_json(self.meta, directory / META_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | Path, expected_identity: str | None = None,
             expected_dim: int | None = None, use_gpu: bool | None = None) -> "CellIndex":
        """Load an index directory; refuse one made with another embedder or dimension, or
        whose files do not agree."""
        import faiss

        directory = Path(directory)
        meta_path, index_path = directory / META_FILE, directory / INDEX_FILE
        if not directory.is_dir():
            raise UserError(f"`index` {directory}: no such folder; build one with ssl-blood index",
                            param="index")
        if not meta_path.is_file() or not index_path.is_file():
            raise UserError(f"{directory} lacks {META_FILE} or {INDEX_FILE}; it is not an "
                            f"ssl-blood index: build one with ssl-blood index", param="index")
        try:
            meta = json.loads(meta_path.read_text())
            index = faiss.read_index(str(index_path))
        except Exception as exc:
            first = str(exc).splitlines()[0][:120] if str(exc) else ""
            raise UserError(f"cannot read the index in {directory} ({type(exc).__name__}: "
                            f"{first}); it is corrupt: rebuild it with ssl-blood index",
                            param="index") from None
        _check_meta(meta, index, directory)
        if expected_dim is not None and expected_dim != index.d:
            raise UserError(f"{directory} holds {index.d}-d vectors but the embeddings are "
                            f"{expected_dim}-d; build an index from these embeddings", param="index")
        if expected_identity is not None and meta["identity"] != expected_identity:
            raise UserError(f"{directory} was built from {str(meta['identity'])[:30]}, not "
                            f"{expected_identity[:30]}; build an index from these embeddings",
                            param="index")
        loaded = cls(index, meta)
        if meta["kind"] in ("flat", "ivf") and (use_gpu or (use_gpu is None and faiss_gpus() > 0)):
            loaded.to_gpu()
        return loaded


def _build_ivf(vectors: np.ndarray, kind: str, nlist: int | None, nprobe: int | None,
               pq_m: int | None, seed: int) -> tuple[Any, dict[str, Any]]:
    import faiss

    n, dim = vectors.shape
    nlist = nlist or default_nlist(n)
    if not 1 <= nlist <= n:
        raise UserError(f"`nlist` {nlist} must be between 1 and the {n} gallery vectors; use "
                        f"fewer lists", param="nlist")
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf":
        ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index = ivf
    else:
        pq_m = pq_m or _default_pq_m(dim)
        if dim % pq_m:
            raise UserError(f"`pq_m` {pq_m} must divide the dimension {dim}", param="pq_m")
        ivf = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexRefineFlat(ivf)  # re-rank the PQ shortlist with exact vectors
        index.k_factor = 4
    ivf.cp.seed = seed
    ivf.cp.min_points_per_centroid = 1  # we choose the training sample size ourselves (below)
    if kind == "ivfpq":
        ivf.pq.cp.min_points_per_centroid = 1
    train = vectors
    if n > 64 * nlist:  # k-means needs ~40-256 points per list; more only costs time
        rng = np.random.default_rng(seed)
        train = vectors[np.sort(rng.choice(n, 64 * nlist, replace=False))]
    index.train(train)
    ivf.nprobe = nprobe or default_nprobe(nlist)
    if not 1 <= ivf.nprobe <= nlist:
        raise UserError(f"`nprobe` {ivf.nprobe} must be between 1 and nlist {nlist}", param="nprobe")
    # kept alive with the index: faiss holds only a raw pointer to the quantizer
    index.referenced_objects = [quantizer, ivf]
    return index, {"nlist": nlist, "nprobe": int(ivf.nprobe), "pq_m": pq_m, "hnsw_m": None}


def set_nprobe(index: CellIndex, nprobe: int) -> None:
    """Change how many IVF lists (or, for HNSW, efSearch candidates) a search visits."""
    import faiss

    if index.kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efSearch = nprobe
    else:
        faiss.extract_index_ivf(index.index).nprobe = nprobe
    index.meta["nprobe"] = nprobe


def _check_meta(meta: Any, index: Any, directory: Path) -> None:
    """meta.json agrees with index.faiss and has every field in the right form."""
    def refuse(what: str) -> UserError:
        return UserError(f"{directory / META_FILE}: {what}; the index was edited or damaged: "
                         f"rebuild it with ssl-blood index", param="index")

    if not isinstance(meta, dict):
        raise refuse("not a JSON object")
    for key, kind in {"dim": int, "ntotal": int, "kind": str, "gallery_ids": list,
                      "gallery_labels": list, "class_names": list, "identity": str,
                      "embedder": dict, "gallery_split": str}.items():
        if not isinstance(meta.get(key), kind):
            raise refuse(f"'{key}' missing or not a {kind.__name__}")
    if index.d != meta["dim"] or index.ntotal != meta["ntotal"]:
        raise refuse(f"{INDEX_FILE} holds {index.ntotal} x {index.d} vectors, {META_FILE} says "
                     f"{meta['ntotal']} x {meta['dim']}")
    if len(meta["gallery_ids"]) != meta["ntotal"] or len(meta["gallery_labels"]) != meta["ntotal"]:
        raise refuse("gallery ids or labels do not match the number of vectors")
    top = len(meta["class_names"]) if meta["class_names"] else float("inf")  # unnamed: any class
    if not all(isinstance(v, int) and -1 <= v < top for v in meta["gallery_labels"]):
        raise refuse("gallery labels outside -1..classes-1")
    if not all(isinstance(v, int) for v in meta["gallery_ids"]):
        raise refuse("gallery ids are not integers")

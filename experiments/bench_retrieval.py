"""Retrieval speed and scale, measured in one run on one machine.

Part 1, real embeddings (BloodMNIST test split as queries, train split as the gallery):
index build time and queries/s for exact cosine search with faiss on the CPU, faiss on the GPU
when the installed faiss has one, and torch matmul + topk on the torch device; then IVF-Flat
recall@10 against exact search on the same real features, for several nprobe.
Part 2, a synthetic 1,000,000-cell gallery: by default drawn from a kernel density estimate of
the real train features (so its neighbourhoods look like real cells'; the real test features are
the queries), or a mixture of Gaussian clusters (--synthetic gaussian): IVF-Flat recall@10 against
exact search and its speed-up over exact CPU search, for several nprobe.

    python experiments/bench_retrieval.py --embeddings runs/x/analysis/embeddings-model.npz
    python experiments/bench_retrieval.py --data-root ../shared/data   # random-init ResNet-18 features

Writes experiments/results/bench_retrieval.json (or --out). Targets: whole test split retrieved in
<= 5 ms on a GPU; IVF recall@10 >= 0.95 at >= 10x the exact CPU speed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable

import numpy as np
import torch

from ssl_blood.checkpoint import write_json
from ssl_blood.device import describe_device, resolve_device
from ssl_blood.embed import Embedder, Embeddings, embed_splits, l2_normalize
from ssl_blood.index import CellIndex, faiss_gpus


def best_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Fastest of `repeats` timed calls after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def real_embeddings(args) -> tuple[Embeddings, str]:
    if args.embeddings:
        return Embeddings.load(args.embeddings), f"file {args.embeddings}"
    from ssl_blood.data import load_split, resolve_source

    source = resolve_source(args.data_root)
    embedder = Embedder.baseline("random-init", load_split(source, "train"), "resnet18")
    return (embed_splits(embedder, source, ["train", "test"]),
            "random-init ResNet-18 features of BloodMNIST (real images, 512-d; no --embeddings given)")


def bench_real(emb: Embeddings, k: int, repeats: int, device: torch.device) -> dict:
    gallery, _, _ = emb.select("train")
    queries, _, _ = emb.select("test")
    out: dict = {"gallery": int(len(gallery)), "queries": int(len(queries)), "dim": int(gallery.shape[1]), "k": k}
    started = time.perf_counter()
    cpu = CellIndex.build(gallery, use_gpu=False)
    out["faiss_cpu_build_s"] = time.perf_counter() - started
    seconds = best_seconds(lambda: cpu.search(queries, k), repeats)
    out.update(faiss_cpu_search_s=seconds, faiss_cpu_queries_per_s=len(queries) / seconds)
    exact_positions = cpu.search(queries, k)[1]
    if faiss_gpus() > 0:
        started = time.perf_counter()
        gpu = CellIndex.build(gallery, use_gpu=True)
        out["faiss_gpu_build_s"] = time.perf_counter() - started
        seconds = best_seconds(lambda: gpu.search(queries, k), repeats)
        out.update(faiss_gpu_search_s=seconds, faiss_gpu_queries_per_s=len(queries) / seconds)
    else:
        out["faiss_gpu"] = "not measured: the installed faiss has no GPU support"

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    g = torch.nn.functional.normalize(torch.as_tensor(gallery, device=device), dim=1)
    q = torch.nn.functional.normalize(torch.as_tensor(queries, device=device), dim=1)
    seconds = best_seconds(lambda: torch.topk(q @ g.T, k, dim=1), repeats, sync)
    torch_positions = torch.topk(q @ g.T, k, dim=1).indices.cpu().numpy()
    out.update(torch_device=str(device), torch_search_s=seconds, torch_queries_per_s=len(queries) / seconds,
               torch_agrees_with_faiss=float((torch_positions[:, 0] == exact_positions[:, 0]).mean()))
    out["whole_test_split_ms"] = 1000 * min(v for key, v in out.items() if key.endswith("_search_s"))
    return out


def clustered_gallery(n: int, dim: int, clusters: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in chunks: the full noise matrix would double the memory
        stop = min(n, start + 100_000)
        out[start:stop] = centres[rng.integers(0, clusters, stop - start)]
        out[start:stop] += noise * rng.standard_normal((stop - start, dim), dtype=np.float32)
    return out


def ivf_sweep(gallery: np.ndarray, queries: np.ndarray, k: int, nlist: int, nprobes: list[int],
              repeats: int) -> dict:
    """Exact cosine search as the truth, then IVF-Flat recall@k and speed-up for each nprobe."""
    out: dict = {"gallery": int(len(gallery)), "dim": int(gallery.shape[1]), "queries": int(len(queries)),
                 "k": k, "threads": torch.get_num_threads()}
    started = time.perf_counter()
    exact = CellIndex.build(gallery, use_gpu=False)
    out["exact_build_s"] = time.perf_counter() - started
    exact_seconds = best_seconds(lambda: exact.search(queries, k), 1)
    truth = exact.search(queries, k)[1]
    out.update(exact_search_s=exact_seconds, exact_queries_per_s=len(queries) / exact_seconds)
    del exact
    started = time.perf_counter()
    ivf = CellIndex.build(gallery, kind="ivf", nlist=nlist, use_gpu=False)
    out.update(ivf_nlist=nlist, ivf_build_s=time.perf_counter() - started, sweep=[])
    for nprobe in (p for p in nprobes if p <= nlist):
        ivf.index.nprobe = nprobe
        seconds = best_seconds(lambda: ivf.search(queries, k), repeats)
        found = ivf.search(queries, k)[1]
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)]))
        out["sweep"].append({"nprobe": nprobe, "recall_at_10": recall, "search_s": seconds,
                             "speedup_vs_exact": exact_seconds / seconds})
    meeting = [s for s in out["sweep"] if s["recall_at_10"] >= 0.95]
    out["best_meeting_recall_0_95"] = max(meeting, key=lambda s: s["speedup_vs_exact"]) if meeting else None
    return out


def resampled_real_gallery(features: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, float]:
    """n points drawn from a kernel density estimate of real L2-normalised features: a random real
    feature plus isotropic Gaussian noise whose expected norm is the median 1-NN distance of the
    real set. Keeps the real features' geometry (which a Gaussian mixture does not) at 1M scale."""
    real = l2_normalize(features.astype(np.float32))
    probe = real[np.random.default_rng(seed).choice(len(real), min(2000, len(real)), replace=False)]
    distances = CellIndex.build(real, use_gpu=False).search(probe, 2)[0][:, 1]  # cosine similarity
    bandwidth = float(np.median(np.sqrt(np.maximum(0.0, 2 - 2 * distances))))
    sd = bandwidth / np.sqrt(real.shape[1])
    rng = np.random.default_rng(seed)
    out = np.empty((n, real.shape[1]), dtype=np.float32)
    for start in range(0, n, 100_000):  # in chunks: the full noise matrix would double the memory
        stop = min(n, start + 100_000)
        out[start:stop] = real[rng.integers(0, len(real), stop - start)]
        out[start:stop] += sd * rng.standard_normal((stop - start, real.shape[1]), dtype=np.float32)
    return out, bandwidth


def bench_ivf_resampled(emb: Embeddings, n: int, k: int, nlist: int, nprobes: list[int], repeats: int) -> dict:
    gallery, bandwidth = resampled_real_gallery(emb.select("train")[0], n, seed=0)
    queries = l2_normalize(emb.select("test")[0].astype(np.float32))
    return {"data": f"{n} draws from a Gaussian KDE of the real train features (L2-normalised, "
                    f"bandwidth = median 1-NN distance {bandwidth:.3f}); queries = the real test features",
            **ivf_sweep(gallery, queries, k, nlist, nprobes, repeats)}


def bench_ivf_synthetic(n: int, dim: int, clusters: int, noise: float, n_queries: int, k: int, nlist: int,
                        nprobes: list[int], repeats: int) -> dict:
    gallery = clustered_gallery(n, dim, clusters, noise, seed=0)
    rng = np.random.default_rng(1)
    queries = gallery[rng.choice(n, n_queries, replace=False)] + noise * rng.standard_normal(
        (n_queries, dim), dtype=np.float32)
    return {"data": f"mixture of {clusters} Gaussian clusters (centres N(0, I), noise sd {noise}); "
                    f"queries are gallery points plus fresh noise",
            **ivf_sweep(gallery, queries, k, nlist, nprobes, repeats)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embeddings", help="an embeddings.npz with train and test splits")
    parser.add_argument("--data-root", help="without --embeddings: embed BloodMNIST with a random-init ResNet-18")
    parser.add_argument("--device", default="auto", help="torch device for matmul + topk")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--synthetic-n", type=int, default=1_000_000, help="0 skips part 2")
    parser.add_argument("--synthetic", choices=["resampled", "gaussian"], default="resampled",
                        help="resampled: a KDE of the real features (their geometry at 1M scale); "
                             "gaussian: a mixture of Gaussian clusters (--clusters, --noise, --synthetic-dim)")
    parser.add_argument("--synthetic-dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=2000)
    # At sd 1.0 the clusters are far apart in 512-d and nprobe=1 already finds every neighbour (a
    # test IVF cannot fail); at 2.0 neighbourhoods straddle cells; at 3.0 the data is near-uniform.
    parser.add_argument("--noise", type=float, default=2.0, help="cluster sd (centres are N(0, I))")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--real-nlist", type=int, default=128, help="IVF lists for the real-feature sweep")
    parser.add_argument("--nprobes", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--out", default="experiments/results/bench_retrieval.json")
    args = parser.parse_args()

    device = resolve_device(args.device)
    emb, what = real_embeddings(args)
    result = {"device": describe_device(device), "cpu_cores": os.cpu_count(),
              "faiss_gpus": faiss_gpus(), "real_embeddings": what,
              "real": bench_real(emb, args.k, args.repeats, device)}
    print(json.dumps(result["real"]), flush=True)
    nprobes = [int(p) for p in args.nprobes.split(",")]
    # The same sweep on the real features (nlist ~ sqrt(gallery)): how hard real cell
    # neighbourhoods are for IVF, which says which synthetic noise level is the realistic one.
    result["real_ivf"] = ivf_sweep(emb.select("train")[0], emb.select("test")[0], args.k,
                                   args.real_nlist, nprobes, args.repeats)
    print(json.dumps({"real_ivf": result["real_ivf"]["sweep"]}), flush=True)
    if args.synthetic_n > 0 and args.synthetic == "resampled":
        result["synthetic_ivf"] = bench_ivf_resampled(emb, args.synthetic_n, args.k, args.nlist, nprobes,
                                                      args.repeats)
    elif args.synthetic_n > 0:
        result["synthetic_ivf"] = bench_ivf_synthetic(args.synthetic_n, args.synthetic_dim, args.clusters,
                                                      args.noise, args.queries, args.k, args.nlist,
                                                      nprobes, args.repeats)
    write_json(result, args.out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

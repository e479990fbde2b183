"""Retrieval speed, recall and memory, measured in one run on one machine.

Every timing uses the same method: one untimed call, then `--repeats` timed calls per method,
interleaved across the methods of a part (exact, then each approximate setting, round after
round), reported as median with min and max; speed-ups are ratios of medians.

Part 1, real embeddings (BloodMNIST test split as queries, train split as the gallery): exact
cosine search with faiss on the CPU, on the GPU when the installed faiss has one, and torch
matmul + topk on the torch device; IVF-Flat recall@10 against exact search for several nprobe.
Part 2, a 1,000,000-cell gallery drawn from a kernel density estimate of the real train
features (their geometry at scale; the real test features are the queries): exact search
against IVF-Flat (several lists), HNSW and IVF-PQ with exact re-ranking, each with build time,
index memory, recall@10 and speed-up over exact search, for several nprobe / efSearch.

    python experiments/bench_retrieval.py --embeddings runs/x/analysis/embeddings-model.npz

Writes experiments/results/bench_retrieval.json (or --out). Targets: whole test split in <= 5
ms on a GPU; at 1M cells on a CPU recall@10 >= 0.95 at >= 30x exact search.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

import numpy as np
import torch

from ssl_blood.device import describe_device, resolve_device
from ssl_blood.features.embeddings import Embedder, Embeddings, embed_splits, l2_normalize
from ssl_blood.features.index import CellIndex, faiss_gpus, set_nprobe
from ssl_blood.files import write_json


def interleaved(calls: dict[str, Callable[[], object]], repeats: int,
                sync: Callable[[], None] = lambda: None) -> dict[str, dict]:
    """Median, min and max seconds of each call, timed round-robin after one warm-up each."""
    for fn in calls.values():
        fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t)}
            for name, t in times.items()}


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / k for a, b in zip(found, truth)]))


def index_bytes(index: CellIndex) -> int:
    import faiss

    return int(len(faiss.serialize_index(index.index)))


def real_embeddings(args) -> tuple[Embeddings, str]:
    if args.embeddings:
        return Embeddings.load(args.embeddings), f"file {args.embeddings}"
    from ssl_blood.data import load_split, resolve_source

    source = resolve_source(args.data_root)
    embedder = Embedder.baseline("random-init", load_split(source, "train"), "resnet18")
    return (embed_splits(embedder, source, ["train", "test"]),
            "random-init ResNet-18 features of BloodMNIST (real images, 512-d; no --embeddings given)")


def bench_exact(gallery: np.ndarray, queries: np.ndarray, k: int, repeats: int, device: torch.device) -> dict:
    out: dict = {"gallery": int(len(gallery)), "queries": int(len(queries)), "dim": int(gallery.shape[1]), "k": k}
    cpu = CellIndex.build(gallery, use_gpu=False)
    calls = {"faiss_cpu": lambda: cpu.search(queries, k)}
    if faiss_gpus() > 0:
        gpu = CellIndex.build(gallery, use_gpu=True)
        calls["faiss_gpu"] = lambda: gpu.search(queries, k)
    else:
        out["faiss_gpu"] = "not measured: the installed faiss has no GPU support"
    g = torch.nn.functional.normalize(torch.as_tensor(gallery, device=device), dim=1)
    q = torch.nn.functional.normalize(torch.as_tensor(queries, device=device), dim=1)
    calls[f"torch_{device.type}"] = lambda: torch.topk(q @ g.T, k, dim=1)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    out["timings"] = interleaved(calls, repeats, sync)
    for name, t in out["timings"].items():
        t["queries_per_s"] = len(queries) / t["median_s"]
    torch_top1 = torch.topk(q @ g.T, 1, dim=1).indices.cpu().numpy()[:, 0]
    out["torch_agrees_with_faiss_top1"] = float((torch_top1 == cpu.search(queries, 1)[1][:, 0]).mean())
    out["whole_test_split_ms"] = 1000 * min(t["median_s"] for t in out["timings"].values())
    return out


def sweep(gallery: np.ndarray, queries: np.ndarray, k: int, repeats: int,
          configs: list[tuple[str, dict, list[int]]]) -> dict:
    """Exact search as truth and timing baseline; each (kind, build args, nprobes) built once,
    then every (kind, nprobe) timed interleaved with exact search."""
    out: dict = {"gallery": int(len(gallery)), "dim": int(gallery.shape[1]), "queries": int(len(queries)),
                 "k": k, "threads": torch.get_num_threads(), "indices": {}}
    started = time.perf_counter()
    exact = CellIndex.build(gallery, use_gpu=False)
    out["exact"] = {"build_s": time.perf_counter() - started, "bytes": index_bytes(exact)}
    truth = exact.search(queries, k)[1]
    built = {}
    for kind, build_args, _ in configs:
        name = f"{kind}" + "".join(f"-{k_}{v}" for k_, v in build_args.items())
        started = time.perf_counter()
        built[name] = CellIndex.build(gallery, kind=kind, use_gpu=False, **build_args)
        out["indices"][name] = {"kind": kind, **build_args, "build_s": time.perf_counter() - started,
                                "bytes": index_bytes(built[name]), "sweep": []}
        print(json.dumps({"built": name, "seconds": round(out["indices"][name]["build_s"], 1)}), flush=True)
    calls: dict[str, Callable[[], object]] = {"exact": lambda: exact.search(queries, k)}
    settings = {}
    for (kind, build_args, nprobes), name in zip(configs, built):
        for nprobe in nprobes:
            key = f"{name}@{nprobe}"

            def call(index=built[name], nprobe=nprobe):
                set_nprobe(index, nprobe)
                return index.search(queries, k)

            calls[key] = call
            settings[key] = (name, nprobe)
    timings = interleaved(calls, repeats)
    exact_s = timings["exact"]["median_s"]
    out["exact"].update(timings["exact"])
    for key, (name, nprobe) in settings.items():
        set_nprobe(built[name], nprobe)
        found = built[name].search(queries, k)[1]
        out["indices"][name]["sweep"].append({"nprobe": nprobe, "recall_at_10": recall(found, truth),
                                              **timings[key], "speedup_vs_exact": exact_s / timings[key]["median_s"]})
    meeting = [{"index": n, **s} for n, i in out["indices"].items() for s in i["sweep"]
               if s["recall_at_10"] >= 0.95]
    out["best_meeting_recall_0_95"] = max(meeting, key=lambda s: s["speedup_vs_exact"]) if meeting else None
    return out


def resampled_real_gallery(features: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, float]:
    """n points drawn from a kernel density estimate of real L2-normalised features: a random real
    feature plus isotropic Gaussian noise whose expected norm is the median 1-NN distance of the
    real set. Keeps the real features' geometry (which a Gaussian mixture does not) at 1M scale."""
    real = l2_normalize(features.astype(np.float32))
    probe = real[np.random.default_rng(seed).choice(len(real), min(2000, len(real)), replace=False)]
    similarity = CellIndex.build(real, use_gpu=False).search(probe, 2)[0][:, 1]
    bandwidth = float(np.median(np.sqrt(np.maximum(0.0, 2 - 2 * similarity))))
    sd = bandwidth / np.sqrt(real.shape[1])
    rng = np.random.default_rng(seed)
    out = np.empty((n, real.shape[1]), dtype=np.float32)
    for start in range(0, n, 100_000):  # in chunks: the full noise matrix would double the memory
        stop = min(n, start + 100_000)
        out[start:stop] = real[rng.integers(0, len(real), stop - start)]
        out[start:stop] += sd * rng.standard_normal((stop - start, real.shape[1]), dtype=np.float32)
    return out, bandwidth


def parse_configs(text: str) -> list[tuple[str, dict, list[int]]]:
    """"ivf:nlist=1024:8,16,32;hnsw::32,64,128" -> [(kind, build args, nprobes)]."""
    configs = []
    for part in filter(None, text.split(";")):
        kind, args, probes = part.split(":")
        build = {k: int(v) for k, v in (a.split("=") for a in filter(None, args.split(",")))}
        configs.append((kind, build, [int(p) for p in probes.split(",")]))
    return configs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embeddings", help="an embeddings.npz with train and test splits")
    parser.add_argument("--data-root", help="without --embeddings: embed BloodMNIST with a random-init ResNet-18")
    parser.add_argument("--device", default="auto", help="torch device for matmul + topk")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--real-configs", default="ivf:nlist=128:1,2,4,8,16,32,128")
    parser.add_argument("--synthetic-n", type=int, default=1_000_000, help="0 skips part 2")
    parser.add_argument("--configs", default=("ivf:nlist=1024:8,16,32;ivf:nlist=4096:8,16,32,64;"
                                              "hnsw::32,64,128;ivfpq:nlist=4096:16,32,64"),
                        help="part 2 indices: kind:build args:nprobes (HNSW: efSearch), ';'-separated")
    parser.add_argument("--out", default="experiments/results/bench_retrieval.json")
    args = parser.parse_args()

    device = resolve_device(args.device)
    emb, what = real_embeddings(args)
    gallery, queries = emb.select("train")[0], emb.select("test")[0]
    result = {"device": describe_device(device), "cpu_cores": os.cpu_count(), "faiss_gpus": faiss_gpus(),
              "real_embeddings": what, "timing": "median of interleaved repeats (min, max beside)",
              "real": bench_exact(gallery, queries, args.k, args.repeats, device)}
    print(json.dumps({"real": result["real"]["timings"]}), flush=True)
    result["real_ivf"] = sweep(gallery, queries, args.k, args.repeats, parse_configs(args.real_configs))
    write_json(result, args.out)
    if args.synthetic_n > 0:
        big, bandwidth = resampled_real_gallery(gallery, args.synthetic_n, seed=0)
        result["synthetic"] = {"data": f"{args.synthetic_n} draws from a Gaussian KDE of the real train "
                                       f"features (L2-normalised, bandwidth = median 1-NN distance "
                                       f"{bandwidth:.3f}); queries = the real test features",
                               **sweep(big, l2_normalize(queries), args.k, args.repeats,
                                       parse_configs(args.configs))}
    write_json(result, args.out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

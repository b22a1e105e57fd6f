"""Gallery search benchmark: exact ``IndexFlatIP`` vs ``IndexHNSWFlat`` (inner product).

The service's k-NN gallery stores L2-normalised DINO embeddings and ranks them by cosine similarity
(inner product). This script measures, for each gallery size:

* build time (``add``; plus graph construction for HNSW),
* recall@k of HNSW against the exact flat search, for several ``efSearch`` values,
* single-query latency p50/p99 (one ``search`` call per query, as one HTTP request would do),
* batched throughput (all queries in one ``search`` call).

Uniform random unit vectors are a poor proxy for real embeddings (in 384-d they are all nearly
orthogonal, so the "nearest neighbours" are noise and HNSW recall means little). The data here is a
Gaussian mixture on the sphere: ``--clusters`` random unit centres, each point a centre plus isotropic
noise (a per-cluster spread), re-normalised. Queries come from the same mixture, so every query has a
real neighbourhood, like an image of a class that the gallery holds. The default spread (noise norm
1.0-2.0, i.e. cosine to the own centre ~0.45-0.7) is chosen so that HNSW at small ``efSearch`` does
*not* reach recall 1.0; with tighter clusters (``--spread 0.6,1.0``) every setting is ~1.0 and the
recall column says nothing.

Usage::

    .venv/bin/python benchmarks/faiss_search.py                       # 100k and 1M (1M HNSW build: minutes)
    .venv/bin/python benchmarks/faiss_search.py --sizes 100000 --ef-search 16,64,256

Writes ``benchmarks/results/faiss_search.json`` (``--out``) after every size, so a long run that is
interrupted keeps the sizes already measured.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.machine import machine_info as shared_machine_info  # noqa: E402

try:
    import faiss
except ImportError:  # pragma: no cover - the serve extra provides faiss-cpu
    sys.exit("faiss is not installed: pip install '.[serve]' (faiss-cpu)")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "faiss_search.json"


# --------------------------------------------------------------------------------------------- data
def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_mixture(
    n: int, centres: np.ndarray, spreads: np.ndarray, rng: np.random.Generator, chunk: int = 100_000
) -> np.ndarray:
    """``n`` unit vectors: a random centre plus Gaussian noise of that centre's spread, normalised.

    ``spreads[c]`` is the expected norm of the noise added to centre ``c`` (the centres have norm 1),
    so a spread of 0.8 puts a point's cosine to its own centre near 1/sqrt(1+0.8^2) ~ 0.78.
    Built in chunks so that the 1M x 384 float32 gallery (1.5 GB) needs no float64 temporaries.
    """
    n_clusters, dim = centres.shape
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        labels = rng.integers(0, n_clusters, size=stop - start)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32)
        noise *= (spreads[labels] / np.sqrt(dim)).astype(np.float32)[:, None]
        noise += centres[labels]
        out[start:stop] = _normalise(noise)
    return out


# ------------------------------------------------------------------------------------------ timing
def single_query_latency(index, queries: np.ndarray, k: int) -> dict:
    """Search one query per call (what a single HTTP request does); p50/p99/mean in milliseconds."""
    index.search(queries[:1], k)  # warm-up (allocations, first-touch of pages)
    times = np.empty(len(queries))
    for i in range(len(queries)):
        q = queries[i : i + 1]
        t0 = time.perf_counter()
        index.search(q, k)
        times[i] = time.perf_counter() - t0
    ms = times * 1e3
    return {
        "n": int(len(queries)),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "qps_single": float(len(queries) / times.sum()),
    }


def batched(index, queries: np.ndarray, k: int, repeats: int = 1) -> tuple[dict, np.ndarray]:
    """All queries in one ``search`` call; the best of ``repeats`` runs (the machine is shared)."""
    best, ids = float("inf"), None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        _, ids = index.search(queries, k)
        best = min(best, time.perf_counter() - t0)
    return {"n": int(len(queries)), "seconds": best, "qps": float(len(queries) / best)}, ids


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of |found[:k] ∩ truth[:k]| / k (the flat search is the ground truth)."""
    hits = 0
    for f, t in zip(found[:, :k], truth[:, :k], strict=True):
        hits += len(np.intersect1d(f, t, assume_unique=True))
    return hits / (k * len(truth))


def rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------ machine
def machine_info(threads: int) -> dict:
    """The shared machine description plus FAISS's version, build options and threads."""
    return {
        **shared_machine_info(),
        "faiss_version": faiss.__version__,
        "faiss_compile_options": faiss.get_compile_options() if hasattr(faiss, "get_compile_options") else None,
        "numpy_version": np.__version__,
        "omp_threads": threads,
    }


# --------------------------------------------------------------------------------------------- run
def bench_size(n: int, args, centres, spreads, queries, rng) -> dict:
    dim, k = args.dim, args.k
    lat_q = queries[: args.latency_queries]
    print(f"\n== gallery {n:,} x {dim} (clusters={len(centres)}) ==", flush=True)
    t0 = time.perf_counter()
    gallery = make_mixture(n, centres, spreads, rng)
    print(f"  data generated in {time.perf_counter() - t0:.1f}s", flush=True)

    rows: list[dict] = []

    # ---- exact flat
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(gallery)
    flat_build = time.perf_counter() - t0
    flat_batch, truth = batched(flat, queries, k, repeats=args.repeats)
    flat_lat = single_query_latency(flat, lat_q, k)
    rows.append(
        {
            "index": "IndexFlatIP",
            "params": {},
            "build_s": flat_build,
            "recall_at_k": 1.0,
            "single": flat_lat,
            "batch": flat_batch,
            "index_bytes_est": int(n * dim * 4),
        }
    )
    _print_row(rows[-1], k)
    del flat  # the shared machine: keep the peak at gallery + one index

    # ---- HNSW
    rss0 = rss_mb()
    hnsw = faiss.IndexHNSWFlat(dim, args.M, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = args.ef_construction
    print(f"  building HNSW (M={args.M}, efConstruction={args.ef_construction}) ...", flush=True)
    t0 = time.perf_counter()
    hnsw.add(gallery)
    hnsw_build = time.perf_counter() - t0
    rss1 = rss_mb()
    print(f"  HNSW built in {hnsw_build:.1f}s", flush=True)
    # level-0 graph: 2*M neighbour ids (int32) per vector; upper levels add ~1/M more
    graph_bytes_est = int(n * 2 * args.M * 4 * (1 + 1 / args.M))
    for ef in args.ef_search:
        hnsw.hnsw.efSearch = ef
        batch, ids = batched(hnsw, queries, k, repeats=args.repeats)
        rows.append(
            {
                "index": "IndexHNSWFlat",
                "params": {"M": args.M, "efConstruction": args.ef_construction, "efSearch": ef},
                "build_s": hnsw_build,
                "recall_at_k": recall_at_k(ids, truth, k),
                "single": single_query_latency(hnsw, lat_q, k),
                "batch": batch,
                "index_bytes_est": int(n * dim * 4) + graph_bytes_est,
            }
        )
        _print_row(rows[-1], k)

    result = {
        "n": n,
        "rows": rows,
        "rss_mb_hnsw_build_delta": (rss1 - rss0) if rss0 and rss1 else None,
    }
    del hnsw, gallery
    return result


HEADER = (
    f"{'n':>9} {'index':<14} {'efS':>5} {'build_s':>8} {'recall@k':>9} {'p50_ms':>8} {'p99_ms':>8} {'batch_qps':>10}"
)


def _fmt_row(n: int, row: dict) -> str:
    ef = row["params"].get("efSearch", "-")
    return (
        f"{n:>9,} {row['index']:<14} {ef!s:>5} {row['build_s']:>8.2f} {row['recall_at_k']:>9.4f} "
        f"{row['single']['p50_ms']:>8.3f} {row['single']['p99_ms']:>8.3f} {row['batch']['qps']:>10.0f}"
    )


def _print_row(row: dict, k: int) -> None:
    ef = row["params"].get("efSearch", "-")
    print(
        f"  {row['index']:<14} efSearch={ef!s:<4} build={row['build_s']:.2f}s recall@{k}={row['recall_at_k']:.4f} "
        f"p50={row['single']['p50_ms']:.3f}ms p99={row['single']['p99_ms']:.3f}ms "
        f"batch={row['batch']['qps']:.0f} q/s",
        flush=True,
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated gallery sizes (default: 100000,1000000)")
    p.add_argument("--dim", type=int, default=384, help="embedding dimension (384 = ViT-S, 768 = ViT-B)")
    p.add_argument("--queries", type=int, default=1000, help="queries for recall and batched throughput")
    p.add_argument("--latency-queries", type=int, default=200, help="queries for the single-query latency loop")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--M", type=int, default=32, help="HNSW graph degree")
    p.add_argument("--ef-construction", type=int, default=40)
    p.add_argument("--ef-search", default="16,64,128", help="comma-separated efSearch values")
    p.add_argument("--clusters", type=int, default=1000, help="Gaussian-mixture centres")
    p.add_argument(
        "--spread",
        default="1.0,2.0",
        help="min,max noise norm per cluster (uniform); larger = harder for HNSW (default 1.0,2.0)",
    )
    p.add_argument("--threads", type=int, default=0, help="OpenMP threads (0 = the CPUs this process may use)")
    p.add_argument("--repeats", type=int, default=2, help="batched search repeats (best is kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.ef_search = [int(s) for s in args.ef_search.split(",") if s]
    lo, hi = (float(s) for s in args.spread.split(","))
    args.spread = (lo, hi)
    if args.latency_queries > args.queries:
        p.error("--latency-queries must be <= --queries")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    faiss.omp_set_num_threads(threads)
    info = machine_info(threads)
    print(
        f"faiss {info['faiss_version']} | {info['cpu_model']} | {info['cpus_usable']} usable CPUs | "
        f"omp threads {threads} | load {info['loadavg_at_start']}",
        flush=True,
    )

    rng = np.random.default_rng(args.seed)
    centres = _normalise(rng.standard_normal((args.clusters, args.dim), dtype=np.float32))
    spreads = rng.uniform(*args.spread, size=args.clusters).astype(np.float32)
    queries = make_mixture(args.queries, centres, spreads, rng)

    report = {
        "benchmark": "faiss_search",
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": info,
        "config": {
            "dim": args.dim,
            "queries": args.queries,
            "latency_queries": args.latency_queries,
            "k": args.k,
            "metric": "inner_product (L2-normalised vectors = cosine)",
            "data": f"Gaussian mixture on the unit sphere: {args.clusters} centres, noise norm "
            f"U{list(args.spread)} per cluster, seed {args.seed}",
            "hnsw": {"M": args.M, "efConstruction": args.ef_construction, "efSearch": args.ef_search},
            "batched_repeats": args.repeats,
        },
        "results": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for n in args.sizes:
        report["results"].append(bench_size(n, args, centres, spreads, queries, rng))
        report["finished"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        report["machine"]["loadavg_at_end"] = list(os.getloadavg())
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(
        f"\nrecall@{args.k} vs exact flat; latency = one query per search() call over "
        f"{args.latency_queries} queries; batch_qps = {args.queries} queries in one call; "
        f"{threads} OpenMP threads"
    )
    print(HEADER)
    print("-" * len(HEADER))
    for res in report["results"]:
        for row in res["rows"]:
            print(_fmt_row(res["n"], row))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

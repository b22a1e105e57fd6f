"""Gallery backends side by side, through the service's own ``Gallery`` interface (``service/gallery/base.py``).

Backends (``--backends``, in this order by default):

* ``faiss-flat``: ``EmbeddingIndex`` in memory (folder None), index_type "flat" (exact ``IndexFlatIP``);
* ``faiss-hnsw``: the same class, index_type "hnsw" (M ``--M``, efSearch ``--ef-search``, efConstruction
  per size, see ``--ef-construction``);
* ``milvus-lite``: ``MilvusGallery`` on a Milvus Lite ``.db`` folder in a temporary directory. milvus-lite 3
  runs its gRPC server in threads of *this* process (pure Python + FAISS), so the client and the engine
  share one interpreter;
* ``milvus-server``: ``MilvusGallery("http://127.0.0.1:P")`` against ``milvus-lite server`` started (and
  stopped) by this script with ``tests.service.milvus_server.MilvusLiteServer``, as the service tests do:
  the same engine in a process of its own, one gRPC worker.

Both Milvus backends use ``--milvus-index`` (default HNSW, the service's ``DINO_MILVUS_INDEX_TYPE``
default, with the same M / efConstruction / ef as FAISS; FLAT, IVF_FLAT and AUTOINDEX also work; milvus-lite 3
builds HNSW with FAISS, one graph per segment of at most 100k rows). pymilvus 3 sends index build parameters as
separate keys, but milvus-lite 3.2 only reads them from a ``params`` key and otherwise builds HNSW with its
own defaults (M 16, efConstruction 200), whatever ``DINO_HNSW_M`` / ``DINO_HNSW_EF_CONSTRUCTION`` say. So that
the rows compare equal graphs, this script also passes them under ``params`` (what
``DINO_MILVUS_INDEX_PARAMS='{"params": {"M": 32, "efConstruction": 200}}'`` does for the service);
``--no-lite-params-fix`` measures the service's default behaviour. Each row records the parameters
Milvus Lite actually recorded for its index (``milvus_index_spec``).

Data: the clustered 384-d unit vectors of ``benchmarks/faiss_search.py`` (its ``make_mixture``, same seed,
centres, spreads and queries, same draw order: each size is drawn after the ones before it in the same run, so
``--sizes 100000,1000000`` holds the very vectors of ``faiss_search.py``'s defaults; a 1M gallery drawn in a run
of its own is another sample of the same mixture). Queries: ``--queries`` from the same mixture; ground truth:
exact inner-product top-k (``faiss.knn``), once per size.

For each size and backend:

* **add**: ``Gallery.add(embeddings)`` in batches of ``--batch`` (no labels, metadata or images; new ids,
  as an HTTP add), vectors/s. FAISS HNSW builds its graph inside ``add``. A backend whose adding passes
  ``--add-budget-s`` is cut there and measured on what it holds (ground truth recomputed for that prefix);
* **ready**: what a backend needs after the last add before its index covers everything. FAISS: nothing.
  Milvus: ``first_search_ms`` is the first search right after the last add and ``unflushed_search`` the
  first 10 (Strong consistency: the answers are already complete, but rows still in Milvus Lite's
  memtable are searched by brute force in Python, and segments without an index yet by NumPy), then a
  flush (pymilvus ``flush`` through the gallery's client: the ``Gallery`` interface has none, and Milvus
  Lite flushes on its own only when its memtable reaches 128 MB or its WAL 256 MB) and the wait until
  every segment has its index (Milvus Lite builds them in a background thread; ``GetIndexState`` always
  says Finished, so the script watches the index files in the data folder, up to ``--index-wait-s``).
  ``ready_s`` = flush + index wait;
* **search**: ``Gallery.search(query, k)`` one query per call (what one HTTP request does), after one
  untimed warm-up; p50/p99 in ms, stopped after ``--search-budget-s`` (the row says how many queries ran);
* **recall@k** of those searches against the exact top-k.

Usage::

    .venv/bin/python benchmarks/gallery_backends.py --sizes 5000 --queries 100 --out /tmp/smoke.json  # smoke
    .venv/bin/python benchmarks/gallery_backends.py --sizes 100000                   # all backends at 100k
    .venv/bin/python benchmarks/gallery_backends.py --sizes 1000000 --merge          # add 1M to that JSON

Writes ``benchmarks/results/gallery_backends.json`` (``--out``) after every backend, so an interrupted
run keeps the rows already measured; ``--merge`` keeps the other sizes already in that file.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import faiss
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.faiss_search import _normalise, make_mixture  # noqa: E402
from benchmarks.machine import machine_info as shared_machine_info  # noqa: E402
from benchmarks.process_stats import PeakSampler, rss_mb  # noqa: E402
from service.gallery.base import Gallery  # noqa: E402
from service.gallery.faiss_store import EmbeddingIndex  # noqa: E402
from service.gallery.milvus_schema import DEFAULT_INDEX_PARAMS, VECTOR_FIELD  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "gallery_backends.json"
BACKENDS = ("faiss-flat", "faiss-hnsw", "milvus-lite", "milvus-server")
#: a fake model identity: the galleries only compare it with itself
MODEL_SHA256 = "0" * 64
MODEL_NAME = "bench"
#: efConstruction below / from this size when --ef-construction is not given (the service default 200
#: takes about an hour to build a 1M HNSW graph on the 2-CPU machine these numbers come from)
LARGE_SIZE = 1_000_000
EF_CONSTRUCTION_SMALL = 200
EF_CONSTRUCTION_LARGE = 40
#: seconds between two looks at a Milvus data folder while its indexes are built, and how many equal
#: looks in a row (every segment indexed, same segments) count as finished
INDEX_POLL_S = 1.0
INDEX_STABLE_POLLS = 3
#: searches timed right after the last add, before the flush (Milvus only)
UNFLUSHED_QUERIES = 10


# ------------------------------------------------------------------------------------------ helpers
def exact_top_k(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of the exact inner-product top-k of every query (no index copy of the gallery)."""
    _, rows = faiss.knn(queries, gallery, k, metric=faiss.METRIC_INNER_PRODUCT)
    return rows


def recall_at_k(found: list[list[int]], truth: np.ndarray, k: int) -> float:
    """Mean over the searched queries of |found[:k] ∩ truth[:k]| / k."""
    hits = sum(len(set(f[:k]) & set(t[:k].tolist())) for f, t in zip(found, truth, strict=False))
    return hits / (k * len(found)) if found else float("nan")


def percentiles_ms(seconds: list[float]) -> dict[str, float | int | None]:
    if not seconds:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "mean_ms": None}
    ms = np.asarray(seconds) * 1e3
    return {
        "n": len(seconds),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
    }


def milvus_segments(root: Path) -> tuple[list[str], int]:
    """(the data files of every Milvus Lite segment under ``root``, how many have no index file of the
    vector field yet). Milvus Lite writes ``<segment>.<field>.<index type>.idx`` next to ``data/``."""
    names: list[str] = []
    missing = 0
    for data_file in sorted(root.glob("**/partitions/*/data/*.parquet")):
        names.append(str(data_file.relative_to(root)))
        index_dir = data_file.parent.parent / "indexes"
        if not any(index_dir.glob(f"{data_file.stem}.{VECTOR_FIELD}.*.idx")):
            missing += 1
    return names, missing


def wait_indexed(root: Path, timeout: float) -> dict[str, Any]:
    """Wait until every segment under ``root`` has its index and the segment list stopped changing
    (INDEX_STABLE_POLLS looks in a row), at most ``timeout`` seconds."""
    t0 = time.perf_counter()
    previous: list[str] | None = None
    stable, done_at = 0, None
    while True:
        names, missing = milvus_segments(root)
        if missing == 0:
            stable = stable + 1 if names == previous else 1
            if stable == 1:
                done_at = time.perf_counter() - t0
        else:
            stable, done_at = 0, None
        previous = names
        if stable >= INDEX_STABLE_POLLS:
            return {"finished": True, "wait_s": done_at, "segments": len(names), "unindexed": 0}
        if time.perf_counter() - t0 > timeout:
            return {"finished": False, "wait_s": time.perf_counter() - t0, "segments": len(names), "unindexed": missing}
        time.sleep(INDEX_POLL_S)


def milvus_index_spec(root: Path) -> dict[str, Any] | None:
    """The vector index as Milvus Lite recorded it in the collection's manifest (what it builds with)."""
    for manifest in root.glob("collections/*/manifest.json"):
        spec = json.loads(manifest.read_text()).get("index_specs", {}).get(VECTOR_FIELD)
        if spec is not None:
            return dict(spec)
    return None


def package_version(name: str) -> str | None:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------ backends
class Opened:
    """An open gallery with what the benchmark needs around it (data folder, server, index label)."""

    def __init__(self, gallery: Gallery, index: str, data_dir: Path | None = None, server: Any = None):
        self.gallery, self.index, self.data_dir, self.server = gallery, index, data_dir, server

    def close(self) -> None:
        close: Callable[[], None] | None = getattr(self.gallery, "close", None)
        if close is not None:
            close()
        if self.server is not None:
            self.server.stop()


def open_backend(name: str, tmp: Path, args: argparse.Namespace, ef_construction: int) -> Opened:
    hnsw = {"hnsw_m": args.M, "hnsw_ef_construction": ef_construction, "hnsw_ef_search": args.ef_search}
    if name in ("faiss-flat", "faiss-hnsw"):
        index_type = "flat" if name == "faiss-flat" else "hnsw"
        gallery = EmbeddingIndex(
            None, dim=args.dim, model_sha256=MODEL_SHA256, model_name=MODEL_NAME, index_type=index_type, **hnsw
        )
        return Opened(gallery, "IndexFlatIP" if index_type == "flat" else "IndexHNSWFlat")

    from service.gallery.milvus_store import MilvusGallery

    index_params = dict(args.milvus_index_params or {})
    if args.lite_params_fix and args.milvus_index == "HNSW":
        # pymilvus 3 sends build parameters as separate keys; milvus-lite 3.2 reads only a "params" JSON key
        # and otherwise builds with its defaults (M 16, efConstruction 200): give it that key as well
        build = {"M": args.M, "efConstruction": ef_construction}
        build.update({key: value for key, value in index_params.items() if key != "params"})
        index_params["params"] = build
    options: dict[str, Any] = dict(
        dim=args.dim,
        model_sha256=MODEL_SHA256,
        model_name=MODEL_NAME,
        index_type=args.milvus_index,
        index_params=index_params or None,
        timeout=args.milvus_timeout,
        **hnsw,
    )
    if name == "milvus-lite":
        data_dir = tmp / "gallery.db"
        return Opened(MilvusGallery(str(data_dir), **options), args.milvus_index, data_dir)

    from tests.service.milvus_server import MilvusLiteServer

    data_dir = tmp / "milvus-data"
    server = MilvusLiteServer(data_dir, tmp / "milvus.log").start()
    try:
        return Opened(MilvusGallery(server.uri, **options), args.milvus_index, data_dir, server)
    except BaseException:
        server.stop()
        raise


def flush(opened: Opened) -> None:
    """pymilvus' flush of the gallery's collection, through the gallery's own client and error handling."""
    gallery: Any = opened.gallery
    gallery._call(lambda client: client.flush(gallery.collection, timeout=gallery.timeout))


def run_backend(
    name: str,
    gallery_vectors: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    args: argparse.Namespace,
    ef_construction: int,
) -> dict[str, Any]:
    n, k = len(gallery_vectors), args.k
    tmp = Path(tempfile.mkdtemp(prefix=f"gallery_bench_{name}_", dir=args.tmp_dir))
    notes: list[str] = []
    sampler = PeakSampler(os.getpid(), interval=0.5)
    sampler.start()
    rss_start = rss_mb(os.getpid())
    opened: Opened | None = None
    row: dict[str, Any] = {"backend": name, "n_requested": n, "notes": notes}
    try:
        t0 = time.perf_counter()
        opened = open_backend(name, tmp, args, ef_construction)
        open_s = time.perf_counter() - t0
        gallery = opened.gallery
        is_milvus = name.startswith("milvus")
        print(f"  [{name}] opened in {open_s:.1f}s ({opened.index}); adding {n:,} in batches of {args.batch:,}")

        # ---- add
        row_of: dict[str, int] = {}
        added = 0
        t0 = time.perf_counter()
        next_report = t0 + 30
        for start in range(0, n, args.batch):
            if time.perf_counter() - t0 > args.add_budget_s:
                notes.append(f"add cut after {args.add_budget_s:.0f}s (--add-budget-s) at {added:,} of {n:,} vectors")
                break
            stop = min(start + args.batch, n)
            ids = gallery.add(gallery_vectors[start:stop])
            row_of.update(zip(ids, range(start, stop), strict=True))
            added = stop
            if time.perf_counter() > next_report:
                rate = added / (time.perf_counter() - t0)
                print(f"    {added:,} added, {rate:,.0f}/s", flush=True)
                next_report = time.perf_counter() + 30
        add_s = time.perf_counter() - t0
        print(f"  [{name}] {added:,} added in {add_s:.1f}s ({added / add_s:,.0f}/s)", flush=True)
        if added < n:  # measure against the exact answer for what the gallery holds
            truth = exact_top_k(queries, gallery_vectors[:added], k)

        # ---- ready: Milvus flush + background index build
        first_ms = unflushed = flush_s = None
        index_wait: dict[str, Any] | None = None
        if is_milvus:
            times = []
            for q in queries[:UNFLUSHED_QUERIES]:
                t1 = time.perf_counter()
                gallery.search(q, k)
                times.append(time.perf_counter() - t1)
            first_ms, unflushed = times[0] * 1e3, percentiles_ms(times)
            t1 = time.perf_counter()
            flush(opened)
            flush_s = time.perf_counter() - t1
            assert opened.data_dir is not None
            index_wait = wait_indexed(opened.data_dir, args.index_wait_s)
            if not index_wait["finished"]:
                notes.append(
                    f"index build not finished after {args.index_wait_s:.0f}s (--index-wait-s): "
                    f"{index_wait['unindexed']} of {index_wait['segments']} segments searched without index"
                )
            print(
                f"  [{name}] first search {first_ms:.1f}ms (unflushed p50 {unflushed['p50_ms']:.1f}ms); "
                f"flush {flush_s:.1f}s; index wait {index_wait['wait_s']:.1f}s "
                f"({index_wait['segments']} segments, finished={index_wait['finished']})",
                flush=True,
            )
        ready_s = (flush_s or 0.0) + (index_wait["wait_s"] if index_wait else 0.0)

        # ---- search, one query per call
        gallery.search(queries[0], k)  # warm-up
        times, found = [], []
        t0 = time.perf_counter()
        for q in queries:
            if time.perf_counter() - t0 > args.search_budget_s:
                notes.append(
                    f"search loop stopped after {args.search_budget_s:.0f}s (--search-budget-s): "
                    f"{len(times)} of {len(queries)} queries"
                )
                break
            t1 = time.perf_counter()
            hits = gallery.search(q, k)
            times.append(time.perf_counter() - t1)
            found.append([row_of[h.id] for h in hits])
        latency = percentiles_ms(times)
        spec = milvus_index_spec(opened.data_dir) if opened.data_dir is not None else None
        recall = recall_at_k(found, truth, k)
        server_rss = rss_mb(opened.server.process.pid) if opened.server is not None else None
        size_seen = gallery.info()["size"]
        if size_seen != added:
            notes.append(f"gallery reports {size_seen} images, {added} were added")
        row.update(
            {
                "index": opened.index,
                "params": _index_params(name, args, ef_construction, spec),
                "milvus_index_spec": spec,
                "n_requested": n,
                "n_added": added,
                "open_s": open_s,
                "add_s": add_s,
                "add_per_s": added / add_s,
                "first_search_ms": first_ms,
                "unflushed_search": unflushed,
                "flush_s": flush_s,
                "index_wait": index_wait,
                "ready_s": ready_s,
                "time_to_searchable_s": add_s + ready_s,
                "search": latency,
                "recall_at_k": recall,
                "rss_start_mb": rss_start,
                "milvus_server_rss_mb": server_rss,
            }
        )
        print(
            f"  [{name}] p50 {latency['p50_ms']:.2f}ms p99 {latency['p99_ms']:.2f}ms over {latency['n']} queries; "
            f"recall@{k} {recall:.4f}",
            flush=True,
        )
    except Exception as exc:  # one backend failing must not lose the others
        logging.getLogger(__name__).exception("backend %s failed", name)
        row.update(index=opened.index if opened else None, error=f"{type(exc).__name__}: {exc}"[:500])
    finally:
        if opened is not None:
            opened.close()
        opened = None
        gc.collect()
        sampler.stop()
        row["peak_rss_mb"] = sampler.peak  # this process and its children (the Milvus server)
        shutil.rmtree(tmp, ignore_errors=True)
    return row


def _index_params(
    name: str, args: argparse.Namespace, ef_construction: int, spec: dict[str, Any] | None
) -> dict[str, Any]:
    """The index parameters in effect: FAISS's as configured, Milvus Lite's as its manifest records them."""
    if name == "faiss-flat":
        return {}
    if name == "faiss-hnsw":
        return {"M": args.M, "efConstruction": ef_construction, "efSearch": args.ef_search}
    params = dict((spec or {}).get("build_params") or {})
    if args.milvus_index == "HNSW":  # Milvus Lite's defaults where nothing reached it
        params = {"M": params.get("M", 16), "efConstruction": params.get("efConstruction", 200)}
        params["efSearch"] = args.ef_search
    return params


# ------------------------------------------------------------------------------------------ report
COLUMNS = (
    "n",
    "backend",
    "index",
    "M / efC / efS",
    "added",
    "add/s",
    "add s",
    "ready s",
    "1st query ms",
    "p50 ms",
    "p99 ms",
    "recall@k",
    "queries",
    "peak RSS MB",
)


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table_row(row: dict[str, Any]) -> str:
    if "error" in row:
        cells = [f"{row['n_requested']:,}", row["backend"], str(row.get("index") or "-"), "-", "FAILED"]
        cells += [row["error"][:80]] + ["-"] * (len(COLUMNS) - 6)
        return "| " + " | ".join(cells) + " |"
    search = row["search"]
    cells = [
        f"{row['n_requested']:,}",
        row["backend"],
        row["index"],
        "/".join(str(row["params"][key]) for key in ("M", "efConstruction", "efSearch"))
        if "M" in row["params"]
        else "-",
        f"{row['n_added']:,}",
        f"{row['add_per_s']:,.0f}",
        f"{row['add_s']:.1f}",
        f"{row['ready_s']:.1f}",
        _cell(row["first_search_ms"], ".1f"),
        _cell(search["p50_ms"], ".2f"),
        _cell(search["p99_ms"], ".2f"),
        f"{row['recall_at_k']:.4f}",
        str(search["n"]),
        _cell(row.get("peak_rss_mb"), ",.0f"),
    ]
    return "| " + " | ".join(cells) + " |"


def print_table(results: list[dict[str, Any]], k: int) -> None:
    print()
    print("| " + " | ".join(c.replace("@k", f"@{k}") for c in COLUMNS) + " |")
    print("|" + "|".join("---" for _ in COLUMNS) + "|")
    for res in results:
        for row in res["rows"]:
            print(table_row(row))
    notes = [(res["n"], row["backend"], note) for res in results for row in res["rows"] for note in row["notes"]]
    if notes:
        print()
        for n, backend, note in notes:
            print(f"- {n:,} {backend}: {note}")


# ------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated gallery sizes (default: 100000,1000000)")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, any of {', '.join(BACKENDS)}")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=1000, help="queries (single-query latency and recall)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=2000, help="vectors per Gallery.add call")
    p.add_argument("--M", type=int, default=32, help="HNSW graph degree (FAISS and Milvus)")
    p.add_argument("--ef-search", type=int, default=128, help="HNSW efSearch / ef (FAISS and Milvus)")
    p.add_argument(
        "--ef-construction",
        default=None,
        help=f"HNSW efConstruction: one value, or one per size; default {EF_CONSTRUCTION_SMALL} below "
        f"{LARGE_SIZE:,} and {EF_CONSTRUCTION_LARGE} from there (a 1M build at 200 takes about an hour here)",
    )
    p.add_argument(
        "--milvus-index", default="HNSW", choices=list(DEFAULT_INDEX_PARAMS), help="Milvus index type (default HNSW)"
    )
    p.add_argument(
        "--milvus-index-params",
        type=json.loads,
        default=None,
        help="JSON build parameters of the Milvus index (DINO_MILVUS_INDEX_PARAMS), merged over the defaults",
    )
    p.add_argument(
        "--no-lite-params-fix",
        dest="lite_params_fix",
        action="store_false",
        help="send the HNSW build parameters only the way the service does (see the module docstring)",
    )
    p.add_argument("--milvus-timeout", type=float, default=300.0, help="seconds one Milvus call may take")
    p.add_argument("--add-budget-s", type=float, default=1800.0, help="cut a backend's adding after this long")
    p.add_argument("--index-wait-s", type=float, default=900.0, help="longest wait for Milvus' index build")
    p.add_argument("--search-budget-s", type=float, default=120.0, help="stop a backend's query loop after this long")
    p.add_argument("--clusters", type=int, default=1000, help="Gaussian-mixture centres (as faiss_search.py)")
    p.add_argument("--spread", default="1.0,2.0", help="min,max noise norm per cluster (as faiss_search.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads (0 = the CPUs this process may use)")
    p.add_argument("--tmp-dir", type=Path, default=None, help="where the Milvus data folders go (default: $TMPDIR)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--merge", action="store_true", help="keep the results of other sizes already in --out")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(args.backends) - set(BACKENDS))
    if unknown:
        p.error(f"unknown backends {unknown}; choose from {list(BACKENDS)}")
    if args.ef_construction is None:
        args.ef_construction = [EF_CONSTRUCTION_LARGE if n >= LARGE_SIZE else EF_CONSTRUCTION_SMALL for n in args.sizes]
    else:
        values = [int(s) for s in args.ef_construction.split(",") if s]
        if len(values) == 1:
            values *= len(args.sizes)
        if len(values) != len(args.sizes):
            p.error("--ef-construction takes one value or one per size")
        args.ef_construction = values
    lo, hi = (float(s) for s in args.spread.split(","))
    args.spread = (lo, hi)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    faiss.omp_set_num_threads(threads)
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    info = {
        **shared_machine_info(),
        "faiss_version": faiss.__version__,
        "numpy_version": np.__version__,
        "pymilvus_version": package_version("pymilvus"),
        "milvus_lite_version": package_version("milvus-lite"),
        "omp_threads": threads,
    }
    print(
        f"faiss {info['faiss_version']} | pymilvus {info['pymilvus_version']} | milvus-lite "
        f"{info['milvus_lite_version']} | {info['cpu_model']} | {info['cpus_usable']} usable CPUs | "
        f"load {info['loadavg_at_start']}",
        flush=True,
    )

    # the draw order of faiss_search.py: centres, spreads, queries, then each gallery size in turn
    rng = np.random.default_rng(args.seed)
    centres = _normalise(rng.standard_normal((args.clusters, args.dim), dtype=np.float32))
    spreads = rng.uniform(float(args.spread[0]), float(args.spread[1]), size=args.clusters).astype(np.float32)
    queries = make_mixture(args.queries, centres, spreads, rng)

    previous: list[dict[str, Any]] = []
    if args.merge and args.out.exists():
        previous = [r for r in json.loads(args.out.read_text()).get("results", []) if r["n"] not in args.sizes]
    report: dict[str, Any] = {
        "benchmark": "gallery_backends",
        "started": started,
        "machine": info,
        "config": {
            "dim": args.dim,
            "queries": args.queries,
            "k": args.k,
            "batch": args.batch,
            "metric": "inner_product (L2-normalised vectors = cosine)",
            "data": f"Gaussian mixture on the unit sphere (benchmarks/faiss_search.py make_mixture): {args.clusters} "
            f"centres, noise norm U{list(args.spread)} per cluster, seed {args.seed}",
            "hnsw": {"M": args.M, "efSearch": args.ef_search},
            "milvus_index": args.milvus_index,
            "milvus_index_params": args.milvus_index_params,
            "milvus_lite_params_fix": args.lite_params_fix,
            "milvus_consistency": "Strong",
            "budgets_s": {"add": args.add_budget_s, "index_wait": args.index_wait_s, "search": args.search_budget_s},
            "latency": "one Gallery.search(query, k) call per query after one warm-up call",
            "add": "Gallery.add(batch) with new ids, no labels/metadata/images",
        },
        "results": list(previous),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    wall0 = time.perf_counter()
    drawn_before: list[int] = []
    for n, ef_construction in zip(args.sizes, args.ef_construction, strict=True):
        print(f"\n== gallery {n:,} x {args.dim} (efConstruction {ef_construction}) ==", flush=True)
        t0 = time.perf_counter()
        gallery_vectors = make_mixture(n, centres, spreads, rng)
        truth = exact_top_k(queries, gallery_vectors, args.k)
        print(f"  data and exact top-{args.k} in {time.perf_counter() - t0:.1f}s", flush=True)
        result: dict[str, Any] = {
            "n": n,
            "run_started": started,
            "command": " ".join(sys.argv),
            "ef_construction": ef_construction,
            # the draw order decides the vectors: with the same earlier sizes they equal faiss_search.py's
            "gallery_drawn_after_sizes": drawn_before,
            "config": report["config"],
            "rows": [],
        }
        drawn_before = [*drawn_before, n]
        report["results"].append(result)
        size_t0 = time.perf_counter()
        for name in args.backends:
            row = run_backend(name, gallery_vectors, queries, truth, args, ef_construction)
            row["loadavg_after"] = list(os.getloadavg())
            result["rows"].append(row)
            report["finished"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
            report["wall_s"] = time.perf_counter() - wall0
            result["wall_s"] = time.perf_counter() - size_t0
            report["machine"]["loadavg_at_end"] = list(os.getloadavg())
            args.out.write_text(json.dumps(report, indent=2) + "\n")
            print(table_row(row), flush=True)
        del gallery_vectors, truth
        gc.collect()

    report["results"].sort(key=lambda r: r["n"])
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\nadd = Gallery.add in batches of {args.batch:,}; ready = Milvus flush + index build wait; "
        f"1st query = first search after the last add (Milvus, before the flush); p50/p99 = one "
        f"Gallery.search(q, k={args.k}) per query; recall@{args.k} vs exact inner product; "
        f"total {time.perf_counter() - wall0:.0f}s"
    )
    print_table(report["results"], args.k)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

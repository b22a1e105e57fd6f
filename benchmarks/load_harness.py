"""The two measurements of ``benchmarks/load_test.py``: HTTP load on ``POST /embed`` and raw onnxruntime.

- :func:`run_load`: ``n`` requests of one photo each, ``concurrency`` in flight (``httpx.AsyncClient``),
  bounded by a deadline; latencies, completion times, errors by kind.
- :func:`steady_rate`: completions per second without the ramp-up and the drain of a load phase.
- :func:`raw_throughput`: img/s of an onnxruntime model on preprocessed tensors (no decode, no HTTP).
- :func:`percentiles`: latency summary in milliseconds.

The dicts these return are written as they are into the load test's JSON.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import numpy as np

#: error messages kept per load phase (the counts by kind cover all of them)
ERROR_EXAMPLES = 5
#: characters of an error answer's body kept in an example
ERROR_BODY_CHARS = 300


def percentiles(values_s: Sequence[float]) -> dict:
    """p50/p90/p99/max/mean of durations in seconds, in milliseconds ({} when there are none)."""
    if not values_s:
        return {}
    ms = np.asarray(values_s) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "mean_ms": float(ms.mean()),
    }


def steady_rate(done_at: list[float], lo: float = 0.1, hi: float = 0.9, burst_gap: float = 0.02) -> float | None:
    """Completions per second between the ``lo`` and ``hi`` quantiles of the completion times: the
    throughput without the ramp-up (first batches) and the drain (last, partial batches).

    Answers leave the server in bursts, one per batch. Both ends of the window are moved to the last
    completion of their burst (completions less than ``burst_gap`` s apart), so that the window holds
    whole batches and its length is whole batch periods; a boundary in the middle of a burst would
    miscount by up to a batch. Falls back to the plain quantiles when bursts cannot be told apart.
    """
    if len(done_at) < 20:
        return None
    t = sorted(done_at)
    i, j = int(lo * (len(t) - 1)), int(hi * (len(t) - 1))

    def burst_end(k: int) -> int:
        while k + 1 < len(t) and t[k + 1] - t[k] < burst_gap:
            k += 1
        return k

    si, sj = burst_end(i), burst_end(j)
    if sj - si >= 0.5 * (j - i) and t[sj] > t[si]:
        i, j = si, sj
    return (j - i) / (t[j] - t[i]) if t[j] > t[i] else None


class _LoadTally:
    """What one load phase saw: latencies and completion times of good answers, errors by kind."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.done_at: list[float] = []
        self.errors: dict[str, int] = {}
        self.error_examples: list[str] = []

    def ok(self, started: float, elapsed: float) -> None:
        self.latencies.append(elapsed)
        self.done_at.append(started + elapsed)

    def error(self, kind: str, message: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.error_examples) < ERROR_EXAMPLES:
            self.error_examples.append(f"{kind}: {message}")


async def run_load(
    base: str,
    photos: list[tuple[str, bytes]],
    n: int,
    concurrency: int,
    deadline: float,
    timeout: float,
    headers: dict,
    offset: int = 0,
) -> dict:
    """``n`` POST /embed requests, ``concurrency`` in flight (stops sending at ``deadline``, a
    ``time.monotonic()`` value); returns latencies, completion times and errors.

    Request ``i`` sends ``photos[(offset + i) % len(photos)]`` as the multipart field ``images``; an
    answer counts as good when it is 200 with exactly one embedding."""
    import httpx

    tally = _LoadTally()
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < n and time.monotonic() < deadline:
            i = next_index
            next_index += 1
            name, data = photos[(offset + i) % len(photos)]
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{base}/embed", files=[("images", (name, data, "image/jpeg"))], headers=headers)
                elapsed = time.perf_counter() - t0
                if r.status_code == 200 and len(r.json().get("embeddings", ())) == 1:
                    tally.ok(t0, elapsed)
                else:
                    tally.error(f"HTTP {r.status_code}", r.text[:ERROR_BODY_CHARS])
            except httpx.HTTPError as exc:
                tally.error(type(exc).__name__, repr(exc))

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    done = len(tally.latencies)
    return {
        "requests_sent": next_index,
        "ok": done,
        "errors": sum(tally.errors.values()),
        "errors_by_kind": tally.errors,
        "error_examples": tally.error_examples,
        "wall_s": wall,
        "img_per_s": done / wall if wall else 0.0,
        "img_per_s_steady": steady_rate(tally.done_at),
        "latencies_s": tally.latencies,
        "stopped_by_deadline": next_index < n,
    }


def raw_throughput(model, tensors: list[np.ndarray], batch: int, min_seconds: float, min_batches: int) -> dict:
    """img/s of ``model.run(batch, ["embedding"])`` on preprocessed tensors (no decode, no HTTP).

    ``model`` is a ``service.runtime.OnnxModel``; ``tensors`` are cycled to fill the batch. Two
    untimed runs, then batches until ``min_seconds`` have passed and ``min_batches`` ran."""
    reps = (batch + len(tensors) - 1) // len(tensors)
    inputs = np.ascontiguousarray(np.stack((tensors * reps)[:batch]), dtype=np.float32)
    for _ in range(2):  # warm-up: allocations, kernel selection
        model.run(inputs, ["embedding"])
    times = _time_until(lambda: model.run(inputs, ["embedding"]), min_seconds, min_batches)
    total = sum(times)
    return {
        "batch": batch,
        "batches": len(times),
        "img_per_s": batch * len(times) / total,
        "img_per_s_best_batch": batch / min(times),
        "batch_ms": percentiles(times),
    }


def _time_until(run: Callable[[], object], min_seconds: float, min_runs: int) -> list[float]:
    """Durations of ``run()`` calls, repeated until ``min_seconds`` have passed and ``min_runs`` ran."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times

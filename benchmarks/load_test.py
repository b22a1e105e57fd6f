"""Load test of ``POST /embed`` against a real server, compared with raw onnxruntime in the same run.

What it does, in one process:

1. Takes the model folder (``--model``) or exports a random-init ViT-S/16 at 224 px into a temporary
   folder (needs the ``train`` extra: torch + timm + onnx; ``--provider cuda`` adds the fp16 file).
2. Starts ``dino serve`` (``python -m dino.cli serve``) on 127.0.0.1 at a free port, waits for
   ``/readyz``, records the server's RSS and sends ``--warmup`` requests (not counted).
3. Alternates raw and served phases: raw, served round 1, raw, served round 2, ..., raw.

   * **raw**: ``service.runtime.OnnxModel`` built with the *same* settings the server reads
     (``ServiceSettings``: provider, fp16, intra-op threads; ``--server-env`` overrides apply to both),
     run in this process on batches of ``--raw-batch`` already-preprocessed tensors, asking for the
     ``embedding`` output only as ``/embed`` does, while the server is idle. **Raw excludes JPEG
     decode, resize and HTTP; served includes them.**
   * **served**: ``--requests`` (split over ``--rounds``) ``POST /embed`` requests of one photo each
     (multipart field ``images``), ``--concurrency`` in flight (httpx.AsyncClient), cycling through
     the photos of ``$DINO_DATA_DIR/imagenet-sample``.

   The machine this runs on is shared (other jobs come and go), so each round's throughput is
   compared with the raw phases just before and after it; the reported ratio is the median over
   rounds, computed on the steady-state rate (completions between the 10% and 90% quantiles of
   completion time, i.e. without the ramp-up and the drain of each round).
4. Reports errors (must be 0), latency p50/p90/p99 over all requests, img/s, the server's RSS (idle,
   after warm-up, peak, after), its CPU time (event-loop thread vs the rest), the load client's CPU
   time, and the server's own metrics (mean batch size, time inside onnxruntime). ``--py-spy S``
   also profiles the server's Python threads for S seconds during round 1.
5. Prints a table and the served/raw ratio (goal on CPU: >= 0.8) and writes JSON
   (``benchmarks/results/load_test_cpu.json``, or ``load_test_cuda.json`` with ``--provider cuda``).

Requests go to 127.0.0.1 only; their number (``--requests``) and time (``--max-seconds``) are bounded.

Usage::

    .venv/bin/python benchmarks/load_test.py                           # CPU, exported random-init ViT-S/16
    .venv/bin/python benchmarks/load_test.py --model models/NAME --provider cuda
    .venv/bin/python benchmarks/load_test.py --server-env DINO_INTRA_OP_THREADS=2 --server-env DINO_PREPROCESS_THREADS=1
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dino.data_dir import data_dir  # noqa: E402
from benchmarks.machine import machine_info as shared_machine_info  # noqa: E402
from dino.images import list_image_files  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DATA_DIR = data_dir()


# ------------------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(values_s: list[float]) -> dict:
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


def rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` and its children (uvicorn workers), in MiB."""
    try:
        import psutil

        proc = psutil.Process(pid)
        procs = [proc] + proc.children(recursive=True)
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / 2**20
    except ImportError:  # /proc fallback: the process alone
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
    except Exception:
        return None
    return None


class PeakSampler(threading.Thread):
    """Samples the server's RSS (and CPU time) every ``interval`` seconds while the load runs."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0.0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            value = rss_mb(self.pid)
            if value:
                self.peak = max(self.peak, value)
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join(timeout=5)


def cpu_seconds(pid: int) -> float | None:
    try:
        import psutil

        proc = psutil.Process(pid)
        total = 0.0
        for p in [proc] + proc.children(recursive=True):
            t = p.cpu_times()
            total += t.user + t.system
        return total
    except Exception:
        return None


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds per OS thread of ``pid`` (the main thread, tid == pid, runs the event loop)."""
    try:
        import psutil

        return {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}
    except Exception:
        return {}


def start_py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    """``py-spy record`` (raw collapsed stacks, thread names, non-blocking) on the server for ``seconds``."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        print("py-spy not found (pip install py-spy): no profile", flush=True)
        return None
    cmd = [
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        "50",
        "--format",
        "raw",
        "--threads",
        "--nonblocking",
        "--output",
        str(out),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def summarise_py_spy(path: Path, top: int = 25) -> dict:
    """Where the server's Python threads spent their on-CPU samples: per thread and per function
    (inclusive: a function counts once per sample it appears in)."""
    per_thread: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    leaf: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = next((f for f in frames if f.startswith("thread ")), "thread ?")
        # "thread (TID): NAME": keep the name, group pool threads ("dino-preprocess_3") by prefix
        name = thread.split("): ", 1)[1] if "): " in thread else thread
        name = re.sub(r"_\d+$", "_*", name)
        per_thread[name] = per_thread.get(name, 0) + n
        funcs = [f for f in frames if not f.startswith(("thread ", "process "))]
        for f in set(re.sub(r":\d+\)$", ")", f) for f in funcs):
            inclusive[f] = inclusive.get(f, 0) + n
        if funcs:
            key = re.sub(r":\d+\)$", ")", funcs[-1])
            leaf[key] = leaf.get(key, 0) + n
        total += n

    def pct(d):
        return (
            {k: round(100 * v / total, 1) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]} if total else {}
        )

    return {"samples": total, "by_thread_pct": pct(per_thread), "inclusive_pct": pct(inclusive), "leaf_pct": pct(leaf)}


def machine_info() -> dict:
    """The shared machine description plus onnxruntime's version and providers."""
    import onnxruntime as ort

    return {
        **shared_machine_info(),
        "onnxruntime": ort.__version__,
        "ort_available_providers": ort.get_available_providers(),
    }


def parse_prometheus(text: str) -> dict[str, float]:
    """``name{labels} value`` lines -> {"name{labels}": value} (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(\S+?(?:\{.*\})?)\s+(\S+)$", line)
        if m:
            try:
                out[m.group(1)] = float(m.group(2))
            except ValueError:
                pass
    return out


def metric_delta(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


# ------------------------------------------------------------------------------------------- model
def export_random_model(out_dir: Path, fp16: bool) -> Path:
    """vit_small/16 at 224, random init, exported with the project's exporter."""
    from training.backbone import build_backbone
    from training.export import export_backbone

    backbone = build_backbone("vit_small", 16, 224)
    export_backbone(
        backbone,
        out_dir,
        name="vit_small16-random",
        arch="vit_small",
        patch_size=16,
        image_size=224,
        fp16=fp16,
        provenance={"source": "random init (benchmarks/load_test.py)"},
    )
    return out_dir


def load_photos(limit: int) -> list[tuple[str, bytes]]:
    folder = DATA_DIR / "imagenet-sample"
    if not folder.is_dir():
        sys.exit(f"no photos: {folder} is missing (set DINO_DATA_DIR to the folder holding imagenet-sample/)")
    files = list_image_files(folder)[:limit]
    if not files:
        sys.exit(f"no image files in {folder}")
    return [(p.name, p.read_bytes()) for p in files]


# ----------------------------------------------------------------------------------------------- raw
def raw_throughput(model, tensors: list[np.ndarray], batch: int, min_seconds: float, min_batches: int) -> dict:
    """img/s of ``model.run(batch, ["embedding"])`` on preprocessed tensors (no decode, no HTTP)."""
    reps = (batch + len(tensors) - 1) // len(tensors)
    inputs = np.ascontiguousarray(np.stack((tensors * reps)[:batch]), dtype=np.float32)
    for _ in range(2):  # warm-up: allocations, kernel selection
        model.run(inputs, ["embedding"])
    times = []
    start = time.perf_counter()
    while len(times) < min_batches or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        model.run(inputs, ["embedding"])
        times.append(time.perf_counter() - t0)
    total = sum(times)
    return {
        "batch": batch,
        "batches": len(times),
        "img_per_s": batch * len(times) / total,
        "img_per_s_best_batch": batch / min(times),
        "batch_ms": percentiles(times),
    }


# ------------------------------------------------------------------------------------------ server
def start_server(model_dir: Path, port: int, env: dict, log_path: Path, launcher: str) -> subprocess.Popen:
    if launcher == "auto":
        launcher = "cli" if (REPO / "service" / "server.py").is_file() else "uvicorn"
    if launcher == "cli":
        cmd = [
            sys.executable,
            "-m",
            "dino.cli",
            "serve",
            "--model",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
    else:
        env = {**env, "DINO_MODEL_DIR": str(model_dir)}
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "service.app:create_app_from_env",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
    log = open(log_path, "wb")
    print(f"starting server: {' '.join(cmd)}  (log: {log_path})", flush=True)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)  # graceful: lifespan shutdown
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> dict:
    import httpx

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was ready")
        try:
            r = httpx.get(f"{base}/readyz", timeout=2.0)
            if r.status_code == 200:
                return r.json()
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.25)
    raise RuntimeError(f"server not ready after {timeout:.0f}s (last answer: {last})")


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
    ``time.monotonic()`` value); returns latencies, completion times and errors."""
    import httpx

    latencies: list[float] = []
    done_at: list[float] = []
    errors: dict[str, int] = {}
    error_examples: list[str] = []
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient):
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
                    latencies.append(elapsed)
                    done_at.append(t0 + elapsed)
                else:
                    key = f"HTTP {r.status_code}"
                    errors[key] = errors.get(key, 0) + 1
                    if len(error_examples) < 5:
                        error_examples.append(f"{key}: {r.text[:300]}")
            except httpx.HTTPError as exc:
                key = type(exc).__name__
                errors[key] = errors.get(key, 0) + 1
                if len(error_examples) < 5:
                    error_examples.append(f"{key}: {exc!r}")

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    done = len(latencies)
    return {
        "requests_sent": next_index,
        "ok": done,
        "errors": sum(errors.values()),
        "errors_by_kind": errors,
        "error_examples": error_examples,
        "wall_s": wall,
        "img_per_s": done / wall if wall else 0.0,
        "img_per_s_steady": steady_rate(done_at),
        "latencies_s": latencies,
        "stopped_by_deadline": next_index < n,
    }


# -------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", type=Path, help="model folder (model.json + model.onnx); default: export a random-init ViT-S/16"
    )
    p.add_argument("--keep-model", type=Path, help="export the random-init model here (reused when it exists)")
    p.add_argument("--provider", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--warmup", type=int, default=64, help="requests sent before measuring (not counted)")
    p.add_argument("--raw-batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4, help="served phases, each between two raw phases")
    p.add_argument("--raw-seconds", type=float, default=10.0, help="least time of each raw phase")
    p.add_argument("--raw-min-batches", type=int, default=3)
    p.add_argument("--photos", type=int, default=100, help="photos cycled through (imagenet-sample)")
    p.add_argument("--max-seconds", type=float, default=540.0, help="stop sending requests after this long")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="DINO_X=V",
        help="setting for the server (and the raw run), e.g. DINO_INTRA_OP_THREADS=2; repeatable",
    )
    p.add_argument(
        "--launcher",
        choices=("auto", "cli", "uvicorn"),
        default="auto",
        help="cli: python -m dino.cli serve; uvicorn: uvicorn --factory service.app:create_app_from_env",
    )
    p.add_argument(
        "--py-spy",
        type=float,
        default=0,
        metavar="SECONDS",
        help="profile the server with py-spy for this long during the load (0: no profile)",
    )
    p.add_argument("--goal", type=float, default=0.8, help="served/raw ratio to reach (CPU)")
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--server-log", type=Path, help="keep the server's log here (default: a temp file, printed on failure)"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or RESULTS / f"load_test_{'cuda' if args.provider == 'cuda' else 'cpu'}.json"

    # settings shared by the server and the raw session: the server reads DINO_* from its environment,
    # the raw OnnxModel is built from ServiceSettings() read from this process's (identical) environment
    overrides = {"DINO_PROVIDER": args.provider, "DINO_LOG_LEVEL": "warning"}
    for item in args.server_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("DINO_"):
            sys.exit(f"--server-env wants DINO_NAME=VALUE, got {item!r}")
        overrides[key] = value
    os.environ.update(overrides)
    server_env = dict(os.environ)

    from service.preprocess import Preprocessor
    from service.runtime import OnnxModel
    from service.settings import ServiceSettings

    settings = ServiceSettings()
    tmp_root = Path(tempfile.mkdtemp(prefix="dino-load-"))
    proc = None
    try:
        # ---- model
        if args.model:
            model_dir = args.model
        else:
            model_dir = args.keep_model or tmp_root / "vit_small16-random"
            if not (model_dir / "model.json").is_file():
                print(f"exporting a random-init vit_small/16 @224 to {model_dir} ...", flush=True)
                t0 = time.perf_counter()
                export_random_model(model_dir, fp16=args.provider == "cuda")
                print(f"  exported in {time.perf_counter() - t0:.0f}s", flush=True)
        photos = load_photos(args.photos)

        report: dict = {
            "benchmark": "load_test",
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "config": {
                "model_dir": str(model_dir),
                "requests": args.requests,
                "concurrency": args.concurrency,
                "warmup_requests": args.warmup,
                "photos": f"{len(photos)} photos of {DATA_DIR / 'imagenet-sample'}, cycled, one per request",
                "photo_bytes_mean": float(np.mean([len(d) for _, d in photos])),
                "raw_batch": args.raw_batch,
                "server_env": overrides,
                "settings": {
                    k: getattr(settings, k)
                    for k in (
                        "provider",
                        "use_fp16",
                        "intra_op_threads",
                        "max_batch_size",
                        "max_batch_wait_ms",
                        "preprocess_threads",
                        "max_queue_size",
                    )
                },
                "note": "raw = onnxruntime on preprocessed float32 tensors (excludes JPEG decode, resize, HTTP); "
                "served = POST /embed end to end (includes them). Client and server share this machine's CPUs.",
            },
        }

        # ---- raw onnxruntime, same settings as the server (the session stays loaded for the raw phases)
        model = OnnxModel(
            model_dir,
            provider=settings.provider,
            use_fp16=settings.use_fp16,
            verify_sha256=False,
            intra_op_threads=settings.intra_op_threads,
        )
        pre = Preprocessor.for_model(model.spec, settings.max_image_pixels)
        t0 = time.perf_counter()
        tensors = [pre.prepare(data).tensor for _, data in photos]
        prep_s = (time.perf_counter() - t0) / len(photos)
        report["preprocess_single_thread_ms_per_img"] = prep_s * 1e3
        report["provider_active"] = model.provider
        report["model_file"] = model.file
        print(
            f"model {model.name} ({model.file}) on {model.provider}; intra-op threads {settings.intra_op_threads or 'default'}",
            flush=True,
        )
        print(f"preprocess (decode+resize+normalise, 1 thread): {prep_s * 1e3:.1f} ms/img", flush=True)

        def raw_phase(label: str) -> dict:
            result = raw_throughput(
                model, tensors[: args.raw_batch], args.raw_batch, args.raw_seconds, args.raw_min_batches
            )
            result["label"] = label
            print(
                f"  raw onnxruntime ({label}): {result['img_per_s']:.2f} img/s at batch {args.raw_batch} "
                f"(preprocessed tensors, no decode/HTTP)",
                flush=True,
            )
            return result

        # ---- server
        import httpx

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log_path = args.server_log or tmp_root / "server.log"
        headers = {}
        if settings.api_key is not None:
            headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
        t0 = time.perf_counter()
        proc = start_server(model_dir, port, server_env, log_path, args.launcher)
        try:
            ready = wait_ready(base, proc, args.ready_timeout)
        except RuntimeError:
            print(log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
            raise
        report["server_ready_s"] = time.perf_counter() - t0
        report["server_readyz"] = ready
        print(f"server ready in {report['server_ready_s']:.1f}s: {ready}", flush=True)
        rss_idle = rss_mb(proc.pid)
        deadline = time.monotonic() + args.max_seconds
        asyncio.run(run_load(base, photos, args.warmup, args.concurrency, deadline, args.request_timeout, headers))
        rss_warm = rss_mb(proc.pid)

        # ---- interleaved phases: raw, served, raw, served, ..., raw (the server idle during raw phases),
        # so that each served phase is compared with raw measured just before and after it
        rounds = max(1, min(args.rounds, args.requests))
        per_round = [args.requests // rounds + (1 if r < args.requests % rounds else 0) for r in range(rounds)]
        raws = [raw_phase("before round 1")]
        phases: list[dict] = []
        latencies: list[float] = []
        metrics_before = parse_prometheus(httpx.get(f"{base}/metrics", headers=headers, timeout=10).text)
        sampler = PeakSampler(proc.pid)
        sampler.start()
        cpu_total, threads_total, client_cpu = 0.0, {}, 0.0
        spy_out = tmp_root / "py-spy.txt"
        spy = None
        offset = 0
        print(
            f"load: {args.requests} x POST /embed (1 photo each), concurrency {args.concurrency}, "
            f"in {rounds} rounds between raw phases ...",
            flush=True,
        )
        for r, n in enumerate(per_round):
            if time.monotonic() >= deadline:
                break
            cpu0, threads0, client0 = cpu_seconds(proc.pid), thread_cpu(proc.pid), time.process_time()
            if r == 0 and args.py_spy > 0:
                spy = start_py_spy(proc.pid, args.py_spy, spy_out)
            phase = asyncio.run(
                run_load(base, photos, n, args.concurrency, deadline, args.request_timeout, headers, offset)
            )
            offset += n
            cpu1, threads1 = cpu_seconds(proc.pid), thread_cpu(proc.pid)
            client_cpu += time.process_time() - client0
            if cpu0 is not None and cpu1 is not None:
                cpu_total += cpu1 - cpu0
            for tid, value in threads1.items():
                threads_total[tid] = threads_total.get(tid, 0.0) + value - threads0.get(tid, 0.0)
            latencies += phase.pop("latencies_s")
            raws.append(raw_phase(f"after round {r + 1}"))
            raw_here = (raws[-2]["img_per_s"] + raws[-1]["img_per_s"]) / 2
            served_rate = phase["img_per_s_steady"] or phase["img_per_s"]
            phase["raw_img_per_s_around"] = raw_here
            phase["served_over_raw"] = served_rate / raw_here if raw_here else None
            phases.append(phase)
            print(
                f"  round {r + 1}: {phase['ok']} ok, {phase['errors']} errors, served {phase['img_per_s']:.2f} img/s "
                f"(steady {served_rate:.2f}) -> served/raw {phase['served_over_raw']:.3f}",
                flush=True,
            )
        sampler.stop()
        rss_after = rss_mb(proc.pid)
        metrics_after = parse_prometheus(httpx.get(f"{base}/metrics", headers=headers, timeout=10).text)
        del model

        wall = sum(p["wall_s"] for p in phases)
        ok = sum(p["ok"] for p in phases)
        errors: dict[str, int] = {}
        for p in phases:
            for key, value in p["errors_by_kind"].items():
                errors[key] = errors.get(key, 0) + value
        served = {
            "requests_sent": sum(p["requests_sent"] for p in phases),
            "ok": ok,
            "errors": sum(errors.values()),
            "errors_by_kind": errors,
            "error_examples": [e for p in phases for e in p["error_examples"]][:5],
            "wall_s": wall,
            "img_per_s": ok / wall if wall else 0.0,
            "latency": percentiles(latencies),
            "stopped_by_deadline": sum(p["requests_sent"] for p in phases) < args.requests,
            "rounds": phases,
            "server_cpu_s": cpu_total,
            "server_cpu_cores_busy": cpu_total / wall if wall else None,
            "server_cpu_s_event_loop_thread": threads_total.get(proc.pid, 0.0),
            "server_cpu_s_other_threads_top": sorted(
                (round(v, 2) for t, v in threads_total.items() if t != proc.pid), reverse=True
            )[:12],
            "client_cpu_s": client_cpu,
        }
        batches = metric_delta(metrics_before, metrics_after, "dino_batch_size_count")
        images = metric_delta(metrics_before, metrics_after, "dino_batch_size_sum")
        infer_s = metric_delta(metrics_before, metrics_after, "dino_inference_seconds_sum")
        prep_n = metric_delta(metrics_before, metrics_after, "dino_preprocess_seconds_count")
        prep_sum = metric_delta(metrics_before, metrics_after, "dino_preprocess_seconds_sum")
        wait_n = metric_delta(metrics_before, metrics_after, "dino_queue_wait_seconds_count")
        wait_sum = metric_delta(metrics_before, metrics_after, "dino_queue_wait_seconds_sum")
        served["server_metrics"] = {
            "batches": batches,
            "mean_batch_size": images / batches if batches else None,
            "onnxruntime_busy_s": infer_s,
            "onnxruntime_busy_fraction": infer_s / wall if wall else None,
            "img_per_s_inside_onnxruntime": images / infer_s if infer_s else None,
            "preprocess_ms_mean": 1e3 * prep_sum / prep_n if prep_n else None,
            "queue_wait_ms_mean": 1e3 * wait_sum / wait_n if wait_n else None,
        }
        report["served"] = served
        report["raw_phases"] = raws
        report["rss_mb"] = {
            "idle_after_ready": rss_idle,
            "after_warmup": rss_warm,
            "peak_during_load": sampler.peak,
            "after_load": rss_after,
        }
        if spy is not None:
            try:
                _, err = spy.communicate(timeout=args.py_spy + 60)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, err = spy.communicate()
            if spy_out.is_file():
                report["py_spy"] = summarise_py_spy(spy_out)
                if args.server_log:  # keep the raw profile next to the server log
                    shutil.copy(spy_out, args.server_log.with_suffix(".py-spy.txt"))
            else:
                report["py_spy"] = {"error": err.decode(errors="replace")[-500:]}

        raw_rates = [x["img_per_s"] for x in raws]
        raw = float(np.mean(raw_rates))
        ratios = [p["served_over_raw"] for p in phases if p["served_over_raw"] is not None]
        ratio = float(np.median(ratios)) if ratios else 0.0
        report["raw_img_per_s"] = raw
        report["raw_spread"] = max(raw_rates) / min(raw_rates) if min(raw_rates) > 0 else None
        report["served_img_per_s"] = served["img_per_s"]
        report["served_over_raw"] = ratio
        report["served_over_raw_overall"] = served["img_per_s"] / raw if raw else None
        report["goal"] = args.goal
        report["goal_met"] = bool(ratio >= args.goal and served["errors"] == 0 and not served["stopped_by_deadline"])
        report["machine"]["loadavg_at_end"] = list(os.getloadavg())
        report["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")

        # ---- table
        lat, sm = served["latency"], served["server_metrics"]
        print()
        print(f"{'':<40}{'value':>14}")
        print("-" * 54)
        rows = [
            ("requests ok / sent", f"{served['ok']}/{served['requests_sent']}"),
            ("errors", f"{served['errors']}"),
            ("served img/s (incl. decode, HTTP)", f"{served['img_per_s']:.2f}"),
            ("latency p50 / p99 ms", f"{lat.get('p50_ms', float('nan')):.0f} / {lat.get('p99_ms', float('nan')):.0f}"),
            ("raw ORT img/s, mean of phases", f"{raw:.2f}"),
            ("raw ORT img/s, each phase", " ".join(f"{x:.1f}" for x in raw_rates)),
            ("served/raw per round (steady)", " ".join(f"{x:.2f}" for x in ratios)),
            ("served/raw (median of rounds)", f"{ratio:.3f}"),
            ("served/raw (overall, wall)", f"{report['served_over_raw_overall'] or 0:.3f}"),
            ("mean batch size (server)", f"{sm['mean_batch_size'] or 0:.1f}"),
            ("img/s inside ORT (server)", f"{sm['img_per_s_inside_onnxruntime'] or 0:.2f}"),
            ("ORT busy fraction (server)", f"{sm['onnxruntime_busy_fraction'] or 0:.2f}"),
            ("preprocess ms/img (server, wall)", f"{sm['preprocess_ms_mean'] or 0:.1f}"),
            ("server CPU cores busy", f"{served['server_cpu_cores_busy'] or 0:.2f}"),
            (
                "server CPU s: event loop / all",
                f"{served['server_cpu_s_event_loop_thread']:.1f} / {served['server_cpu_s']:.1f}",
            ),
            ("load-client CPU s", f"{served['client_cpu_s']:.1f}"),
            ("RSS MiB idle / after load", f"{rss_idle or 0:.0f} / {rss_after or 0:.0f}"),
            ("RSS MiB after warm-up / peak", f"{rss_warm or 0:.0f} / {sampler.peak:.0f}"),
        ]
        for name, value in rows:
            print(f"{name:<40}{value:>14}")
        print(
            f"\nraw excludes JPEG decode/resize/HTTP; served includes them. provider {report['provider_active']}; "
            f"load average at start {report['machine']['loadavg_at_start'][0]:.1f}, at end {os.getloadavg()[0]:.1f}."
        )
        if report["raw_spread"] and report["raw_spread"] > 1.3:
            print(
                f"warning: raw throughput varied {report['raw_spread']:.1f}x between phases: the machine is shared; "
                "trust the per-round ratios more than the absolute numbers"
            )
        if "py_spy" in report and "by_thread_pct" in report["py_spy"]:
            prof = report["py_spy"]
            print(
                f"\npy-spy ({prof['samples']} on-CPU samples of Python threads; ORT's own pool threads are native, not seen):"
            )
            print("  by thread:", json.dumps(prof["by_thread_pct"]))
            for name, value in list(prof["inclusive_pct"].items())[:15]:
                print(f"  {value:5.1f}%  {name}")
        verdict = "MET" if report["goal_met"] else "NOT met"
        print(f"goal served >= {args.goal} x raw with 0 errors: {verdict} (median ratio {ratio:.3f})")
        if served["errors"]:
            print("error examples:", *served["error_examples"], sep="\n  ")
        if served["stopped_by_deadline"]:
            print(
                f"stopped by --max-seconds {args.max_seconds:.0f}: {served['requests_sent']} of {args.requests} requests sent"
            )
        print(f"wrote {out}")
        return 0 if served["errors"] == 0 else 1
    finally:
        if proc is not None:
            stop_server(proc)
        shutil.rmtree(tmp_root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

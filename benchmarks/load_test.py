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

This file is the orchestration, the table and the JSON; the HTTP load and the raw measurement are in
``benchmarks/load_harness.py``, the server's memory and CPU figures in ``benchmarks/process_stats.py``,
and the server process is ``tests.helpers.ServerProcess``.

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.load_harness import percentiles, raw_throughput, run_load  # noqa: E402
from benchmarks.machine import machine_info as shared_machine_info  # noqa: E402
from benchmarks.process_stats import CpuMeter, PeakSampler, rss_mb, start_py_spy, summarise_py_spy  # noqa: E402
from dino.data_dir import data_dir  # noqa: E402
from dino.images import list_image_files  # noqa: E402
from tests.helpers import ServerProcess  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DATA_DIR = data_dir()
#: the ServiceSettings fields recorded in the JSON's config (shared by the server and the raw run)
RECORDED_SETTINGS = (
    "provider",
    "precision",
    "intra_op_threads",
    "max_batch_size",
    "max_batch_wait_ms",
    "preprocess_threads",
    "max_queue_size",
)
#: the server's busiest non-event-loop threads listed in the JSON
TOP_THREADS = 12
#: a warning is printed when the raw phases' fastest / slowest is above this
RAW_SPREAD_WARNING = 1.3


# ------------------------------------------------------------------------------------------ helpers
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


def server_metrics(before: dict, after: dict, wall: float) -> dict:
    """The server's own view of the served rounds, from its /metrics before and after them."""

    def delta(name: str) -> float:
        return metric_delta(before, after, name)

    batches, images = delta("dino_batch_size_count"), delta("dino_batch_size_sum")
    infer_s = delta("dino_inference_seconds_sum")
    prep_n, prep_sum = delta("dino_preprocess_seconds_count"), delta("dino_preprocess_seconds_sum")
    wait_n, wait_sum = delta("dino_queue_wait_seconds_count"), delta("dino_queue_wait_seconds_sum")
    return {
        "batches": batches,
        "mean_batch_size": images / batches if batches else None,
        "onnxruntime_busy_s": infer_s,
        "onnxruntime_busy_fraction": infer_s / wall if wall else None,
        "img_per_s_inside_onnxruntime": images / infer_s if infer_s else None,
        "preprocess_ms_mean": 1e3 * prep_sum / prep_n if prep_n else None,
        "queue_wait_ms_mean": 1e3 * wait_sum / wait_n if wait_n else None,
    }


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


def prepare_model(args: argparse.Namespace, tmp_root: Path) -> Path:
    """``--model``, else a random-init model exported to ``--keep-model`` (reused) or a temp folder."""
    if args.model:
        return args.model
    model_dir = args.keep_model or tmp_root / "vit_small16-random"
    if not (model_dir / "model.json").is_file():
        print(f"exporting a random-init vit_small/16 @224 to {model_dir} ...", flush=True)
        t0 = time.perf_counter()
        export_random_model(model_dir, fp16=args.provider == "cuda")
        print(f"  exported in {time.perf_counter() - t0:.0f}s", flush=True)
    return model_dir


def load_photos(limit: int) -> list[tuple[str, bytes]]:
    folder = DATA_DIR / "imagenet-sample"
    if not folder.is_dir():
        sys.exit(f"no photos: {folder} is missing (set DINO_DATA_DIR to the folder holding imagenet-sample/)")
    files = list_image_files(folder)[:limit]
    if not files:
        sys.exit(f"no image files in {folder}")
    return [(p.name, p.read_bytes()) for p in files]


def raw_phase(model, tensors: list[np.ndarray], args: argparse.Namespace, label: str) -> dict:
    """One raw onnxruntime phase (the server idle), printed and labelled."""
    result = raw_throughput(model, tensors[: args.raw_batch], args.raw_batch, args.raw_seconds, args.raw_min_batches)
    result["label"] = label
    print(
        f"  raw onnxruntime ({label}): {result['img_per_s']:.2f} img/s at batch {args.raw_batch} "
        f"(preprocessed tensors, no decode/HTTP)",
        flush=True,
    )
    return result


# ------------------------------------------------------------------------------------------ server
def server_settings(args: argparse.Namespace) -> dict[str, str]:
    """The DINO_* settings of this run, put into this process's environment too: the server reads them
    from its environment, the raw OnnxModel is built from ServiceSettings() read from this one."""
    overrides = {"DINO_PROVIDER": args.provider, "DINO_LOG_LEVEL": "warning"}
    for item in args.server_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("DINO_"):
            sys.exit(f"--server-env wants DINO_NAME=VALUE, got {item!r}")
        overrides[key] = value
    os.environ.update(overrides)
    return overrides


def server_process(model_dir: Path, log_path: Path, overrides: dict[str, str], launcher: str) -> ServerProcess:
    """``dino serve`` (launcher cli) or uvicorn's app factory (launcher uvicorn) with this process's
    environment, which holds ``overrides``; the log file is emptied first."""
    if launcher == "auto":
        launcher = "cli" if (REPO / "service" / "server.py").is_file() else "uvicorn"
    # ServerProcess sets DINO_PREPROCESS_THREADS=2 for the tests; here the server must run with the
    # settings the raw run and the JSON's config read from this environment (None: unset, the default)
    env: dict[str, str | None] = {
        **overrides,
        "DINO_PREPROCESS_THREADS": os.environ.get("DINO_PREPROCESS_THREADS"),
    }
    command = None
    if launcher == "uvicorn":
        env["DINO_MODEL_DIR"] = str(model_dir)
        command = [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app_from_env"]
        command += ["--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning"]
    log_path.write_bytes(b"")
    print(f"starting server ({launcher}; log: {log_path}) ...", flush=True)
    return ServerProcess(model_dir, log_path, env=env, command=command)


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


def round_sizes(requests: int, rounds: int) -> list[int]:
    """``requests`` split over ``rounds`` (at least 1, at most one per request) as evenly as possible."""
    rounds = max(1, min(rounds, requests))
    return [requests // rounds + (1 if r < requests % rounds else 0) for r in range(rounds)]


def served_summary(phases: list[dict], latencies: list[float], cpu: CpuMeter, requests: int) -> dict:
    """All served rounds together (``phases`` without their latencies, which are in ``latencies``)."""
    wall = sum(p["wall_s"] for p in phases)
    ok = sum(p["ok"] for p in phases)
    sent = sum(p["requests_sent"] for p in phases)
    errors: dict[str, int] = {}
    for p in phases:
        for key, value in p["errors_by_kind"].items():
            errors[key] = errors.get(key, 0) + value
    return {
        "requests_sent": sent,
        "ok": ok,
        "errors": sum(errors.values()),
        "errors_by_kind": errors,
        "error_examples": [e for p in phases for e in p["error_examples"]][:5],
        "wall_s": wall,
        "img_per_s": ok / wall if wall else 0.0,
        "latency": percentiles(latencies),
        "stopped_by_deadline": sent < requests,
        "rounds": phases,
        "server_cpu_s": cpu.server_s,
        "server_cpu_cores_busy": cpu.server_s / wall if wall else None,
        "server_cpu_s_event_loop_thread": cpu.main_thread_s,
        "server_cpu_s_other_threads_top": cpu.other_threads_s(TOP_THREADS),
        "client_cpu_s": cpu.client_s,
    }


def py_spy_result(spy: subprocess.Popen, spy_out: Path, args: argparse.Namespace) -> dict:
    """Wait for py-spy and summarise its profile (or its error)."""
    try:
        _, err = spy.communicate(timeout=args.py_spy + 60)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    if not spy_out.is_file():
        return {"error": err.decode(errors="replace")[-500:]}
    if args.server_log:  # keep the raw profile next to the server log
        shutil.copy(spy_out, args.server_log.with_suffix(".py-spy.txt"))
    return summarise_py_spy(spy_out)


def run_benchmark(args: argparse.Namespace, overrides: dict[str, str], tmp_root: Path, out: Path) -> dict:
    """Everything but the table: model, raw and served phases; returns the report (also written to ``out``)."""
    import httpx

    from service.preprocess import Preprocessor
    from service.runtime import OnnxModel
    from service.settings import ServiceSettings

    settings = ServiceSettings()
    model_dir = prepare_model(args, tmp_root)
    photos = load_photos(args.photos)

    report: dict = {
        "benchmark": "load_test",
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
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
            "settings": {k: getattr(settings, k) for k in RECORDED_SETTINGS},
            "note": "raw = onnxruntime on preprocessed float32 tensors (excludes JPEG decode, resize, HTTP); "
            "served = POST /embed end to end (includes them). Client and server share this machine's CPUs.",
        },
    }

    # ---- raw onnxruntime, same settings as the server (the session stays loaded for the raw phases)
    model = OnnxModel.from_settings(settings, model_dir, verify_sha256=False)
    pre = Preprocessor.for_model(model.spec, settings.max_image_pixels)
    t0 = time.perf_counter()
    tensors = [pre.prepare(data).tensor for _, data in photos]
    prep_s = (time.perf_counter() - t0) / len(photos)
    report["preprocess_single_thread_ms_per_img"] = prep_s * 1e3
    report["provider_active"] = model.provider
    report["model_file"] = model.file
    threads = settings.intra_op_threads or "default"
    print(f"model {model.name} ({model.file}) on {model.provider}; intra-op threads {threads}", flush=True)
    print(f"preprocess (decode+resize+normalise, 1 thread): {prep_s * 1e3:.1f} ms/img", flush=True)

    # ---- server
    log_path = args.server_log or tmp_root / "server.log"
    headers = {}
    if settings.api_key is not None:
        headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
    server = server_process(model_dir, log_path, overrides, args.launcher)
    t0 = time.perf_counter()
    with server.start(args.ready_timeout):
        base, pid = server.url, server.pid
        report["server_ready_s"] = time.perf_counter() - t0
        report["server_readyz"] = server.ready
        print(f"server ready in {report['server_ready_s']:.1f}s: {server.ready}", flush=True)
        print(f"  {' '.join(server.command())}", flush=True)
        rss_idle = rss_mb(pid)
        deadline = time.monotonic() + args.max_seconds
        asyncio.run(run_load(base, photos, args.warmup, args.concurrency, deadline, args.request_timeout, headers))
        rss_warm = rss_mb(pid)

        # ---- interleaved phases: raw, served, raw, served, ..., raw (the server idle during raw phases),
        # so that each served phase is compared with raw measured just before and after it
        per_round = round_sizes(args.requests, args.rounds)
        raws = [raw_phase(model, tensors, args, "before round 1")]
        phases: list[dict] = []
        latencies: list[float] = []
        metrics_before = parse_prometheus(httpx.get(f"{base}/metrics", headers=headers, timeout=10).text)
        sampler = PeakSampler(pid)
        sampler.start()
        cpu = CpuMeter(pid)
        spy_out = tmp_root / "py-spy.txt"
        spy = None
        offset = 0
        print(
            f"load: {args.requests} x POST /embed (1 photo each), concurrency {args.concurrency}, "
            f"in {len(per_round)} rounds between raw phases ...",
            flush=True,
        )
        for r, n in enumerate(per_round):
            if time.monotonic() >= deadline:
                break
            with cpu.span():
                if r == 0 and args.py_spy > 0:
                    spy = start_py_spy(pid, args.py_spy, spy_out)
                phase = asyncio.run(
                    run_load(base, photos, n, args.concurrency, deadline, args.request_timeout, headers, offset)
                )
            offset += n
            latencies += phase.pop("latencies_s")
            raws.append(raw_phase(model, tensors, args, f"after round {r + 1}"))
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
        rss_after = rss_mb(pid)
        metrics_after = parse_prometheus(httpx.get(f"{base}/metrics", headers=headers, timeout=10).text)
        del model

        served = served_summary(phases, latencies, cpu, args.requests)
        served["server_metrics"] = server_metrics(metrics_before, metrics_after, served["wall_s"])
        report["served"] = served
        report["raw_phases"] = raws
        report["rss_mb"] = {
            "idle_after_ready": rss_idle,
            "after_warmup": rss_warm,
            "peak_during_load": sampler.peak,
            "after_load": rss_after,
        }
        if spy is not None:
            report["py_spy"] = py_spy_result(spy, spy_out, args)

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
    report["finished"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def print_table(report: dict, args: argparse.Namespace) -> None:
    """The table, the notes under it and the verdict, from the report."""
    served = report["served"]
    lat, sm, rss = served["latency"], served["server_metrics"], report["rss_mb"]
    raw_rates = [x["img_per_s"] for x in report["raw_phases"]]
    ratios = [p["served_over_raw"] for p in served["rounds"] if p["served_over_raw"] is not None]
    ratio = report["served_over_raw"]
    nan = float("nan")
    print()
    print(f"{'':<40}{'value':>14}")
    print("-" * 54)
    rows = [
        ("requests ok / sent", f"{served['ok']}/{served['requests_sent']}"),
        ("errors", f"{served['errors']}"),
        ("served img/s (incl. decode, HTTP)", f"{served['img_per_s']:.2f}"),
        ("latency p50 / p99 ms", f"{lat.get('p50_ms', nan):.0f} / {lat.get('p99_ms', nan):.0f}"),
        ("raw ORT img/s, mean of phases", f"{report['raw_img_per_s']:.2f}"),
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
        ("RSS MiB idle / after load", f"{rss['idle_after_ready'] or 0:.0f} / {rss['after_load'] or 0:.0f}"),
        ("RSS MiB after warm-up / peak", f"{rss['after_warmup'] or 0:.0f} / {rss['peak_during_load']:.0f}"),
    ]
    for name, value in rows:
        print(f"{name:<40}{value:>14}")
    machine = report["machine"]
    print(
        f"\nraw excludes JPEG decode/resize/HTTP; served includes them. provider {report['provider_active']}; "
        f"load average at start {machine['loadavg_at_start'][0]:.1f}, at end {machine['loadavg_at_end'][0]:.1f}."
    )
    if report["raw_spread"] and report["raw_spread"] > RAW_SPREAD_WARNING:
        print(
            f"warning: raw throughput varied {report['raw_spread']:.1f}x between phases: the machine is shared; "
            "trust the per-round ratios more than the absolute numbers"
        )
    if "py_spy" in report and "by_thread_pct" in report["py_spy"]:
        prof = report["py_spy"]
        print(
            f"\npy-spy ({prof['samples']} on-CPU samples of Python threads; "
            "ORT's own pool threads are native, not seen):"
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
            f"stopped by --max-seconds {args.max_seconds:.0f}: "
            f"{served['requests_sent']} of {args.requests} requests sent"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or RESULTS / f"load_test_{'cuda' if args.provider == 'cuda' else 'cpu'}.json"
    overrides = server_settings(args)
    tmp_root = Path(tempfile.mkdtemp(prefix="dino-load-"))
    try:
        report = run_benchmark(args, overrides, tmp_root, out)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    print_table(report, args)
    print(f"wrote {out}")
    return 0 if report["served"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Hostile uploads against a real ``dino serve`` on 127.0.0.1, while a normal client keeps asking.

For each class of costly input (``tests/service/hostile_images.py``), a few requests of 4 such images
are sent at once, while a probe client posts one real photo to ``/embed`` every ``--probe-interval``
seconds. It records the answers to the hostile requests, the probe's latencies during each class, the
server's peak RSS (sampled), and the server's idle RSS after ``--repeat`` rounds of the costly classes.

    .venv/bin/python benchmarks/hostile_load.py                       # the shipped default model
    .venv/bin/python benchmarks/hostile_load.py --out /tmp/hostile.json

The run is bounded: every request has a timeout, and the whole run stops after the classes. Only
127.0.0.1 is contacted. Prints a table and writes ``benchmarks/results/hostile_load.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.machine import machine_info  # noqa: E402
from benchmarks.process_stats import PeakSampler, rss_mb  # noqa: E402
from dino.data_dir import data_dir  # noqa: E402
from tests.helpers import ServerProcess  # noqa: E402
from tests.service import hostile_images  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DEFAULT_MODEL = REPO / "models" / "dino-vit-tiny8-imagenette-cpu"
#: images per hostile request, and hostile requests sent at once per class
IMAGES_PER_REQUEST = 4
#: seconds any one request may take before the client gives up (the run stays bounded)
REQUEST_TIMEOUT = 120.0


def hostile_classes() -> dict[str, bytes]:
    """name -> one hostile image (sent IMAGES_PER_REQUEST times per request)."""
    return {
        "jpeg, 3000 repeated scans (388 KB)": hostile_images.many_scan_jpeg(side=6000, scans=3000),
        "jpeg, 60 scans (just under the limit)": hostile_images.many_scan_jpeg(side=6000, scans=60),
        "jpeg photo 6000x6000, progressive": hostile_images.large_photo_jpeg(side=6000),
        "png 6000x6000 16-bit (70 KB)": hostile_images.sixteen_bit_png(6000),
        "tiff 16x16, one 32768x32768 tile (1 MB)": hostile_images.huge_tile_tiff(),
    }


def post_images(base: str, data: bytes, count: int) -> tuple[int, float, str]:
    """(status, seconds, detail) of one /embed request with ``count`` copies of ``data``."""
    files = [("images", (f"h{i}.bin", data, "application/octet-stream")) for i in range(count)]
    started = time.perf_counter()
    try:
        answer = httpx.post(f"{base}/embed", files=files, timeout=REQUEST_TIMEOUT)
    except httpx.HTTPError as exc:
        return 0, time.perf_counter() - started, type(exc).__name__
    detail = "" if answer.status_code == 200 else str(answer.json().get("detail", ""))[:80]
    return answer.status_code, time.perf_counter() - started, detail


class Probe(threading.Thread):
    """Posts one normal photo every ``interval`` seconds and records (time sent, latency, status)."""

    def __init__(self, base: str, photo: bytes, interval: float):
        super().__init__(daemon=True)
        self.base, self.photo, self.interval = base, photo, interval
        self.samples: list[tuple[float, float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
            while not self._halt.is_set():
                started = time.perf_counter()
                try:
                    status = client.post(f"{self.base}/embed", files=[("images", ("p.jpg", self.photo))]).status_code
                except httpx.HTTPError:
                    status = 0
                self.samples.append((started, time.perf_counter() - started, status))
                self._halt.wait(max(0.0, self.interval - (time.perf_counter() - started)))

    def between(self, start: float, end: float) -> list[tuple[float, float, int]]:
        return [s for s in self.samples if start <= s[0] <= end]

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=REQUEST_TIMEOUT)


def run(args: argparse.Namespace) -> dict:
    photo = (data_dir() / "imagenet-sample" / "n01440764_tench.JPEG").read_bytes()
    classes = hostile_classes()
    log = Path(tempfile.mkdtemp(prefix="hostile-")) / "server.log"
    env = {"DINO_PREPROCESS_THREADS": None, "DINO_INDEX_DIR": None, "DINO_API_KEY": None, "DINO_PROVIDER": "cpu"}
    report: dict = {"machine": machine_info(), "model": str(args.model), "classes": []}
    with ServerProcess(args.model, log, env=env) as server:
        report["rss_idle_start_mb"] = rss_mb(server.pid)
        sampler = PeakSampler(server.pid, interval=0.1)
        sampler.start()
        probe = Probe(server.url, photo, args.probe_interval)
        probe.start()
        time.sleep(1.0)  # a few probe samples before any hostile request
        baseline = [lat for _, lat, _ in probe.samples]
        for name, data in classes.items():
            sampler.peak = 0.0
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.concurrent) as pool:
                sent = [pool.submit(post_images, server.url, data, IMAGES_PER_REQUEST) for _ in range(args.concurrent)]
                answers = [future.result() for future in sent]
            ended = time.perf_counter()
            time.sleep(args.probe_interval)  # one more probe after the class
            during = probe.between(started, ended)
            report["classes"].append(
                {
                    "class": name,
                    "file_bytes": len(data),
                    "answers": [{"status": s, "seconds": round(t, 2), "detail": d} for s, t, d in answers],
                    "probe_requests": len(during),
                    "probe_max_s": round(max((lat for _, lat, _ in during), default=0.0), 3),
                    "probe_errors": sum(status != 200 for _, _, status in during),
                    "server_peak_rss_mb": round(sampler.peak, 1),
                }
            )
        sampler.peak = 0.0
        for _ in range(args.repeat):  # the allowed costly classes again: does memory come back?
            for data in classes.values():
                post_images(server.url, data, IMAGES_PER_REQUEST)
        report["repeat_peak_rss_mb"] = round(sampler.peak, 1)
        probe.stop()
        sampler.stop()
        time.sleep(args.settle)
        report["rss_idle_after_mb"] = rss_mb(server.pid)
        report["probe_baseline_p50_s"] = round(float(np.median(baseline)), 3) if baseline else None
        report["server_errors_logged"] = server.log().count(" ERROR ")
    return report


def print_table(report: dict) -> None:
    print(f"{'class':<42} {'answers':<22} {'probe max s':>11} {'probe n':>7} {'peak RSS MB':>11}")
    for row in report["classes"]:
        statuses = ",".join(str(a["status"]) for a in row["answers"])
        slowest = max(a["seconds"] for a in row["answers"])
        answers = f"{statuses} ({slowest:.1f}s)"
        print(
            f"{row['class']:<42} {answers:<22} {row['probe_max_s']:>11.2f} {row['probe_requests']:>7} "
            f"{row['server_peak_rss_mb']:>11.0f}"
        )
    print(
        f"idle RSS: {report['rss_idle_start_mb']:.0f} MB at start, {report['rss_idle_after_mb']:.0f} MB after "
        f"the classes and {report['repeat_count']} more rounds "
        f"(peak during those {report['repeat_peak_rss_mb']:.0f} MB); "
        f"probe p50 before any load {report['probe_baseline_p50_s']} s; "
        f"ERROR lines in the server log: {report['server_errors_logged']}"
    )
    for row in report["classes"]:
        details = {a["detail"] for a in row["answers"] if a["detail"]}
        if details:
            print(f"  {row['class']}: {' | '.join(sorted(details))}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model folder to serve")
    parser.add_argument("--concurrent", type=int, default=1, help="hostile requests of 4 images sent at once")
    parser.add_argument("--probe-interval", type=float, default=0.25, help="seconds between probe requests")
    parser.add_argument("--repeat", type=int, default=10, help="extra rounds of all classes before idle RSS")
    parser.add_argument("--settle", type=float, default=3.0, help="idle seconds before the final RSS")
    parser.add_argument("--out", type=Path, default=RESULTS / "hostile_load.json", help="JSON result file")
    args = parser.parse_args(argv)
    report = run(args)
    report["repeat_count"] = args.repeat
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Batch embedding throughput: ``dino embed`` in one process vs the Ray Data pipeline (``--ray local``).

What it measures, for each mode, on Imagenette photos (``imagenette/train`` of the data folder,
the same number from each class, symlinked into a temporary folder so that labels come along):

- the real command, ``python -m dino.cli embed ... --no-progress``, timed from the outside (process
  start, model load, Ray start and shutdown included), into a fresh output folder;
- twice: on a quarter of the images and on all of them. The difference gives the steady rate
  (``(n_full - n_small) / (t_full - t_small)`` img/s, what a long job sees) and the fixed cost of a
  run (``t_full - n_full / rate``: imports, model load, Ray start, actor start, shutdown);
- every image is read once before the first run, so that no mode pays for a cold page cache.

Modes: ``single process`` (decoding threads + one onnxruntime session with its default threads,
i.e. all cores), the same with one onnxruntime thread (``DINO_INTRA_OP_THREADS=1``), and ``Ray
local`` (a local Ray of ``--ray-cpus`` CPUs; ``--workers`` inference actors of one CPU and one
onnxruntime thread each, decoding in Ray tasks on the other CPUs). "Ray overhead" compares like with
like: the single process with one onnxruntime thread against Ray with one actor (Ray's own costs:
model inputs through the object store, scheduling, writing through Ray Data).

Then the estimate: hours to embed 100 million images with N workers, each worker one inference
actor of one CPU (and its share of a CPU for decoding) at the measured per-actor rate, assuming
linear scaling (no shared bottleneck: the images on a filesystem that keeps up, Parquet files
written in parallel).

Usage::

    .venv/bin/python benchmarks/embed_throughput.py                     # 2000 photos, default model
    .venv/bin/python benchmarks/embed_throughput.py --images 2000 --model models/NAME

Writes ``benchmarks/results/embed_throughput.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.machine import machine_info  # noqa: E402
from dino.data_dir import data_dir  # noqa: E402
from dino.images import list_image_files  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DEFAULT_OUTPUT = RESULTS / "embed_throughput.json"
DEFAULT_IMAGES = 2000
#: the small run has this fraction of the images (the difference of the two runs is the steady rate)
SMALL_FRACTION = 4
#: the total of the projection, and the cluster sizes it is worked out for
PROJECTED_IMAGES = 100_000_000
PROJECTED_WORKERS = (1, 8, 64, 512)
SECONDS_PER_HOUR = 3600
#: the service setting of onnxruntime's intra-op threads (0: onnxruntime's default, all cores)
THREADS_ENV = "DINO_INTRA_OP_THREADS"
#: characters of the command's output quoted when it fails
LOG_TAIL_CHARS = 3000
#: a run that takes longer than this is stuck
RUN_TIMEOUT = 1800


def imagenette_sample(count: int) -> list[Path]:
    """``count`` photos of imagenette/train, the same number (sorted by name) from each class."""
    root = data_dir() / "imagenette" / "train"
    classes = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        sys.exit(f"embed benchmark: no Imagenette photos in {root} (set DINO_DATA_DIR)")
    per_class = -(-count // len(classes))
    photos = [photo for folder in classes for photo in list_image_files(folder)[:per_class]]
    return photos[:count]


def link_images(photos: list[Path], folder: Path) -> None:
    """Symlinks ``folder/<class>/<photo>`` (labels from the class folder, no copies)."""
    for photo in photos:
        target = folder / photo.parent.name / photo.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(photo)


def run_embed(images: Path, output: Path, model: Path, extra: list[str], env: dict[str, str], log: Path) -> float:
    """Wall-clock seconds of one ``dino embed`` into a fresh ``output`` (its output goes to ``log``)."""
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, "-m", "dino.cli", "embed", "--no-progress", "--provider", "cpu"]
    command += ["--model", str(model), "--images", str(images), "--output", str(output), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    start = time.perf_counter()
    with open(log, "ab") as fh:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        sys.exit(f"embed benchmark: {' '.join(command)} failed (exit {result.returncode}):\n{tail}")
    return seconds


def measure(
    name: str, extra: list[str], env: dict[str, str], sets: dict[int, Path], model: Path, work: Path, workers: int
) -> dict:
    """Small and full run of one mode: steady rate, fixed cost, end-to-end rate."""
    (small, small_dir), (full, full_dir) = sorted(sets.items())
    log = work / "embed.log"
    t_small = run_embed(small_dir, work / "out-small", model, extra, env, log)
    t_full = run_embed(full_dir, work / "out-full", model, extra, env, log)
    rate = (full - small) / (t_full - t_small) if t_full > t_small else float("nan")
    row = {
        "mode": name,
        "flags": " ".join(extra),
        "env": env,
        "inference_workers": workers,
        "images_small": small,
        "seconds_small": round(t_small, 2),
        "images_full": full,
        "seconds_full": round(t_full, 2),
        "steady_img_per_s": round(rate, 1),
        "fixed_seconds": round(t_full - full / rate, 1),
        "end_to_end_img_per_s": round(full / t_full, 1),
        "steady_img_per_s_per_worker": round(rate / workers, 1),
    }
    print(f"{name}: {row['steady_img_per_s']} img/s steady, {row['fixed_seconds']} s fixed cost", flush=True)
    return row


def projection(rate_per_worker: float) -> dict[str, float]:
    """Hours for :data:`PROJECTED_IMAGES` images on N workers at ``rate_per_worker`` img/s each."""
    return {str(n): round(PROJECTED_IMAGES / (n * rate_per_worker) / SECONDS_PER_HOUR, 2) for n in PROJECTED_WORKERS}


def print_table(rows: list[dict], hours: dict[str, float], rate: float) -> None:
    print()
    print("| mode | workers | steady img/s | per worker | fixed cost (s) | end-to-end img/s (n images) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['mode']} | {row['inference_workers']} | {row['steady_img_per_s']} | "
            f"{row['steady_img_per_s_per_worker']} | {row['fixed_seconds']} | "
            f"{row['end_to_end_img_per_s']} ({row['images_full']}) |"
        )
    ratio = rows[1]["steady_img_per_s"] / rows[2]["steady_img_per_s"]
    print(f"\nRay overhead (single process with one onnxruntime thread / Ray with one actor): {ratio:.2f}x")
    print(f"\n{PROJECTED_IMAGES:,} images at {rate} img/s per Ray worker (linear scaling):")
    print("| workers | hours |")
    print("| ---: | ---: |")
    for workers, value in hours.items():
        print(f"| {workers} | {value} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="photos of the full run")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the first of models/)")
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray")
    parser.add_argument("--workers", type=int, default=None, help="inference actors (default: Ray CPUs - 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if args.images < SMALL_FRACTION * 2:
        parser.error(f"--images must be at least {SMALL_FRACTION * 2}")
    from service.settings import find_default_model

    model = args.model or find_default_model()
    workers = args.workers or max(1, args.ray_cpus - 1)
    photos = imagenette_sample(args.images)
    small = len(photos) // SMALL_FRACTION
    info = machine_info()  # the load average before this benchmark adds its own
    info.update({module: importlib.import_module(module).__version__ for module in ("onnxruntime", "ray", "pyarrow")})
    info["ray_cpus"] = args.ray_cpus
    with tempfile.TemporaryDirectory(prefix="embed-bench-") as tmp:
        work = Path(tmp)
        sets = {small: work / "small", len(photos): work / "full"}
        link_images(photos[:small], sets[small])
        link_images(photos, sets[len(photos)])
        for photo in photos:  # a warm page cache for every mode
            photo.read_bytes()
        batch = ["--batch-size", str(args.batch_size)]
        ray_flags = ["--ray", "local", "--ray-cpus", str(args.ray_cpus), "--workers", str(workers)]
        rows = [
            measure("single process", batch, {}, sets, model, work, 1),
            measure("single process, 1 onnxruntime thread", batch, {THREADS_ENV: "1"}, sets, model, work, 1),
            measure("Ray local", batch + ray_flags, {}, sets, model, work, workers),
        ]
    rate = rows[2]["steady_img_per_s_per_worker"]
    hours = projection(rate)
    print_table(rows, hours, rate)
    report = {
        "machine": info,
        "model": str(model),
        "images": len(photos),
        "batch_size": args.batch_size,
        "rows": rows,
        "ray_overhead_ratio": round(rows[1]["steady_img_per_s"] / rows[2]["steady_img_per_s"], 2),
        "projection": {"images": PROJECTED_IMAGES, "img_per_s_per_worker": rate, "hours_by_workers": hours},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

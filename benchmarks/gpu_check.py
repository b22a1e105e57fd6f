"""A GPU check that is ready to run: one command, under 10 minutes on one H200, results in one folder.

GPU time comes in short leases (about 15 minutes of device time per task, 10 minutes per command,
nothing downloadable there), so everything a GPU should tell us about this project is measured by
one prepared script that cannot fail on a typo, writes what it has after every part, and stays
inside its time budget:

1. ``train_throughput``: img/s of the real training step (``Trainer.train_step``: student and teacher
   forward, DINO loss, backward, per-parameter clipping, fused AdamW, EMA) for ViT-S/16 with
   2x224 + 8x96 crops in bf16 with timm's fused attention (SDPA), on one real batch kept on the GPU
   (the GPU's speed alone), at batch 64 and 128; then through the real data loader at the run's
   batch (``benchmarks/train_throughput.measure``: what a run can get, and the rate that sizes 2.).
   ``train_throughput_compiled``: the same step with ``--compile`` (first step = compile time).
2. ``dino_run``: a short ViT-S/16 DINO run through the real ``python -m dino.cli train`` path on the
   packed Imagenette subset, with k-NN monitoring; its epochs are sized from the measured rate to
   fill ``--train-seconds`` (capped by what the budget leaves), and the process is killed at its
   time limit (the last epoch's checkpoint is used then). ``knn``: ``dino knn`` of the final teacher
   on the packed imagenette/val (DINO protocol, k=20, T=0.07) and of a random-init network.
3. ``export``: ``dino export --fp16`` of the teacher (model.onnx ~87 MB and model_fp16.onnx for
   ViT-S/16: written to the work folder, never to ``--out``, whose files must come back small).
4. ``parity``: the exported ONNX on the CPU onnxruntime against the same teacher in PyTorch on the
   GPU in fp32, bf16 and fp16 autocast (and on the CPU in fp32) on real photos: max abs difference
   and cosine of the embeddings, max abs difference of the attention; plus PyTorch inference img/s.
5. ``ort_cpu_throughput`` always; ``ort_cuda_throughput`` only when onnxruntime has the CUDA
   provider. The GPU machine's image has the CPU-only ``onnxruntime`` wheel, and ``onnxruntime-gpu``
   (~250-340 MB) cannot travel within the 64 MiB working tree, so that part is recorded as
   "skipped: CPU-only onnxruntime" unless the wheel was installed on the machine beforehand (then
   nothing here changes: the part runs by itself).
6. ``attention_boxes`` (``python -m training.attention_boxes --random-baseline``: [CLS] attention
   mass inside 14 hand-drawn boxes, lift over a random network), ``attention_grid``
   (``python -m training.visualize``) and ``plots`` (a throughput bar chart).

Run on the device machine (the tool's ``run``, ``carry: ["benchmarks/gpu_check_data"]``, ``timeout_s: 600``)::

    python3 benchmarks/gpu_check.py --data benchmarks/gpu_check_data --out $OUT/gpu_check

``--out`` receives at most 5 files (the device tool returns at most 8, 16 MiB each, two folders
deep): ``results.json`` (every part: status ok / skipped / error / timeout, seconds, numbers, the
tail of a failing command's output), ``gpu_check.log`` (the progress lines printed to stdout, with
timestamps), ``curves.png`` (the run's training curves), ``attention_grid.png`` and
``throughput.png``. Checkpoints, ONNX files and logs of each command stay in the work folder
(``--work``, default a temporary folder in /dev/shm, deleted at the end unless ``--keep-work``).

Before that, on a CPU machine (seconds to two minutes)::

    .venv/bin/python benchmarks/gpu_data.py      # packs benchmarks/gpu_check_data/images.zip (~27 MiB, git-ignored)
    .venv/bin/python benchmarks/gpu_check.py --dry-run --data benchmarks/gpu_check_data --out /tmp/gpu_check

``--dry-run`` runs every part on the CPU at toy sizes (ViT-Tiny/8, 32 px crops, 1-2 steps, one epoch,
k-NN on 100 photos, one thread per command) through the same commands and functions, so that a first
GPU run does not die on a typo; only ``torch.compile`` differs, with the "eager" backend there (dynamo
without inductor's C++ build, which takes minutes on a CPU). It took 80-90 s on the busy 2-core
development machine. Without ``--dry-run`` and without a GPU the script refuses at once.

Time plan on one H200 (16 CPU cores) at the default ``--budget 510`` (the device tool stops a
command at 600 s): environment and unpacking ~5 s; ``train_throughput`` ~45 s;
``train_throughput_compiled`` at most 120 s (a compile that takes longer is reported as a timeout);
``dino_run`` gets what is left after keeping 150 s for the parts after it, at most
``--train-seconds`` (240) of epochs plus ~40 s of start-up and k-NN, i.e. about 2.5-4 minutes;
``knn`` ~15 s; ``export`` ~45 s (two exports, on the CPU); ``parity`` ~15 s; ``attention_boxes``
~40 s (one more export, for the random baseline: left out when time is short); ``attention_grid``
~5 s; ``ort_cpu_throughput`` ~10 s. A part that would start with too little time left is skipped,
never half-run. These are estimates: nothing here has run on a GPU yet.

Multi-crop augmentation is CPU work (25-40 ms per image on one core of the development machine), so
with 14 loader processes the run is expected to be data-bound at a few hundred img/s, well below the
GPU rate of the step: ``train_throughput.with_loader`` and the run's per-epoch ``data_wait_fraction``
show by how much. The run's epochs are sized from that measured rate; an epoch lists the packed
photos several times (symbolic links) so that it lasts ~25 s and the per-epoch costs (loader start,
0.7 GB checkpoint in /dev/shm, curves) stay small.

Dependencies. Nothing is installed: the project is imported from the repository root (the
``dino`` console script is not needed: ``python -m dino.cli``). Needed: torch, torchvision, timm,
numpy, pillow, pyyaml, tqdm, matplotlib, onnx, onnxscript (the dynamo ONNX exporter) and onnxruntime;
the machine's image lists all of them (numpy, pillow, pyyaml and tqdm are assumed to come with
torch, timm and torchvision anyway). A missing one stops the check at once with its name. Nothing of
``service/`` (FastAPI, pydantic, FAISS) is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: import name -> distribution name, for the message when one is missing
REQUIRED_MODULES = {
    "torch": "torch",
    "torchvision": "torchvision",
    "timm": "timm",
    "numpy": "numpy",
    "PIL": "pillow",
    "yaml": "pyyaml",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "onnx": "onnx",
    "onnxscript": "onnxscript",
    "onnxruntime": "onnxruntime",
}
DEFAULT_DATA = REPO / "benchmarks" / "gpu_check_data"
PAPER_CONFIG = REPO / "configs" / "vit_small16_paper.yaml"
#: the keys of PAPER_CONFIG that make the measured model and its crops
MODEL_KEYS = ("arch", "patch_size", "global_size", "local_size", "local_crops", "out_dim")
RESULTS_FILE = "results.json"
LOG_FILE = "gpu_check.log"
MODEL_NAME = "dino-gpu-check"
#: photos of the attention grid (all of them have hand-drawn boxes, so they are packed)
GRID_PHOTOS = (
    "n01440764_tench.JPEG",
    "n01860187_black_swan.JPEG",
    "n02007558_flamingo.JPEG",
    "n02114548_white_wolf.JPEG",
)
#: the DINO k-NN protocol
KNN_K, KNN_T = 20, 0.07
#: seconds kept for the parts after the DINO run (knn, export, parity, boxes, grid, ORT, plots)
POST_RUN_RESERVE = 150.0
#: seconds a `dino train` process needs besides its epochs (start-up, k-NN evaluations, last save)
RUN_OVERHEAD = 60.0
#: per-epoch cost besides the images: loader processes restarting, checkpoint, curves
EPOCH_OVERHEAD = 4.0
#: an epoch should last about this long (the packed training set is listed several times otherwise)
EPOCH_TARGET_SECONDS = 25.0
#: most seconds for the compiled-step measure (compiling ViT-S's training step is most of it)
COMPILE_CAP = 120.0
#: img/s assumed for sizing the run when the throughput part failed
FALLBACK_IMG_S = 300.0
#: a work folder in /dev/shm needs this much free space (two ~0.7 GB checkpoints at a save, ONNX files)
SHM_NEEDED_BYTES = 8 * 2**30

SIZES: dict[str, dict[str, Any]] = {
    "gpu": {
        "device": "cuda",
        "model": None,  # the paper's ViT-S/16 recipe: read from PAPER_CONFIG (paper_model)
        "throughput_batches": [64, 128],
        "warmup": 5,
        "steps": 20,
        "compile_batch": 64,
        "run_batch": None,  # --batch-size
        "knn_monitor_max_images": 1000,
        "knn_max_images": 0,  # all the packed photos
        "parity_images": 64,
        "bench_batch": 128,
        "bench_seconds": 2.0,
        "ort_cpu_batch": 16,
        "ort_cuda_batch": 64,
        "ort_seconds": 3.0,
        "log_every_steps": 10,
        "grid_cell": 160,
    },
    # the same commands at toy sizes on the CPU (seconds per part)
    "dry": {
        "device": "cpu",
        "model": {
            "arch": "vit_tiny",
            "patch_size": 8,
            "global_size": 32,
            "local_size": 16,
            "local_crops": 2,
            "out_dim": 256,
        },
        "throughput_batches": [4],
        "warmup": 1,
        "steps": 1,
        "compile_batch": 4,
        "run_batch": 4,
        "knn_monitor_max_images": 20,
        "knn_max_images": 100,
        "parity_images": 4,
        "bench_batch": 4,
        "bench_seconds": 0.0,
        "ort_cpu_batch": 2,
        "ort_cuda_batch": 2,
        "ort_seconds": 0.0,
        "log_every_steps": 1,
        "grid_cell": 64,
    },
}


def paper_model() -> dict[str, Any]:
    """The model and crops of the paper's recipe, as ``configs/vit_small16_paper.yaml`` has them."""
    import yaml

    config = yaml.safe_load(PAPER_CONFIG.read_text())
    return {key: config[key] for key in MODEL_KEYS}


class PartSkipped(Exception):
    """A part that cannot run (a part it needs failed, too little time): recorded as skipped."""


class ChildFailed(Exception):
    """A command of a part exited non-zero or ran out of time."""

    def __init__(self, message: str, tail: str, timed_out: bool):
        super().__init__(message)
        self.tail, self.timed_out = tail, timed_out


# ---------------------------------------------------------------- small helpers


def _is_progress_bar(text: str) -> bool:
    """tqdm's lines (the training and k-NN bars): kept in the command's log, not echoed."""
    return "it/s]" in text or "s/it]" in text or "%|" in text


def _tail(text: str, chars: int = 3000) -> str:
    lines = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(line for line in lines if line.strip() and not _is_progress_bar(line))[-chars:]


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


def _round(value: Any, digits: int = 4) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def _default_work_dir() -> Path:
    """/dev/shm when it has room (the per-epoch checkpoint fsync costs nothing there), else /tmp."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(shm).free >= SHM_NEEDED_BYTES:
                return Path(tempfile.mkdtemp(prefix="gpu_check-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="gpu_check-"))


# ---------------------------------------------------------------- the orchestrating process


class GpuCheck:
    """Runs the parts in order, each guarded and timed, and rewrites results.json after each one."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dry = bool(args.dry_run)
        self.sizes = dict(SIZES["dry" if self.dry else "gpu"])
        if self.sizes["model"] is None:
            self.sizes["model"] = paper_model()
        self.device = self.sizes["device"]
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work) if args.work else _default_work_dir()
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(exist_ok=True)
        self.log_file = open(self.out / LOG_FILE, "w")  # noqa: SIM115  (closed in run())
        self.data = self.work / "data"
        self.run_dir = self.work / "run"
        self.model_dir = self.work / "models" / MODEL_NAME
        self.num_workers = 0 if self.dry else max(2, min(14, (os.cpu_count() or 4) - 2))
        self.run_batch: int = self.sizes["run_batch"] or args.batch_size
        self.results: dict[str, Any] = {
            "check": "gpu_check",
            "dry_run": self.dry,
            "command": [sys.executable, *sys.argv],
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "budget_seconds": args.budget,
            "work_dir": str(self.work),
            "parts": {},
        }

    # ------------------------------------------------------------ logging and results

    def log(self, message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} +{time.monotonic() - self.t0:6.1f}s {message}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.results["wall_seconds"] = round(time.monotonic() - self.t0, 1)
        tmp = self.out / f".{RESULTS_FILE}.tmp"
        tmp.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        os.replace(tmp, self.out / RESULTS_FILE)

    def part(self, name: str, fn: Callable[[], dict | None], min_seconds: float = 0.0) -> dict:
        """Run one part; any failure is recorded and the check goes on."""
        record: dict[str, Any]
        if name in (self.args.skip or []):
            record = {"status": "skipped", "reason": "--skip"}
        elif not self.dry and self.remaining() < min_seconds:
            record = {"status": "skipped", "reason": f"out of time budget ({self.remaining():.0f} s left)"}
        else:
            self.log(f"== {name}")
            start = time.monotonic()
            try:
                record = {"status": "ok", **(fn() or {})}
            except PartSkipped as exc:
                record = {"status": "skipped", "reason": str(exc)}
            except ChildFailed as exc:
                record = {"status": "timeout" if exc.timed_out else "error", "error": str(exc), "output_tail": exc.tail}
            except Exception as exc:  # one failing part must not stop the others
                record = {
                    "status": "error",
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()[-3000:],
                }
            record["seconds"] = round(time.monotonic() - start, 1)
        self.results["parts"][name] = record
        self.save()
        took = f" in {record['seconds']} s" if "seconds" in record else ""
        detail = record.get("reason") or record.get("error")
        self.log(f"   {name}: {record['status']}{took}" + (f": {detail[:300]}" if detail else ""))
        return record

    # ------------------------------------------------------------ child processes

    def child(self, name: str, cmd: list[str], timeout: float) -> str:
        """Run ``cmd`` from the repository root; its output goes to work/logs/NAME.log, lines that are not
        progress bars are echoed. Raises ChildFailed on a non-zero exit or at ``timeout`` (the process
        group is ended: data-loader workers too)."""
        timeout = max(1.0, timeout)
        log_path = self.work / "logs" / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        env["PYTHONUNBUFFERED"] = "1"
        if self.dry:
            # one thread per command: on a shared, busy CPU two spinning OpenMP threads made a toy
            # training step take seconds instead of 0.15 s
            env.setdefault("OMP_NUM_THREADS", "1")
        self.log(f"   $ {' '.join(str(c) for c in cmd)}  (limit {timeout:.0f} s)")
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        chunks: list[str] = []

        def pump() -> None:
            assert proc.stdout is not None
            with open(log_path, "w") as log_file:
                for raw in proc.stdout:
                    text = raw.decode("utf-8", "replace")
                    chunks.append(text)
                    log_file.write(text)
                    line = text.rstrip("\n").rsplit("\r", 1)[-1].rstrip()
                    if line and not _is_progress_bar(line):
                        self.log(f"   [{name}] {line[:400]}")

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        reader.join(timeout=10)
        text = "".join(chunks)
        if timed_out:
            raise ChildFailed(f"{name}: no result within {timeout:.0f} s; stopped", _tail(text), True)
        if proc.returncode != 0:
            raise ChildFailed(f"{name}: exit code {proc.returncode}", _tail(text), False)
        return text

    def worker(self, name: str, params: dict, timeout: float) -> dict:
        """One of this script's own measurements (``--worker``) in a process of its own."""
        params_path = self.work / f"{name}.params.json"
        result_path = self.work / f"{name}.result.json"
        params_path.write_text(json.dumps(params))
        result_path.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", params["worker"]]
        self.child(name, [*cmd, "--params", str(params_path), "--result", str(result_path)], timeout)
        return json.loads(result_path.read_text())

    def timeout_for(self, cap: float, keep: float = 0.0) -> float:
        """``cap`` seconds, or what the budget leaves after keeping ``keep`` for later parts."""
        if self.dry:
            return cap
        return min(cap, self.remaining() - keep)

    # ------------------------------------------------------------ the parts

    def environment(self) -> dict:
        import torch

        from benchmarks.machine import machine_info

        versions = {}
        for module in (
            "torch",
            "torchvision",
            "timm",
            "numpy",
            "PIL",
            "yaml",
            "matplotlib",
            "onnx",
            "onnxscript",
            "onnxruntime",
        ):
            versions[module] = getattr(importlib.import_module(module), "__version__", "?")
        import onnxruntime as ort

        info: dict[str, Any] = {
            "machine": machine_info(),
            "versions": versions,
            "ort_providers": ort.get_available_providers(),
            "device": self.device,
            "num_workers": self.num_workers,
            "cuda_available": torch.cuda.is_available(),
        }
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = {
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gb": round(props.total_memory / 1e9, 1),
                "multiprocessors": props.multi_processor_count,
                "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(),
                "flash_sdp": torch.backends.cuda.flash_sdp_enabled(),
                "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
                "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            }
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                smi = subprocess.run(
                    [
                        "nvidia-smi",
                        "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                        "--format=csv,noheader",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=15,
                )
                info["nvidia_smi"] = smi.stdout.strip()
        self.results["machine"] = info["machine"]
        return info

    def unpack_data(self) -> dict:
        from benchmarks.gpu_data import unpack

        manifest = unpack(Path(self.args.data), self.data)
        self.results["data"] = manifest
        return {"images": manifest["images"], "archive_mib": manifest["mib"], "unpacked_to": str(self.data)}

    @property
    def train_dir(self) -> Path:
        return self.data / "imagenette" / "train"

    @property
    def val_dir(self) -> Path:
        return self.data / "imagenette" / "val"

    @property
    def photos_dir(self) -> Path:
        return self.data / "imagenet-sample"

    def _throughput_params(self, batch_sizes: list[int], compile_: bool) -> dict:
        """The throughput worker's parameters, eager or compiled."""
        s = self.sizes
        return {
            "worker": "throughput",
            "device": self.device,
            "dry_run": self.dry,
            "model": s["model"],
            "data": str(self.train_dir),
            "batch_sizes": batch_sizes,
            "warmup": s["warmup"],
            "steps": s["steps"],
            "compile": compile_,
            "num_workers": 0,
        }

    def train_throughput(self) -> dict:
        params = self._throughput_params(self.sizes["throughput_batches"], compile_=False)
        # the loader-inclusive measure, at the run's batch and worker count
        params.update(loader_batch=self.run_batch, num_workers=self.num_workers)
        result = self.worker("train_throughput", params, self.timeout_for(150, keep=300))
        self.results.setdefault("summary", {})["train_img_s"] = {
            f"eager_b{r['batch']}": _round(r["img_s"], 1) for r in result["rows"]
        }
        if result.get("with_loader"):
            self.results["summary"]["train_img_s"]["with_loader"] = _round(result["with_loader"]["img_s"], 1)
        return result

    def train_throughput_compiled(self) -> dict:
        params = self._throughput_params([self.sizes["compile_batch"]], compile_=True)
        timeout = self.timeout_for(COMPILE_CAP, keep=POST_RUN_RESERVE + RUN_OVERHEAD + 60)
        if timeout < 45:
            raise PartSkipped(f"out of time budget ({self.remaining():.0f} s left)")
        result = self.worker("train_throughput_compiled", params, timeout)
        row = result["rows"][0]
        summary = self.results.setdefault("summary", {}).setdefault("train_img_s", {})
        summary[f"compiled_b{row['batch']}"] = _round(row["img_s"], 1)
        eager = self.results["parts"].get("train_throughput", {}).get("rows", [])
        same = [r for r in eager if r["batch"] == row["batch"]]
        if same:
            result["speedup_vs_eager"] = _round(row["img_s"] / same[0]["img_s"], 3)
        return result

    def plan_run(self) -> dict:
        """Epochs, repeats of the training list and time limit of the DINO run."""
        n_train = sum(1 for p in self.train_dir.rglob("*") if p.is_file())
        if self.dry:
            return {
                "epochs": self.args.epochs or 1,
                "repeat": 1,
                "n_train": n_train,
                "train_seconds": None,
                "timeout": 600.0,
                "rate_img_s": None,
            }
        tp = self.results["parts"].get("train_throughput", {})
        rate = (tp.get("with_loader") or {}).get("img_s") or FALLBACK_IMG_S
        if tp.get("rows"):  # never faster than the GPU step itself
            rate = min(rate, max(r["img_s"] for r in tp["rows"]))
        train_seconds = min(self.args.train_seconds, self.remaining() - POST_RUN_RESERVE - RUN_OVERHEAD)
        if train_seconds < 30:
            raise PartSkipped(f"out of time budget ({self.remaining():.0f} s left)")
        repeat = max(1, min(8, round(rate * EPOCH_TARGET_SECONDS / n_train)))
        epoch_seconds = n_train * repeat / rate + EPOCH_OVERHEAD
        epochs = self.args.epochs or max(1, int(train_seconds // epoch_seconds))
        timeout = min(train_seconds + RUN_OVERHEAD + 30, self.remaining() - POST_RUN_RESERVE + 30)
        return {
            "epochs": epochs,
            "repeat": repeat,
            "n_train": n_train,
            "train_seconds": round(train_seconds),
            "timeout": timeout,
            "rate_img_s": round(rate, 1),
            "expected_epoch_seconds": round(epoch_seconds, 1),
        }

    def training_view(self, repeat: int) -> Path:
        """The training folder: the packed train split itself, or a folder that lists it ``repeat``
        times through symbolic links, so that an epoch lasts long enough for the per-epoch costs
        (loader start, 0.7 GB checkpoint, curves) to stay small. Labels are ignored in training."""
        if repeat == 1:
            return self.train_dir
        view = self.work / f"train_x{repeat}"
        shutil.rmtree(view, ignore_errors=True)
        for r in range(repeat):
            for path in self.train_dir.rglob("*"):
                if path.is_file():
                    link = view / f"copy{r}" / path.relative_to(self.train_dir)
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(path)
        return view

    def dino_run(self) -> dict:
        s, m = self.sizes, self.sizes["model"]
        plan = self.plan_run()
        epochs = plan["epochs"]
        cmd = [
            sys.executable, "-m", "dino.cli", "train",
            "--config", str(PAPER_CONFIG),
            "--data", str(self.training_view(plan["repeat"])),
            "--output-dir", str(self.run_dir),
            "--device", self.device,
            "--precision", "bf16",
            "--arch", m["arch"], "--patch-size", str(m["patch_size"]),
            "--global-size", str(m["global_size"]), "--local-size", str(m["local_size"]),
            "--local-crops", str(m["local_crops"]), "--out-dim", str(m["out_dim"]),
            "--epochs", str(epochs),
            "--warmup-epochs", str(max(1, round(epochs / 10)) if epochs > 1 else 0),
            "--batch-size", str(self.run_batch),
            "--num-workers", str(self.num_workers),
            "--knn-train", str(self.train_dir), "--knn-val", str(self.val_dir),
            "--knn-every", str(max(1, math.ceil(epochs / 2))),
            "--knn-max-images", str(s["knn_monitor_max_images"]),
            "--knn-k", str(KNN_K), "--knn-temperature", str(KNN_T),
            "--log-every-steps", str(s["log_every_steps"]),
        ]  # fmt: skip
        if self.dry:
            cmd += ["--max-steps-per-epoch", "2"]
        shutil.rmtree(self.run_dir, ignore_errors=True)  # a fresh run, never a resume of an older one
        self.log(f"   plan: {plan}")
        failure: ChildFailed | None = None
        start = time.monotonic()
        try:
            self.child("dino_run", cmd, plan["timeout"])
        except ChildFailed as exc:
            failure = exc
        wall = time.monotonic() - start
        records = _read_jsonl(self.run_dir / "log.jsonl")
        epoch_records = [r for r in records if r.get("type") == "epoch"]
        keys = ("epoch", "loss", "img_s", "seconds", "data_wait_fraction", "teacher_entropy", "kl_teacher_student")
        result: dict[str, Any] = {
            "plan": plan,
            "command": " ".join(cmd),
            "wall_seconds": round(wall, 1),
            "epochs_done": len(epoch_records),
            "epochs": [{k: _round(r.get(k)) for k in keys} for r in epoch_records],
            "knn_during_training": [
                {k: _round(r.get(k)) for k in ("epoch", "top1", "top5", "n_train", "n_val", "seconds")}
                for r in records
                if r.get("type") == "knn"
            ],
        }
        if epoch_records:
            seconds = sum(r["seconds"] for r in epoch_records)
            images = sum(r["img_s"] * r["seconds"] for r in epoch_records)
            result["mean_img_s"] = round(images / max(seconds, 1e-9), 1)
            result["epoch_seconds_share_of_wall"] = round(seconds / max(wall, 1e-9), 3)
            self.results.setdefault("summary", {})["dino_run"] = {
                "epochs": len(epoch_records),
                "img_s": result["mean_img_s"],
                "data_wait_fraction": _round(epoch_records[-1]["data_wait_fraction"], 3),
                "knn_top1_last": (result["knn_during_training"] or [{}])[-1].get("top1"),
            }
        curves = self.run_dir / "curves.png"
        if curves.is_file():
            shutil.copy(curves, self.out / "curves.png")
            result["curves_png"] = str(self.out / "curves.png")
        if failure is not None:
            if failure.timed_out and (self.run_dir / "checkpoint.pth").is_file():
                result.update(status="timeout", error=str(failure), output_tail=failure.tail)
                return result  # the last completed epoch's checkpoint serves the later parts
            raise failure
        return result

    def need_checkpoint(self) -> Path:
        checkpoint = self.run_dir / "checkpoint.pth"
        if not checkpoint.is_file():
            raise PartSkipped("no checkpoint: the DINO run did not finish an epoch")
        return checkpoint

    def need_model(self) -> Path:
        if not (self.model_dir / "model.json").is_file():
            raise PartSkipped("no exported model: the export part failed")
        return self.model_dir

    def knn(self) -> dict:
        checkpoint = self.need_checkpoint()
        base = [
            sys.executable, "-m", "dino.cli", "knn", "--checkpoint", str(checkpoint),
            "--train", str(self.train_dir), "--val", str(self.val_dir),
            "--k", str(KNN_K), "--temperature", str(KNN_T),
            "--batch-size", "256", "--num-workers", str(self.num_workers), "--device", self.device,
            "--max-images", str(self.sizes["knn_max_images"]),
        ]  # fmt: skip
        result: dict[str, Any] = {}
        for label, extra in (("teacher", []), ("random_init", ["--baseline", "random"])):
            output = self.work / f"knn_{label}.json"
            self.child(f"knn_{label}", [*base, *extra, "--output", str(output)], self.timeout_for(120, keep=60))
            result[label] = json.loads(output.read_text())
        self.results.setdefault("summary", {})["knn_top1"] = {k: _round(v["top1"], 2) for k, v in result.items()}
        return result

    def export(self) -> dict:
        checkpoint = self.need_checkpoint()
        cmd = [
            sys.executable, "-m", "dino.cli", "export", "--checkpoint", str(checkpoint),
            "--output", str(self.model_dir), "--fp16",
        ]  # fmt: skip
        knn_result = self.work / "knn_teacher.json"
        if knn_result.is_file():
            cmd += ["--knn-result", str(knn_result)]
        shutil.rmtree(self.model_dir, ignore_errors=True)
        self.child("export", cmd, self.timeout_for(240, keep=40))
        meta = json.loads((self.model_dir / "model.json").read_text())
        self.results.setdefault("summary", {})["export_mb"] = {
            name: round(info["file_bytes"] / 1e6, 1) for name, info in meta["export"].items() if isinstance(info, dict)
        }
        return {"model_dir": str(self.model_dir), "report": meta["export"], "sha256": meta["sha256"]}

    def parity(self) -> dict:
        checkpoint, model_dir = self.need_checkpoint(), self.need_model()
        images = self.val_images(self.sizes["parity_images"])
        params = {
            "worker": "parity",
            "device": self.device,
            "checkpoint": str(checkpoint),
            "model_dir": str(model_dir),
            "images": [str(p) for p in images],
            "bench_batch": self.sizes["bench_batch"],
            "bench_seconds": self.sizes["bench_seconds"],
        }
        result = self.worker("parity", params, self.timeout_for(120, keep=40))
        self.results.setdefault("summary", {})["parity_embedding_cosine_min"] = {
            k: v["embedding"]["cosine_min"] for k, v in result["vs_ort_cpu_fp32"].items()
        }
        return result

    def val_images(self, count: int) -> list[Path]:
        """``count`` val photos, round-robin over the classes."""
        per_class = [sorted(p.iterdir()) for p in sorted(self.val_dir.iterdir()) if p.is_dir()]
        chosen: list[Path] = []
        for i in range(max(len(files) for files in per_class)):
            chosen += [files[i] for files in per_class if i < len(files)]
        return chosen[:count]

    def attention_boxes(self) -> dict:
        model_dir = self.need_model()
        output = self.work / "attention_boxes.json"
        cmd = [sys.executable, "-m", "training.attention_boxes", "--model", str(model_dir),
               "--images-dir", str(self.photos_dir), "--output", str(output)]  # fmt: skip
        with_baseline = self.dry or self.remaining() > 90
        if with_baseline:
            cmd.append("--random-baseline")  # one more export: dropped when time is short
        self.child("attention_boxes", cmd, self.timeout_for(180, keep=20))
        scores = json.loads(output.read_text())
        means = {name: {k: _round(v) for k, v in r["mean"].items()} for name, r in scores["models"].items()}
        self.results.setdefault("summary", {})["attention_lift"] = {k: v["lift"] for k, v in means.items()}
        lifts = {
            name: {photo: _round(v["lift"]) for photo, v in r["per_image"].items()}
            for name, r in scores["models"].items()
        }
        return {"random_baseline": with_baseline, "mean": means, "lift_per_image": lifts}

    def attention_grid(self) -> dict:
        model_dir = self.need_model()
        photos = [self.photos_dir / name for name in GRID_PHOTOS if (self.photos_dir / name).is_file()]
        photos = photos or sorted(self.photos_dir.iterdir())[:4]
        output = self.out / "attention_grid.png"
        cmd = [sys.executable, "-m", "training.visualize", "--model", str(model_dir), "--output", str(output),
               "--cell", str(self.sizes["grid_cell"]), "--images", *map(str, photos)]  # fmt: skip
        self.child("attention_grid", cmd, self.timeout_for(60, keep=10))
        return {"png": str(output), "photos": [p.name for p in photos]}

    def ort_throughput(self, provider: str) -> dict:
        model_dir = self.need_model()
        if provider == "cuda":
            import onnxruntime as ort

            providers = ort.get_available_providers()
            if "CUDAExecutionProvider" not in providers:
                raise PartSkipped(f"CPU-only onnxruntime {ort.__version__} (providers: {', '.join(providers)})")
        params = {
            "worker": "ort",
            "provider": provider,
            "model_dir": str(model_dir),
            "batch": self.sizes[f"ort_{provider}_batch"],
            "seconds": self.sizes["ort_seconds"],
        }
        result = self.worker(f"ort_{provider}_throughput", params, self.timeout_for(90, keep=5))
        self.results.setdefault("summary", {})[f"ort_{provider}_img_s"] = {
            r["precision"]: r.get("img_per_s") for r in result["rows"]
        }
        return result

    def plots(self) -> dict:
        """throughput.png: the training step's img/s (eager, compiled, with the loader, the run) and inference."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        parts = self.results["parts"]
        train: list[tuple[str, float]] = []
        for row in parts.get("train_throughput", {}).get("rows", []):
            train.append((f"step, eager\nbatch {row['batch']}", row["img_s"]))
        for row in parts.get("train_throughput_compiled", {}).get("rows", []):
            train.append((f"step, compiled\nbatch {row['batch']}", row["img_s"]))
        loader = parts.get("train_throughput", {}).get("with_loader")
        if loader:
            train.append((f"step + loader\n{loader['num_workers']} workers", loader["img_s"]))
        if parts.get("dino_run", {}).get("mean_img_s"):
            train.append(("dino train run\n(epoch mean)", parts["dino_run"]["mean_img_s"]))
        infer: list[tuple[str, float]] = []
        for name, value in (parts.get("parity", {}).get("torch_inference_img_s") or {}).items():
            if isinstance(value, (int, float)):
                infer.append((f"torch {name}", value))
        for provider in ("cpu", "cuda"):
            for row in parts.get(f"ort_{provider}_throughput", {}).get("rows", []):
                if row.get("img_per_s"):
                    infer.append((f"ORT {provider}\n{row['precision']}", row["img_per_s"]))
        if not train and not infer:
            raise PartSkipped("no throughput was measured")
        fig, axes = plt.subplots(
            1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [max(len(train), 1), max(len(infer), 1)]}
        )
        m = self.sizes["model"]
        titles = (
            f"training img/s, {m['arch']}/{m['patch_size']}, "
            f"2x{m['global_size']} + {m['local_crops']}x{m['local_size']} px crops, bf16",
            f"inference img/s, {m['global_size']} px",
        )
        for ax, bars, title in zip(axes, (train, infer), titles, strict=True):
            if bars:
                labels, values = zip(*bars, strict=True)
                drawn = ax.bar(range(len(values)), values, color=[f"C{i}" for i in range(len(values))])
                ax.bar_label(drawn, fmt="%.0f", fontsize=8)
                ax.set_xticks(range(len(values)), labels, fontsize=7)
            ax.set_title(title, fontsize=9)
        gpu = (parts.get("environment", {}).get("gpu") or {}).get("name", "CPU (dry run)")
        fig.suptitle(f"gpu_check on {gpu}")
        fig.tight_layout()
        output = self.out / "throughput.png"
        fig.savefig(output, dpi=100)
        plt.close(fig)
        return {"png": str(output)}

    # ------------------------------------------------------------ all of it

    def run(self) -> int:
        self.log(f"gpu_check {'dry run on the CPU' if self.dry else 'on the GPU'}: out {self.out}, work {self.work}, "
                 f"budget {self.args.budget:.0f} s")  # fmt: skip
        try:
            self.part("environment", self.environment)
            data = self.part("data", self.unpack_data)
            if data["status"] != "ok":
                self.log("no data: nothing else can run")
                return 1
            self.part("train_throughput", self.train_throughput, min_seconds=60)
            self.part("train_throughput_compiled", self.train_throughput_compiled, min_seconds=60)
            self.part("dino_run", self.dino_run, min_seconds=POST_RUN_RESERVE + 60)
            self.part("knn", self.knn, min_seconds=20)
            self.part("export", self.export, min_seconds=40)
            self.part("parity", self.parity, min_seconds=15)
            self.part("attention_boxes", self.attention_boxes, min_seconds=20)
            self.part("attention_grid", self.attention_grid, min_seconds=8)
            self.part("ort_cpu_throughput", lambda: self.ort_throughput("cpu"), min_seconds=8)
            self.part("ort_cuda_throughput", lambda: self.ort_throughput("cuda"), min_seconds=8)
            self.part("plots", self.plots)
        finally:
            statuses = {name: part["status"] for name, part in self.results["parts"].items()}
            self.results["statuses"] = statuses
            self.results["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            self.save()
            self.log(f"done in {time.monotonic() - self.t0:.0f} s: {json.dumps(statuses)}")
            self.log(f"summary: {json.dumps(self.results.get('summary', {}))}")
            self.log_file.close()
            if not self.args.keep_work and not self.args.work:
                shutil.rmtree(self.work, ignore_errors=True)
        failed = [name for name, status in statuses.items() if status in ("error", "timeout")]
        return 1 if failed else 0


# ---------------------------------------------------------------- workers (one process per measurement)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def worker_throughput(p: dict) -> dict:
    """img/s of ``Trainer.train_step`` on one real batch kept on the device, per batch size; with
    ``num_workers`` also through the real data loader (``train_throughput.measure``)."""
    import functools
    import gc

    import torch

    from benchmarks.train_throughput import measure
    from training.config import TrainConfig
    from training.train import Trainer

    if p["compile"] and p["dry_run"]:
        # dry run: dynamo traces the same modules, without inductor's C++/Triton build (minutes on a CPU)
        torch.compile = functools.partial(torch.compile, backend="eager")
    device = p["device"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in p["batch_sizes"]:
            cfg = TrainConfig(
                **p["model"], data=p["data"], output_dir=tmp, device=device, precision="bf16", batch_size=batch,
                num_workers=0, epochs=100, compile=p["compile"],
            )  # fmt: skip
            trainer = Trainer(cfg)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            crops, _ = next(iter(trainer.loader))
            assert crops is not None
            crops = [c.to(trainer.device) for c in crops]
            _sync(device)
            start = time.perf_counter()
            trainer.train_step(crops, 1, 0)  # epoch 1: the last layer is trained, as in steady state
            _sync(device)
            first = time.perf_counter() - start
            for i in range(1, p["warmup"]):
                trainer.train_step(crops, 1, i)
            _sync(device)
            start = time.perf_counter()
            for i in range(p["steps"]):
                trainer.train_step(crops, 1, p["warmup"] + i)
            _sync(device)
            elapsed = time.perf_counter() - start
            row = {
                "batch": batch,
                "img_s": batch * p["steps"] / elapsed,
                "step_ms": 1000 * elapsed / p["steps"],
                "first_step_s": round(first, 2),
                "precision": trainer.precision,
                "compile": p["compile"],
                "fused_adamw": bool(trainer.optimizer.defaults.get("fused")),
                "fused_attention": all(
                    m.fused_attn for m in trainer.student_module.modules() if hasattr(m, "fused_attn")
                ),
            }
            if device == "cuda":
                row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            rows.append(row)
            print(f"batch {batch}: {row['img_s']:.1f} img/s, first step {first:.1f} s", flush=True)
            del trainer, crops
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        result: dict[str, Any] = {"model": p["model"], "rows": rows, "warmup": p["warmup"], "steps": p["steps"]}
        if "loader_batch" in p:
            workers = p["num_workers"]
            cfg = TrainConfig(
                **p["model"], data=p["data"], output_dir=tmp, device=device, precision="bf16",
                batch_size=p["loader_batch"], num_workers=workers, epochs=100,
            )  # fmt: skip
            # one round of batches (one per worker) warms up, three rounds are timed
            warmup, steps = (workers, 3 * workers) if workers else (1, 1)
            loader = measure(cfg, warmup, steps)
            result["with_loader"] = {**loader, "batch": p["loader_batch"], "num_workers": workers, "steps": steps}
            print(f"with the data loader ({workers} workers): {loader['img_s']:.1f} img/s", flush=True)
    return result


def _compare(reference: dict, other: dict) -> dict:
    import numpy as np

    a, b = reference["embedding"].astype(np.float64), other["embedding"].astype(np.float64)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {
        "embedding": {
            "max_abs_diff": float(np.abs(a - b).max()),
            "mean_abs_diff": float(np.abs(a - b).mean()),
            "reference_max_abs": float(np.abs(a).max()),
            "cosine_min": float(cosine.min()),
            "cosine_mean": float(cosine.mean()),
        },
        "attention_max_abs_diff": float(np.abs(reference["attention"] - other["attention"]).max()),
        "patch_tokens_max_abs_diff": float(np.abs(reference["patch_tokens"] - other["patch_tokens"]).max()),
    }


def worker_parity(p: dict) -> dict:
    """The exported model on the CPU onnxruntime vs the checkpoint's teacher in PyTorch on the device."""
    import copy

    import numpy as np
    import onnxruntime as ort
    import torch
    from PIL import Image

    from benchmarks.inference import time_runs
    from dino.model_folder import OUTPUT_NAMES
    from training.augmentation import eval_transform
    from training.backbone import set_fused_attention
    from training.export_graph import DinoExportModule
    from training.weights import load_checkpoint_teacher

    model_dir = Path(p["model_dir"])
    meta = json.loads((model_dir / "model.json").read_text())
    transform = eval_transform(meta["image_size"], meta["resize_size"], meta["mean"], meta["std"])
    x = np.stack([transform(Image.open(f).convert("RGB")).numpy() for f in p["images"]]).astype(np.float32)
    outputs: dict[str, dict] = {}
    errors: dict[str, str] = {}
    for label, filename in (("ort_cpu_fp32", meta["file"]), ("ort_cpu_fp16", meta.get("fp16_file"))):
        if not filename:
            continue
        try:
            session = ort.InferenceSession(str(model_dir / filename), providers=["CPUExecutionProvider"])
            values = session.run(list(OUTPUT_NAMES), {meta["input_name"]: x})
            outputs[label] = dict(zip(OUTPUT_NAMES, values, strict=True))
        except Exception as exc:  # e.g. no CPU kernels for a float16 op: recorded, not fatal
            errors[label] = f"{type(exc).__name__}: {str(exc)[:300]}"

    device = torch.device(p["device"])
    backbone, config, ckpt_meta = load_checkpoint_teacher(p["checkpoint"])
    modules = {device.type: DinoExportModule(copy.deepcopy(backbone)).to(device).eval()}
    if device.type != "cpu":
        modules["cpu"] = DinoExportModule(copy.deepcopy(backbone)).eval()
    for where, module in modules.items():
        set_fused_attention(module, enabled=where == "cuda")
    precisions = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    bench: dict[str, Any] = {}
    big = torch.randn(p["bench_batch"], 3, meta["image_size"], meta["image_size"], device=device)
    for where, module in modules.items():
        for name, dtype in precisions.items():
            if where == "cpu" and device.type != "cpu" and name != "fp32":
                continue  # the CPU row is the exporter's own reference, in fp32 only
            label = f"torch_{where}_{name}"
            autocast = torch.autocast(where, dtype=dtype) if dtype else contextlib.nullcontext()
            try:
                with torch.inference_mode(), autocast:
                    values = module(torch.from_numpy(x).to(where))
                    outputs[label] = {n: v.float().cpu().numpy() for n, v in zip(OUTPUT_NAMES, values, strict=True)}
                    if where == device.type:

                        def run(module=module) -> None:
                            module(big)

                        def sync(where=where) -> None:
                            _sync(where)

                        timing = time_runs(run, p["bench_batch"], 2, p["bench_seconds"], 3, sync)
                        bench[f"{where}_{name}"] = timing["img_per_s"]
            except Exception as exc:  # e.g. fp16 autocast on an old CPU build: recorded, not fatal
                errors[label] = f"{type(exc).__name__}: {str(exc)[:300]}"
    if "ort_cpu_fp32" not in outputs or f"torch_{device.type}_fp32" not in outputs:
        raise RuntimeError(f"the fp32 references could not be computed: {errors}")
    reference = outputs["ort_cpu_fp32"]
    comparisons = {label: _compare(reference, out) for label, out in outputs.items() if label != "ort_cpu_fp32"}
    return {
        "images": len(p["images"]),
        "image_size": meta["image_size"],
        "checkpoint_epoch": ckpt_meta.get("epoch"),
        "reference": "ort_cpu_fp32 (model.onnx on onnxruntime's CPU provider)",
        "vs_ort_cpu_fp32": comparisons,
        "torch_inference_img_s": bench,
        "bench_batch": p["bench_batch"],
        "errors": errors,
        "arch": f"{config['arch']}/{config['patch_size']}",
    }


def worker_ort(p: dict) -> dict:
    """img/s of the exported model(s) on one onnxruntime provider (all three outputs, host input)."""
    import numpy as np

    from benchmarks.inference import ort_session, time_runs
    from dino.model_folder import OUTPUT_NAMES

    model_dir = Path(p["model_dir"])
    meta = json.loads((model_dir / "model.json").read_text())
    files = [("fp32", meta["file"])]
    if p["provider"] == "cuda" and meta.get("fp16_file"):
        files.append(("fp16", meta["fp16_file"]))
    size = meta["image_size"]
    x = np.random.default_rng(0).standard_normal((p["batch"], 3, size, size), dtype=np.float32)
    rows = []
    for precision, filename in files:
        session = ort_session(model_dir / filename, p["provider"], 0)
        timing = time_runs(
            lambda session=session: session.run(list(OUTPUT_NAMES), {meta["input_name"]: x}),
            p["batch"],
            2,
            p["seconds"],
            3,
        )
        rows.append({"precision": precision, "batch": p["batch"], "providers": session.get_providers(), **timing})
        print(f"{p['provider']} {precision}: {timing['img_per_s']} img/s", flush=True)
    return {"rows": rows}


WORKERS: dict[str, Callable[[dict], dict]] = {
    "throughput": worker_throughput,
    "parity": worker_parity,
    "ort": worker_ort,
}


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder with images.zip (benchmarks/gpu_data.py)")
    parser.add_argument("--out", help="results folder: results.json, gpu_check.log and the PNGs")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary folder, deleted at the end)")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--dry-run", action="store_true", help="every part at toy sizes on the CPU")
    parser.add_argument(
        "--budget", type=float, default=510.0, help="seconds for the whole check (parts are sized to it)"
    )
    parser.add_argument("--train-seconds", type=float, default=240.0, help="most seconds of DINO training")
    parser.add_argument("--epochs", type=int, default=0, help="epochs of the DINO run (default: sized to the time)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch of the DINO run and the loader measure")
    parser.add_argument("--skip", nargs="+", default=[], metavar="PART", help="parts to leave out")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = WORKERS[args.worker](json.loads(Path(args.params).read_text()))
        Path(args.result).write_text(json.dumps(result, indent=2, default=str))
        return 0
    if not args.out:
        parser.error("--out is required")
    missing = [dist for module, dist in REQUIRED_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(
            f"gpu_check: missing Python packages: {', '.join(missing)} (nothing can be installed here)", file=sys.stderr
        )
        return 2
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); use --dry-run on a CPU", file=sys.stderr
        )
        return 2
    return GpuCheck(args).run()


if __name__ == "__main__":
    sys.exit(main())

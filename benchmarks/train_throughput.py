"""Training throughput of `dino train`: img/s, data-loader wait and peak memory for a fixed config.

CPU config (issue #2): vit_tiny/4, 2x32 + 6x16 px crops, batch 64, out_dim 4096, CIFAR-10 images.
GPU config: vit_small/16, 2x224 + 8x96 px crops, batch 64 per GPU, Imagenette images.

Runs the real training step (student + teacher forward, DINO loss, backward, AdamW, EMA) on images
read and augmented by the real data loader. Prints a table and writes JSON to benchmarks/results/.

    python benchmarks/train_throughput.py                 # CPU: fp32 and bf16 autocast side by side
    python benchmarks/train_throughput.py --device cuda   # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import machine_info  # noqa: E402
from dino.data_dir import data_dir  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.train import Trainer  # noqa: E402

DATA_DIR = data_dir()
CONFIGS = {
    "cpu": dict(
        arch="vit_tiny",
        patch_size=4,
        global_size=32,
        local_size=16,
        local_crops=6,
        batch_size=64,
        out_dim=4096,
        data=str(DATA_DIR / "cifar10" / "train"),
    ),
    "cuda": dict(
        arch="vit_small",
        patch_size=16,
        global_size=224,
        local_size=96,
        local_crops=8,
        batch_size=64,
        out_dim=65536,
        data=str(DATA_DIR / "imagenette" / "train"),
    ),
}
#: the reference implementation's figures on this 2-core machine for the CPU config (issue #2)
REFERENCE_CPU = {"img_s": 14.0, "peak_memory_gb": 3.8}


def measure(cfg: TrainConfig, warmup: int, steps: int) -> dict:
    trainer = Trainer(cfg)
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    it = iter(trainer.loader)
    for i in range(warmup):
        crops, _ = next(it)
        trainer.train_step(crops, 1, i)  # epoch 1: last layer not frozen, as in steady state
    if device.type == "cuda":
        torch.cuda.synchronize()
    data_wait = 0.0
    images = 0
    start = time.perf_counter()
    for i in range(steps):
        t0 = time.perf_counter()
        crops, _ = next(it)
        data_wait += time.perf_counter() - t0
        trainer.train_step(crops, 1, warmup + i)
        images += crops[0].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result = {
        "img_s": images / elapsed,
        "step_s": elapsed / steps,
        "data_wait_fraction": data_wait / elapsed,
        "precision": trainer.precision,
    }
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    else:
        result["peak_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB
    del trainer
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=None, help="default: fp32 bf16 on CPU, bf16 on CUDA")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "train_throughput_{device}.json"))
    args = parser.parse_args()
    precisions = args.precisions or (["fp32", "bf16"] if args.device == "cpu" else ["bf16"])
    machine = machine_info()  # before the run, so that its load average is the machine's, not ours
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in precisions:
            cfg = TrainConfig(
                **CONFIGS[args.device],
                output_dir=tmp,
                device=args.device,
                precision=precision,
                num_workers=args.num_workers,
                epochs=10,
                compile=args.compile,
            )
            r = measure(cfg, args.warmup, args.steps)
            rows.append({"config": args.device, "precision": precision, **r})
            print(f"{precision}: {r['img_s']:.1f} img/s", file=sys.stderr)
    print("\n| config | precision | img/s | s/step | data wait | peak memory (GB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['precision']} | {r['img_s']:.1f} | {r['step_s']:.2f} | "
            f"{100 * r['data_wait_fraction']:.0f}% | {r['peak_memory_gb']:.2f} |"
        )
    if args.device == "cpu":
        for r in rows:
            print(
                f"{r['precision']}: {r['img_s'] / REFERENCE_CPU['img_s']:.2f}x the reference implementation's "
                f"{REFERENCE_CPU['img_s']} img/s (quoted, measured on this machine type)"
            )
    out = Path(args.output.format(device=args.device))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "train_throughput",
                "config": CONFIGS[args.device],
                "steps": args.steps,
                "warmup": args.warmup,
                "num_workers": args.num_workers,
                "results": rows,
                "reference_cpu": REFERENCE_CPU if args.device == "cpu" else None,
                "machine": {
                    **machine,
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                },
                "load_average_at_end": os.getloadavg(),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

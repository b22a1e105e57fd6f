"""Does bf16 training learn as well as fp32 on the CPU? Short ``dino train`` runs, in-training k-NN.

``precision: auto`` trains in bf16 on CPUs with native bf16 (AVX512_BF16 or AMX), because a step is
about twice as fast there. This is the check behind that default: the same short run in fp32 and
in bf16 with the same seed (so the same crops and initialisation), and fp32 with another seed for
the run-to-run noise. bf16 "learns as well" when its k-NN curve stays within that noise of fp32's.

The recipe is ``configs/cifar10_cpu.yaml`` (ViT-Tiny/4 at 32 px, CIFAR-10) cut to ``--epochs`` epochs
of ``--steps`` steps, k-NN (DINO protocol, ``--knn-images`` per split) after every epoch.

Usage::

    nice -n 19 .venv/bin/python benchmarks/bf16_learning.py

Writes ``benchmarks/results/bf16_learning.json``; run logs are kept under ``--runs`` (default
``runs/bf16_learning``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.machine import machine_info  # noqa: E402
from dino.data_dir import data_dir  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
CONFIG = REPO / "configs" / "cifar10_cpu.yaml"
#: (label, precision, seed): two precisions on one seed, and fp32 on a second seed for the noise
RUNS = (("fp32 seed 0", "fp32", 0), ("bf16 seed 0", "bf16", 0), ("fp32 seed 1", "fp32", 1))


def knn_curve(run_dir: Path) -> dict[int, float]:
    """epoch -> in-training k-NN top-1 from a run's log.jsonl."""
    curve = {}
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("type") == "knn":
            curve[int(record["epoch"])] = float(record["top1"])
    return curve


def loss_curve(run_dir: Path) -> dict[int, float]:
    """epoch -> mean DINO loss of the epoch, from a run's log.jsonl."""
    curve = {}
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("type") == "epoch":
            curve[int(record["epoch"])] = round(float(record["loss"]), 4)
    return curve


def run_dir(runs: Path, label: str) -> Path:
    return runs / label.replace(" ", "_")


def train_side_by_side(args: argparse.Namespace, cifar: Path) -> int:
    """The :data:`RUNS` as ``dino train`` processes side by side; the exit code (0: all finished).

    One thread each: this is a learning check, not a speed one (two processes with two OpenMP threads
    each on a 2-core machine spin against each other and crawl).
    """
    args.runs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = []
    for label, precision, seed in RUNS:
        out = run_dir(args.runs, label)
        command = [
            sys.executable,
            "-m",
            "dino.cli",
            "train",
            "--config",
            str(CONFIG),
            "--data",
            str(cifar / "train"),
            "--output-dir",
            str(out),
            "--precision",
            precision,
            "--seed",
            str(seed),
            "--epochs",
            str(args.epochs),
            "--max-steps-per-epoch",
            str(args.steps),
            "--num-workers",
            "1",
            "--knn-every",
            "1",
            "--knn-max-images",
            str(args.knn_images),
            "--knn-train",
            str(cifar / "train"),
            "--knn-val",
            str(cifar / "test"),
        ]
        log_file = args.runs / f"{out.name}.out"  # the run's progress bars and log
        print(f"{label}: dino train --precision {precision} --seed {seed} -> {out}", flush=True)
        with open(log_file, "w") as sink:  # the child keeps its own copy of the descriptor
            processes.append(
                (label, log_file, subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT))
            )
    failed = [(label, log_file, code) for label, log_file, p in processes if (code := p.wait()) != 0]
    for label, log_file, code in failed:
        print(f"bf16 learning check: {label} failed (exit {code}); see {log_file}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40, help="steps per epoch (batch 64)")
    parser.add_argument("--knn-images", type=int, default=1000, help="images of each k-NN split")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "bf16_learning")
    parser.add_argument("--output", type=Path, default=RESULTS / "bf16_learning.json")
    parser.add_argument("--report-only", action="store_true", help="tabulate the runs already in --runs")
    args = parser.parse_args(argv)
    cifar = data_dir() / "cifar10"
    if not (cifar / "train").is_dir():
        print(f"bf16 learning check: {cifar}/train not found (set DINO_DATA_DIR)", file=sys.stderr)
        return 1

    seconds = None
    if not args.report_only:
        start = time.perf_counter()
        code = train_side_by_side(args, cifar)
        if code:
            return code
        seconds = round(time.perf_counter() - start)
    results = []
    for label, precision, seed in RUNS:
        out = run_dir(args.runs, label)
        if not (out / "log.jsonl").is_file():
            print(f"bf16 learning check: {out}/log.jsonl not found (run without --report-only)", file=sys.stderr)
            return 1
        curves = {"knn_top1": knn_curve(out), "loss": loss_curve(out)}
        results.append({"run": label, "precision": precision, "seed": seed, **curves})

    final = max(results[0]["knn_top1"])
    by_run = {r["run"]: r["knn_top1"][final] for r in results}
    seed_noise = abs(by_run["fp32 seed 0"] - by_run["fp32 seed 1"])
    precision_gap = by_run["bf16 seed 0"] - by_run["fp32 seed 0"]
    epochs = sorted(results[0]["knn_top1"])
    print(f"\nk-NN top-1 (%)\n{'run':<14}" + "".join(f"{'epoch ' + str(e):>10}" for e in epochs))
    for r in results:
        print(f"{r['run']:<14}" + "".join(f"{r['knn_top1'][e]:>10.1f}" for e in epochs))
    loss_epochs = sorted(results[0]["loss"])
    print(f"\nDINO loss (epoch mean)\n{'run':<14}" + "".join(f"{'epoch ' + str(e):>10}" for e in loss_epochs))
    for r in results:
        print(f"{r['run']:<14}" + "".join(f"{r['loss'][e]:>10.3f}" for e in loss_epochs))
    loss = {r["run"]: r["loss"] for r in results}
    loss_gap = max(abs(loss["bf16 seed 0"][e] - loss["fp32 seed 0"][e]) for e in loss_epochs)
    loss_noise = max(abs(loss["fp32 seed 1"][e] - loss["fp32 seed 0"][e]) for e in loss_epochs)
    print(
        f"\nfinal k-NN: bf16 - fp32 (same seed) = {precision_gap:+.1f} points; "
        f"fp32 seed 0 vs seed 1 = {seed_noise:.1f} points"
    )
    print(f"largest epoch-loss gap: bf16 vs fp32 (same seed) {loss_gap:.3f}; fp32 seed 0 vs seed 1 {loss_noise:.3f}")
    report = {
        "benchmark": "bf16_learning",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine_info(),
        "recipe": {
            "config": str(CONFIG.relative_to(REPO)),
            "epochs": args.epochs,
            "steps_per_epoch": args.steps,
            "knn_images": args.knn_images,
        },
        "runs": results,
        "wall_seconds": seconds,  # None with --report-only
        "final_epoch": final,
        "bf16_minus_fp32_points": round(precision_gap, 2),
        "seed_to_seed_points": round(seed_noise, 2),
        "largest_loss_gap_bf16_vs_fp32": round(loss_gap, 4),
        "largest_loss_gap_seed_to_seed": round(loss_noise, 4),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

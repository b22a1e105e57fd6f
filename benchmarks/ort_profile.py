"""Where an ONNX model's CPU time goes: ONNX Runtime's own profiler, summed by operator type.

Why: it shows what bounds the int8 speed-up. Once the weight matrices run in int8, the float32
operators left around them (the head split's transposes and slices, the attention products, GELU,
LayerNorm, softmax) take a fixed share that no int8 kernel removes.

Usage::

    .venv/bin/python benchmarks/ort_profile.py models/NAME/model.onnx models/NAME/model_int8.onnx --batch 8

Prints one table per file (share of kernel time by operator type, nodes per run) and writes
``benchmarks/results/ort_profile.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WARMUP = 2
#: runs profiled after the warm-up (their kernel times are summed)
RUNS = 6
TOP = 14


def profile(path: Path, batch: int, threads: int) -> dict:
    """Share of kernel time and node count per operator type over :data:`RUNS` runs."""
    import onnxruntime as ort

    meta_path = path.parent / "model.json"
    side = json.loads(meta_path.read_text())["image_size"] if meta_path.is_file() else 224
    with tempfile.TemporaryDirectory(prefix="ort-profile-") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"image": np.random.default_rng(0).standard_normal((batch, 3, side, side)).astype(np.float32)}
        for _ in range(WARMUP + RUNS):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    # only the kernels of the runs after the warm-up (allocations and first-run costs are left out)
    run_starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    measured_from = run_starts[WARMUP]
    time_by_op: Counter[str] = Counter()
    nodes_by_op: Counter[str] = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= measured_from:
            op = event["args"]["op_name"]
            time_by_op[op] += event["dur"]
            nodes_by_op[op] += 1
    total = sum(time_by_op.values())
    return {
        "file": str(path),
        "batch": batch,
        "image_size": side,
        "threads": threads,
        "ms_per_run": round(total / RUNS / 1000, 2),
        "share_by_op": {op: round(t / total, 4) for op, t in time_by_op.most_common()},
        "nodes_per_run": {op: n // RUNS for op, n in nodes_by_op.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="ONNX files (image_size read from a model.json beside)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--output", type=Path, default=RESULTS / "ort_profile.json")
    args = parser.parse_args(argv)
    missing = [str(m) for m in args.models if not m.is_file()]
    if missing:
        print(f"ort_profile: no such file: {', '.join(missing)}", file=sys.stderr)
        return 1
    results = [profile(path, args.batch, args.threads) for path in args.models]
    for result in results:
        print(f"\n{result['file']} (batch {result['batch']}, {result['image_size']} px): {result['ms_per_run']} ms/run")
        for op, share in list(result["share_by_op"].items())[:TOP]:
            print(f"  {op:<28}{100 * share:6.1f}%  {result['nodes_per_run'][op]:>4} nodes")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"benchmark": "ort_profile", "results": results}, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

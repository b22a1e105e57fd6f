"""Inference throughput of exported models: ONNX Runtime vs PyTorch eager, images per second.

What it measures, for each model and batch size:

- ``onnxruntime``: ``model.onnx`` (and ``model_fp16.onnx`` on CUDA) through an InferenceSession, all
  three outputs (embedding, patch_tokens, attention), input already preprocessed in host memory
  (on CUDA the host-to-device copies are included: that is what a server pays).
- ``torch eager``: the same computation in PyTorch (``DinoExportModule``, i.e. the backbone plus the
  last block's [CLS] attention) under ``torch.inference_mode``; fp16 on CUDA via ``.half()``.

Models: a random-init ViT-S/16 at 224 px exported into a temporary folder (skip with ``--no-builtin``)
and every folder given with ``--models``. For a folder, PyTorch eager needs the weights: they are
read from the folder's ``provenance.source`` (a ``dino train`` checkpoint or an imported file) when
that file still exists; otherwise only ONNX Runtime is measured.

Each measurement: ``--warmup`` untimed runs, then runs until ``--min-seconds`` have passed and at
least ``--min-iters`` ran; img/s = images / elapsed. The machine's load average is recorded, since
shared machines distort the numbers. With ``--provider cuda`` the fp16 model's outputs are also
compared with the fp32 model's on real photos (max abs diff), or random input without the data.

Usage::

    .venv/bin/python benchmarks/inference.py                              # CPU, batches 1 8 32
    .venv/bin/python benchmarks/inference.py --models models/NAME --no-builtin
    .venv/bin/python benchmarks/inference.py --provider cuda              # batches 1..256, fp16 too

Writes ``benchmarks/results/inference_cpu.json`` (``inference_cuda.json`` with ``--provider cuda``).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.machine import machine_info as shared_machine_info  # noqa: E402
from dino.data_dir import data_dir  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DATA_DIR = data_dir()
BATCHES = {"cpu": (1, 8, 32), "cuda": (1, 8, 32, 64, 128, 256)}
ORT_PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
BUILTIN = {"arch": "vit_small", "patch_size": 16, "image_size": 224}
#: photos compared between the fp16 and fp32 models on CUDA
PARITY_PHOTOS = 16
SEED = 0

log = logging.getLogger("benchmark")


def machine_info(provider: str) -> dict:
    """Hardware, library versions and the load of the (possibly shared) machine."""
    import onnxruntime as ort
    import timm
    import torch

    info = {
        **shared_machine_info(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "onnxruntime": ort.__version__,
        "ort_available_providers": ort.get_available_providers(),
        "provider": provider,
        "torch_threads": torch.get_num_threads(),
    }
    if provider == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def time_runs(run, batch: int, warmup: int, min_seconds: float, min_iters: int, sync=lambda: None) -> dict:
    """Images per second of ``run()`` (one batch per call)."""
    for _ in range(warmup):
        run()
    sync()
    iters, start = 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - start < min_seconds:
        run()
        sync()
        iters += 1
    elapsed = time.perf_counter() - start
    return {
        "img_per_s": round(batch * iters / elapsed, 2),
        "ms_per_batch": round(1000 * elapsed / iters, 2),
        "iters": iters,
    }


def ort_session(path: Path, provider: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=ORT_PROVIDERS[provider])
    if provider == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise RuntimeError(f"CUDA provider unavailable for {path} (providers: {session.get_providers()})")
    return session


def forward_inference_mode(module, x) -> None:
    """``module(x)`` under ``torch.inference_mode`` (the timed call of the torch eager rows)."""
    import torch

    with torch.inference_mode():
        module(x)


def torch_module(folder: Path, meta: dict, backbone=None):
    """The eager PyTorch counterpart of a model folder, or None when its weights are not at hand."""
    from training.export_graph import DinoExportModule
    from training.weights import WeightsError, load_backbone_weights

    if backbone is None:
        prov = meta.get("provenance", {})
        source = Path(prov.get("source", ""))
        if not prov.get("source") or not source.is_file():
            log.warning("%s: source weights %r not found, PyTorch eager skipped", folder, prov.get("source"))
            return None
        try:  # handles every layout, this project's checkpoints included
            backbone = load_backbone_weights(source, meta["arch"], meta["patch_size"], meta["image_size"])[0]
        except WeightsError as exc:
            log.warning("%s: cannot rebuild the PyTorch model (%s), PyTorch eager skipped", folder, exc)
            return None
    return DinoExportModule(backbone.eval()).eval()


def real_photos(meta: dict, count: int) -> np.ndarray | None:
    """Up to ``count`` photos of imagenet-sample through the model's evaluation transform."""
    from PIL import Image

    from training.augmentation import eval_transform

    folder = DATA_DIR / "imagenet-sample"
    if not folder.is_dir():
        return None
    transform = eval_transform(meta["image_size"], meta["resize_size"], meta["mean"], meta["std"])
    files = sorted(folder.iterdir())[:count]
    return np.stack([transform(Image.open(f).convert("RGB")).numpy() for f in files]).astype(np.float32)


def bench_model(folder: Path, args, backbone=None) -> dict:
    """All measurements of one model folder."""
    import torch

    from dino.model_folder import OUTPUT_NAMES

    meta = json.loads((folder / "model.json").read_text())
    size = meta["image_size"]
    device = "cuda" if args.provider == "cuda" else "cpu"
    result: dict = {
        "model": meta["name"],
        "folder": str(folder),
        "arch": meta["arch"],
        "patch_size": meta["patch_size"],
        "image_size": size,
        "export": meta.get("export"),  # export time, file size, checker and parity of each file
        "rows": [],
    }
    variants = [("fp32", folder / meta["file"])]
    if args.provider == "cuda" and meta.get("fp16_file"):
        variants.append(("fp16", folder / meta["fp16_file"]))
    sessions = {precision: ort_session(path, args.provider, args.threads) for precision, path in variants}
    module = torch_module(folder, meta, backbone)
    rng = np.random.default_rng(SEED)

    if "fp16" in sessions:
        photos = real_photos(meta, PARITY_PHOTOS)
        x = photos if photos is not None else rng.standard_normal((PARITY_PHOTOS, 3, size, size), dtype=np.float32)
        fp32 = sessions["fp32"].run(list(OUTPUT_NAMES), {"image": x})
        fp16 = sessions["fp16"].run(list(OUTPUT_NAMES), {"image": x})
        result["fp16_vs_fp32_max_abs_diff"] = {
            n: float(np.abs(a - b).max()) for n, a, b in zip(OUTPUT_NAMES, fp32, fp16, strict=True)
        }
        result["fp16_parity_input"] = "real photos" if photos is not None else "random"
        log.info("fp16 vs fp32: %s", result["fp16_vs_fp32_max_abs_diff"])

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for batch in args.batch_sizes:
        x = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
        for precision, session in sessions.items():
            row = {"batch": batch, "engine": "onnxruntime", "precision": precision}
            try:
                row |= time_runs(
                    functools.partial(session.run, list(OUTPUT_NAMES), {"image": x}),
                    batch,
                    args.warmup,
                    args.min_seconds,
                    args.min_iters,
                )
            except Exception as exc:  # e.g. out of GPU memory at large batches: record and go on
                row["error"] = str(exc).splitlines()[0]
            result["rows"].append(row)
            log.info("%s %s", meta["name"], row)
        if module is None:
            continue
        for precision in sessions:
            row = {"batch": batch, "engine": "torch eager", "precision": precision}
            dtype = torch.float16 if precision == "fp16" else torch.float32
            eager = module.to(device=device, dtype=dtype)
            xt = torch.from_numpy(x).to(device=device, dtype=dtype)
            run = functools.partial(forward_inference_mode, eager, xt)
            try:
                row |= time_runs(run, batch, args.warmup, args.min_seconds, args.min_iters, sync)
            except RuntimeError as exc:
                row["error"] = str(exc).splitlines()[0]
            result["rows"].append(row)
            log.info("%s %s", meta["name"], row)
        module.to(device="cpu", dtype=torch.float32)
    return result


def print_table(results: list[dict]) -> None:
    print()
    print("| model | batch | engine | precision | img/s | ms/batch |")
    print("| --- | ---: | --- | --- | ---: | ---: |")
    for res in results:
        for row in res["rows"]:
            ips = f"{row['img_per_s']:.1f}" if "img_per_s" in row else row.get("error", "")
            ms = f"{row['ms_per_batch']:.1f}" if "ms_per_batch" in row else ""
            print(f"| {res['model']} | {row['batch']} | {row['engine']} | {row['precision']} | {ips} | {ms} |")
        if "fp16_vs_fp32_max_abs_diff" in res:
            print(
                f"\n{res['model']}: fp16 vs fp32 max abs diff ({res['fp16_parity_input']}): "
                f"{res['fp16_vs_fp32_max_abs_diff']}"
            )
    for res in results:
        rows = {(r["batch"], r["engine"], r["precision"]): r.get("img_per_s") for r in res["rows"]}
        for batch in sorted({r["batch"] for r in res["rows"]}):
            o, t = rows.get((batch, "onnxruntime", "fp32")), rows.get((batch, "torch eager", "fp32"))
            if o and t:
                print(f"{res['model']} batch {batch}: onnxruntime / torch eager = {o / t:.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[], help="exported model folders to benchmark too")
    parser.add_argument("--no-builtin", action="store_true", help="skip the random-init ViT-S/16 at 224 px")
    parser.add_argument("--provider", choices=sorted(ORT_PROVIDERS), default="cpu")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=None, help="default: 1 8 32 on CPU, 1..256 on CUDA"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads of both engines")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--min-iters", type=int, default=3, help="per measurement")
    parser.add_argument(
        "--output", type=Path, default=None, help="JSON file (default benchmarks/results/inference_<provider>.json)"
    )
    args = parser.parse_args(argv)
    args.batch_sizes = args.batch_sizes or list(BATCHES[args.provider])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export"):
        logging.getLogger(name).setLevel(logging.WARNING)

    import torch

    torch.set_num_threads(args.threads)
    if args.provider == "cuda" and not torch.cuda.is_available():
        print("inference benchmark: --provider cuda but no CUDA device is visible", file=sys.stderr)
        return 1
    missing = [m for m in args.models if not (Path(m) / "model.json").is_file()]
    if missing:
        print(f"inference benchmark: not model folders (no model.json): {', '.join(missing)}", file=sys.stderr)
        return 1

    results = []
    with tempfile.TemporaryDirectory(prefix="dino-bench-") as tmp:
        if not args.no_builtin:
            from training.backbone import build_backbone
            from training.export import export_backbone

            torch.manual_seed(SEED)
            backbone = build_backbone(BUILTIN["arch"], BUILTIN["patch_size"], BUILTIN["image_size"]).eval()
            folder = Path(tmp) / "vit_small16-random"
            start = time.perf_counter()
            export_backbone(
                backbone,
                folder,
                name=folder.name,
                provenance={"source": "random init"},
                fp16=args.provider == "cuda",
                **BUILTIN,
            )
            log.info("exported the built-in model in %.1f s", time.perf_counter() - start)
            results.append(bench_model(folder, args, backbone))
        for model in args.models:
            results.append(bench_model(Path(model), args))

    print_table(results)
    output = args.output or RESULTS / f"inference_{args.provider}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine_info(args.provider),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
    }
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

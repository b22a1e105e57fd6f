"""Reduced-scale JPEG decoding (``Image.draft``: libjpeg's DCT scaling) vs the full decode, for the
service's preprocessing: are the crops, the embeddings and the k-NN the same, and what does it save?

The service (``service.preprocess.Preprocessor``) decodes a JPEG at 1/2, 1/4 or 1/8 of its size as
long as the shorter side stays at least ``margin x resize_size`` (shipped margin:
``service.preprocess.REDUCED_DECODE_MARGIN`` = 2), then resizes from the full image's geometry. For
the model of ``--model`` (default: the shipped ``models/dino-vit-tiny8-imagenette-cpu``, 64 px,
resize 73), on the real photos of ``$DINO_DATA_DIR``:

1. **Photos**, per margin (0 = full decode; 1, 1.5, 2 = shipped, 3): how many photos are reduced
   and by which factors, the largest and the mean absolute difference of the model's 64 px uint8 crop
   against the full decode (grey levels), the cosine between the L2-normalised embeddings (min,
   mean), and the time per image (one thread, best of ``--repeat`` passes) of the decode alone and of
   decode + resize/crop + normalise (``Preprocessor.prepare``). On two sets:

   * ``imagenet-sample``: the 100 full-size ImageNet photos (106x150 up to 1152x864, most 500x375);
   * ``imagenet-sample x4``: the same photos upscaled (bicubic) to a 2000 px longer side and saved as
     JPEG quality 90, standing in for camera-size uploads (synthetic: smoother than real photos).

2. **k-NN** (DINO protocol: ``training.knn.weighted_knn``, weighted vote, k=20, T=0.07; imagenette
   train as the gallery, val as the queries) with the full decode, with reduced queries (full
   gallery), and with both reduced, plus the per-image embedding cosine. The imagenette images are
   224x224: the shipped margin keeps them at full size (224 < 2 x 146; checked: every tensor is
   bit-identical), so the k-NN is also run at margin 1.5 (146 > 110: decoded at 1/2, 112 px), which
   reduces every image. ``--knn-per-class N`` takes N images per class of each split (0: all).

Usage::

    .venv/bin/python benchmarks/draft_decode.py                 # default model, full imagenette
    .venv/bin/python benchmarks/draft_decode.py --knn-per-class 100

Prints the tables and writes ``benchmarks/results/draft_decode.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.machine import machine_info  # noqa: E402
from dino.data_dir import data_dir  # noqa: E402
from dino.images import decode_image, decode_image_reduced, list_image_files  # noqa: E402
from service.preprocess import REDUCED_DECODE_MARGIN, EvalTransform, Preprocessor  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DEFAULT_MODEL = REPO / "models" / "dino-vit-tiny8-imagenette-cpu"
DEFAULT_OUTPUT = RESULTS / "draft_decode.json"
#: margins compared on the photos (0: the full decode, the reference)
MARGINS = (1.0, 1.5, REDUCED_DECODE_MARGIN, 3.0)
#: the margin the k-NN is also run at, because the shipped one does not reduce 224 px images
KNN_EXTRA_MARGIN = 1.5
#: longer side of the upscaled photo set
UPSCALED_SIDE = 2000
MAX_PIXELS = 100_000_000
BATCH = 64


def load_model(model_dir: Path):
    from service.runtime import OnnxModel
    from service.settings import ServiceSettings

    return OnnxModel.from_settings(ServiceSettings(), model_dir, verify_sha256=False)


def embed(model, tensors: list[np.ndarray]) -> np.ndarray:
    """L2-normalised [CLS] embeddings of model inputs, in batches."""
    out = []
    for start in range(0, len(tensors), BATCH):
        e = model.run(np.stack(tensors[start : start + BATCH]), ["embedding"])["embedding"]
        out.append(e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12))
    return np.concatenate(out).astype(np.float32)


def best_ms_per_image(fn, datas: list[bytes], repeat: int) -> float:
    """Best of ``repeat`` passes over ``datas`` of ``fn(data)``, in ms per image."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for data in datas:
            fn(data)
        best = min(best, (time.perf_counter() - t0) / len(datas))
    return best * 1e3


def upscaled(datas: list[bytes]) -> list[bytes]:
    """The photos upscaled (bicubic) to a ``UPSCALED_SIDE`` longer side, as JPEG quality 90."""
    from PIL import Image

    out = []
    for data in datas:
        img = decode_image(data, MAX_PIXELS)
        scale = UPSCALED_SIDE / max(img.size)
        big = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        big.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def photo_set(name: str, datas: list[bytes], transform: EvalTransform, model, repeat: int) -> dict:
    """Table 1 for one set of photos: every margin against the full decode."""
    full = Preprocessor(transform, MAX_PIXELS, reduced_decode_margin=0)
    full_prepared = [full.prepare(d) for d in datas]
    full_crops = [np.asarray(p.crop, dtype=np.int16) for p in full_prepared]
    full_emb = embed(model, [p.tensor for p in full_prepared])
    sizes = [decode_image_reduced(d, MAX_PIXELS, 0).full_size for d in datas]
    rows = [
        {
            "margin": 0.0,
            "min_decoded_side": 0,
            "reduced": 0,
            "factors": {"1": len(datas)},
            "decode_ms": best_ms_per_image(lambda d: decode_image(d, MAX_PIXELS), datas, repeat),
            "prepare_ms": best_ms_per_image(full.prepare, datas, repeat),
        }
    ]
    for margin in MARGINS:
        pre = Preprocessor(transform, MAX_PIXELS, reduced_decode_margin=margin)
        side = pre.min_decoded_side
        decoded = [decode_image_reduced(d, MAX_PIXELS, side) for d in datas]
        factors = Counter(str(round(dec.full_size[0] / dec.image.size[0])) for dec in decoded)
        prepared = [pre.prepare(d) for d in datas]
        diffs = [np.abs(np.asarray(p.crop, dtype=np.int16) - ref) for p, ref in zip(prepared, full_crops, strict=True)]
        cosine = (embed(model, [p.tensor for p in prepared]) * full_emb).sum(axis=1)
        rows.append(
            {
                "margin": margin,
                "min_decoded_side": side,
                "reduced": sum(dec.reduced for dec in decoded),
                "factors": dict(sorted(factors.items(), key=lambda kv: int(kv[0]))),
                "crop_max_abs_diff": int(max(d.max() for d in diffs)),
                "crop_mean_abs_diff": float(np.mean([d.mean() for d in diffs])),
                "cosine_min": float(cosine.min()),
                "cosine_mean": float(cosine.mean()),
                "decode_ms": best_ms_per_image(lambda d, s=side: decode_image_reduced(d, MAX_PIXELS, s), datas, repeat),
                "prepare_ms": best_ms_per_image(pre.prepare, datas, repeat),
            }
        )
    return {
        "set": name,
        "images": len(datas),
        "median_size": [int(np.median([s[0] for s in sizes])), int(np.median([s[1] for s in sizes]))],
        "bytes_mean": float(np.mean([len(d) for d in datas])),
        "rows": rows,
    }


def labelled(root: Path, per_class: int) -> tuple[list[Path], list[str]]:
    files, labels = [], []
    for cls in sorted(p.name for p in root.iterdir() if p.is_dir()):
        found = list_image_files(root / cls)
        found = found[:per_class] if per_class else found
        files += found
        labels += [cls] * len(found)
    return files, labels


def knn_section(model, transform: EvalTransform, per_class: int) -> dict:
    """Table 2: k-NN on imagenette with full and reduced decodes."""
    import torch

    from training.knn import DEFAULT_K, DEFAULT_TEMPERATURE, weighted_knn

    root = data_dir() / "imagenette"
    train_files, train_labels = labelled(root / "train", per_class)
    val_files, val_labels = labelled(root / "val", per_class)
    classes = sorted(set(train_labels))
    train_y = torch.tensor([classes.index(c) for c in train_labels])
    val_y = torch.tensor([classes.index(c) for c in val_labels])
    train_bytes = [p.read_bytes() for p in train_files]
    val_bytes = [p.read_bytes() for p in val_files]
    sizes = Counter(decode_image_reduced(d, MAX_PIXELS, 0).full_size for d in train_bytes[:500] + val_bytes[:500])

    def tensors(pre: Preprocessor, datas: list[bytes]) -> list[np.ndarray]:
        return [pre.prepare(d).tensor for d in datas]

    def knn(gallery: np.ndarray, queries: np.ndarray) -> dict:
        g, q = torch.from_numpy(gallery), torch.from_numpy(queries)
        result = weighted_knn(g, train_y, q, val_y, len(classes), DEFAULT_K, DEFAULT_TEMPERATURE)
        return {"top1": result["top1"], "top5": result["top5"]}

    t0 = time.perf_counter()
    full = Preprocessor(transform, MAX_PIXELS, reduced_decode_margin=0)
    full_train, full_val = tensors(full, train_bytes), tensors(full, val_bytes)
    g_full, q_full = embed(model, full_train), embed(model, full_val)
    report: dict = {
        "gallery": f"imagenette/train, {len(train_files)} images" + (f" ({per_class} per class)" if per_class else ""),
        "queries": f"imagenette/val, {len(val_files)} images" + (f" ({per_class} per class)" if per_class else ""),
        "image_sizes_seen": {f"{w}x{h}": n for (w, h), n in sizes.most_common(5)},
        "k": DEFAULT_K,
        "temperature": DEFAULT_TEMPERATURE,
        "full_decode": knn(g_full, q_full),
        "margins": [],
    }
    print(f"  k-NN full decode: top-1 {report['full_decode']['top1']:.2f}%", flush=True)
    for margin in sorted({REDUCED_DECODE_MARGIN, KNN_EXTRA_MARGIN}, reverse=True):
        pre = Preprocessor(transform, MAX_PIXELS, reduced_decode_margin=margin)
        red_train, red_val = tensors(pre, train_bytes), tensors(pre, val_bytes)
        identical = sum(np.array_equal(a, b) for a, b in zip(red_train + red_val, full_train + full_val, strict=True))
        reduced = sum(
            decode_image_reduced(d, MAX_PIXELS, pre.min_decoded_side).reduced for d in train_bytes + val_bytes
        )
        row: dict = {
            "margin": margin,
            "min_decoded_side": pre.min_decoded_side,
            "images": len(train_bytes) + len(val_bytes),
            "reduced": reduced,
            "tensors_bit_identical": identical,
        }
        if identical == row["images"]:
            row["note"] = "no image reduced: every tensor is bit-identical to the full decode's, so is the k-NN"
            g_red, q_red = g_full, q_full
        else:
            g_red, q_red = embed(model, red_train), embed(model, red_val)
        cosine = np.concatenate([(g_red * g_full).sum(axis=1), (q_red * q_full).sum(axis=1)])
        row.update(
            cosine_min=float(cosine.min()),
            cosine_mean=float(cosine.mean()),
            reduced_queries=knn(g_full, q_red),
            reduced_both=knn(g_red, q_red),
            query_top1_changed=int(
                (np.argmax((q_full @ g_full.T), axis=1) != np.argmax((q_red @ g_red.T), axis=1)).sum()
            ),
        )
        report["margins"].append(row)
        print(
            f"  k-NN margin {margin}: {reduced} reduced; reduced queries {row['reduced_queries']['top1']:.2f}%, "
            f"both {row['reduced_both']['top1']:.2f}%",
            flush=True,
        )
    report["seconds"] = time.perf_counter() - t0
    return report


def print_tables(report: dict) -> None:
    print()
    header = (
        f"{'set':<22}{'margin':>7}{'side':>6}{'reduced':>9}  {'factors':<18}{'crop max':>9}{'mean':>7}"
        f"{'cos min':>9}{'cos mean':>10}{'decode ms':>11}{'prep ms':>9}"
    )
    print(header)
    print("-" * len(header))
    for block in report["photos"]:
        for r in block["rows"]:
            factors = " ".join(f"1/{k}:{v}" for k, v in r["factors"].items())
            if r["margin"]:
                crop = f"{r['crop_max_abs_diff']:>9}{r['crop_mean_abs_diff']:>7.3f}"
                cos = f"{r['cosine_min']:>9.5f}{r['cosine_mean']:>10.6f}"
            else:
                crop, cos = f"{'-':>9}{'-':>7}", f"{'-':>9}{'-':>10}"
            reduced = f"{r['reduced']:>5}/{block['images']:<3}"
            print(
                f"{block['set']:<22}{r['margin']:>7.1f}{r['min_decoded_side']:>6}{reduced}  "
                f"{factors:<18}{crop}{cos}{r['decode_ms']:>11.3f}{r['prepare_ms']:>9.3f}"
            )
    knn = report.get("knn")
    if knn:
        full = knn["full_decode"]
        print(f"\nk-NN (k={knn['k']}, T={knn['temperature']}): gallery {knn['gallery']}, queries {knn['queries']}")
        print(f"  full decode (gallery and queries): top-1 {full['top1']:.2f}%  top-5 {full['top5']:.2f}%")
        for row in knn["margins"]:
            print(
                f"  margin {row['margin']} (side >= {row['min_decoded_side']}): "
                f"{row['reduced']}/{row['images']} reduced; "
                f"cosine min {row['cosine_min']:.5f} mean {row['cosine_mean']:.6f}; "
                f"reduced queries top-1 {row['reduced_queries']['top1']:.2f}%, "
                f"reduced both {row['reduced_both']['top1']:.2f}%; "
                f"nearest neighbour changed for {row['query_top1_changed']} queries"
                + (f" ({row['note']})" if "note" in row else "")
            )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--repeat", type=int, default=5, help="timing passes over each photo set (the best is kept)")
    p.add_argument("--knn-per-class", type=int, default=0, help="images per class of each imagenette split (0: all)")
    p.add_argument("--no-knn", action="store_true")
    p.add_argument("--out", type=Path, default=DEFAULT_OUTPUT)
    args = p.parse_args(argv)

    model = load_model(args.model)
    spec = model.spec
    transform = EvalTransform(spec.image_size, spec.resize_size, tuple(spec.mean), tuple(spec.std))
    report: dict = {
        "benchmark": "draft_decode",
        "machine": machine_info(),
        "model": {"name": model.name, "image_size": spec.image_size, "resize_size": spec.resize_size},
        "shipped_margin": REDUCED_DECODE_MARGIN,
        "note": "margin: a JPEG is decoded at the smallest 1/s (s in 2, 4, 8) keeping its shorter side >= "
        "margin x resize_size (0: full decode, the reference). crop: the model's 64 px uint8 crop vs the full "
        "decode's (grey levels); cosine: L2-normalised embeddings vs the full decode's; decode_ms: decode "
        "alone, prepare_ms: decode + resize/crop + normalise, one thread, best of --repeat passes.",
    }
    photos = [p.read_bytes() for p in list_image_files(data_dir() / "imagenet-sample")]
    print(f"model {model.name} ({spec.image_size} px, resize {spec.resize_size}); {len(photos)} photos", flush=True)
    report["photos"] = [photo_set("imagenet-sample", photos, transform, model, args.repeat)]
    print("  imagenet-sample done", flush=True)
    report["photos"].append(
        photo_set(f"imagenet-sample x{UPSCALED_SIDE}px", upscaled(photos), transform, model, max(1, args.repeat // 2))
    )
    print("  upscaled set done", flush=True)
    if not args.no_knn:
        report["knn"] = knn_section(model, transform, args.knn_per_class)
    report["machine"]["loadavg_at_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_tables(report)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

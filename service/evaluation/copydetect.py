"""``dino copydetect``: copy detection on a generated Copydays-like "strong" set, through the
service's gallery.

The paper shows that DINO features detect copies (Caron et al. 2021, Sec. 4.2, Table 7): on the
"strong" subset of INRIA Copydays, with 10k YFCC100M distractors in the database, a ViT-B/8 reaches
85.5 mAP with the [CLS] token concatenated with GeM-pooled patch tokens and a whitening learned on
20k other YFCC100M images. This command runs that protocol on any photos:

    dino copydetect --model models/NAME --originals DIR --distractors DIR \\
        [--copies-per-original 3] [--seed 0] [--whiten] [--features cls+gem|cls] [--output result.json]

1. Every original gets ``--copies-per-original`` copies with several strong edits combined (crop,
   rotation, mirror, colour change, blur, text or pasted patch, heavy JPEG), made deterministically
   from ``--seed`` (:mod:`service.evaluation.copies`; ``--save-copies DIR`` writes them out).
2. Originals, distractors and copies go through the service's path (decoding, preprocessing,
   OnnxModel) and become features (:mod:`service.evaluation.features`): ``cls+gem`` (the paper's,
   default) or ``cls`` (the service's plain embedding), optionally PCA-whitened (``--whiten``,
   learned on the distractors' features, as the paper learns it on distractor-like images).
3. The database (originals + distractors) goes into the service's gallery (an in-memory
   :class:`service.gallery.EmbeddingIndex` of the features' dimension), and each copy is searched
   with k = the database size. The copy's original is the one true match.

Reported: µAP (:func:`service.evaluation.metrics.micro_average_precision`: one precision-recall
curve over every (copy, database image) pair of all the copies' rankings pooled and sorted by
score: the Copydays convention, which also asks that one score threshold works for every query);
recall@k (the original among the top k; recall@1: the top result is the original); mAP (the mean of
per-copy APs, i.e. of 1/rank of the original, as the reference ``eval_copy_detection.py`` reports
with its single positive per query); recall@1 per edit kind; and the chance levels.

Distractors must not hold an original (then a "wrong" answer would be right): ``--exclude PATH``
leaves such files out. Baselines: ``--baseline pixels`` (no model), and a random-init network's
exported folder as ``--model``.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dino.images import ImageInputError, decode_image
from service.evaluation.copies import EDIT_KINDS, CopyPlan, plan_copy, render_copy
from service.evaluation.features import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_THREADS,
    FEATURE_KINDS,
    GEM_P,
    EvaluationError,
    Whitening,
    embed_files,
    embed_items,
    fill_gallery,
    image_files,
    load_settings,
    make_features,
    memory_gallery,
    parse_ks,
    rankings,
    run_command,
)
from service.evaluation.metrics import mean, micro_average_precision

log = logging.getLogger(__name__)

PROG = "dino copydetect"
#: distractor images that pasted patches are taken from (evenly spread over the distractors)
DONORS = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder (default: DINO_MODEL_DIR, else the first folder of models/)")
    parser.add_argument("--originals", required=True, help="folder of original images (recursive)")
    parser.add_argument("--distractors", required=True, help="folder of distractor images (recursive)")
    parser.add_argument("--copies-per-original", type=int, default=3, help="copies made of each original (3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the copies' edits (0)")
    parser.add_argument(
        "--features",
        choices=FEATURE_KINDS,
        default="cls+gem",
        help="cls+gem: [CLS] ++ GeM-pooled patch tokens (the paper's, default); cls: the service's embedding",
    )
    parser.add_argument("--gem-p", type=float, default=GEM_P, help=f"GeM exponent ({GEM_P:g})")
    parser.add_argument("--whiten", action="store_true", help="PCA-whitening learned on the distractors' features")
    parser.add_argument(
        "--baseline", choices=["pixels"], help="raw pixels instead of a model (random init: pass its folder as --model)"
    )
    parser.add_argument("--pixel-size", type=int, default=16, help="pixels baseline: side of the pooled grid (16)")
    parser.add_argument("--image-size", type=int, default=64, help="pixels baseline: centre crop side (64)")
    parser.add_argument(
        "--max-distractors", type=int, default=0, help="use N distractors evenly spread over the sorted list (all)"
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATH",
        help="a distractor to leave out (path relative to --distractors; repeatable): e.g. a duplicate of an original",
    )
    parser.add_argument("--k", default="1,5,10", help="ranks of recall@k (default 1,5,10)")
    parser.add_argument("--save-copies", metavar="DIR", help="also write the generated copies to this folder")
    parser.add_argument("--output", help="write the result as JSON to this file")
    parser.add_argument("--index-type", choices=["flat", "hnsw"], default="flat", help="gallery index (default flat)")
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], default=None, help="default: DINO_PROVIDER")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per inference call")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="decoding threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def evenly_spread(items: list[Path], count: int) -> list[Path]:
    """``count`` items spread evenly over ``items`` (all of them when count is 0 or larger): a sorted
    ImageFolder listing gives every class its share."""
    if count <= 0 or count >= len(items):
        return list(items)
    positions = np.linspace(0, len(items) - 1, count).round().astype(int)
    return [items[i] for i in positions]


def distractor_files(root: Path, exclude: list[str], max_count: int) -> list[Path]:
    files = image_files(root, "distractors")
    if exclude:
        relative = {path.relative_to(root).as_posix(): path for path in files}
        unknown = [name for name in exclude if name not in relative]
        if unknown:
            raise EvaluationError(f"--exclude {unknown[0]}: no such image in the distractors folder {root}")
        files = [path for name, path in relative.items() if name not in set(exclude)]
        if not files:
            raise EvaluationError(f"--exclude leaves no image in the distractors folder {root}")
    return evenly_spread(files, max_count)


@dataclass(frozen=True)
class CopyJob:
    """A copy to make and embed: the original's file and the plan of its edits."""

    source: Path
    plan: CopyPlan

    @property
    def name(self) -> str:
        stem = self.plan.original.rsplit(".", 1)[0]
        return f"{stem}.copy{self.plan.index}.jpg"


class CopyMaker:
    """Reads an original and renders one of its copies (thread-safe: called from the decoding pool)."""

    def __init__(self, donors: list[Image.Image], max_pixels: int, max_jpeg_scans: int, save_dir: Path | None):
        self.donors = donors
        self.max_pixels, self.max_jpeg_scans = max_pixels, max_jpeg_scans
        self.save_dir = save_dir

    def __call__(self, job: CopyJob) -> bytes:
        original = decode_image(job.source.read_bytes(), self.max_pixels, self.max_jpeg_scans)
        data = render_copy(original, job.plan, self.donors)
        if self.save_dir is not None:
            target = self.save_dir / job.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return data


def load_donors(files: list[Path], max_pixels: int, max_jpeg_scans: int) -> list[Image.Image]:
    """The images pasted patches come from (unreadable ones are left out)."""
    donors = []
    for path in evenly_spread(files, DONORS):
        try:
            donors.append(decode_image(path.read_bytes(), max_pixels, max_jpeg_scans))
        except (ImageInputError, OSError):
            continue
    return donors


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole evaluation; returns the JSON result."""
    started = time.perf_counter()
    ks = parse_ks(args.k)
    if args.copies_per_original < 1:
        raise EvaluationError("--copies-per-original must be at least 1")
    originals_dir, distractors_dir = Path(args.originals), Path(args.distractors)
    original_files = image_files(originals_dir, "originals")
    distractors = distractor_files(distractors_dir, args.exclude, args.max_distractors)

    settings = load_settings(args.model, args.provider, args.index_type)
    features = make_features(
        settings,
        kind=args.features,
        baseline=args.baseline,
        image_size=args.image_size,
        pixel_size=args.pixel_size,
        gem_p=args.gem_p,
    )
    options = dict(batch_size=max(1, args.batch_size), threads=max(1, args.threads), progress=not args.no_progress)
    embed_started = time.perf_counter()
    originals = embed_files(features, original_files, originals_dir, desc="originals", **options)
    if not originals.kept:
        raise EvaluationError(f"none of the {len(original_files)} originals could be read")
    database_distractors = embed_files(features, distractors, distractors_dir, desc="distractors", **options)
    distractor_kept = [distractors[i] for i in database_distractors.kept]

    donors = load_donors(distractor_kept, settings.max_image_pixels, settings.max_jpeg_scans)
    original_names = [original_files[i].relative_to(originals_dir).as_posix() for i in originals.kept]
    jobs = [
        CopyJob(original_files[i], plan_copy(name, c, args.seed, donors=len(donors)))
        for i, name in zip(originals.kept, original_names, strict=True)
        for c in range(args.copies_per_original)
    ]
    save_dir = Path(args.save_copies) if args.save_copies else None
    if save_dir is not None:
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EvaluationError(f"cannot create --save-copies {save_dir}: {exc.strerror or exc}") from exc
    maker = CopyMaker(donors, settings.max_image_pixels, settings.max_jpeg_scans, save_dir)
    copies = embed_items(features, jobs, maker, lambda job: job.name, desc="copies", **options)
    embed_seconds = time.perf_counter() - embed_started
    if not copies.kept:
        raise EvaluationError("none of the copies could be made")

    whitening = None
    db_originals, db_distractors, queries = originals.features, database_distractors.features, copies.features
    if args.whiten:
        # learned on the distractors only: unlabelled images like the database's, never the queries
        whitening = Whitening.fit(db_distractors)
        db_originals, db_distractors, queries = whitening(db_originals), whitening(db_distractors), whitening(queries)
    dim = whitening.dim if whitening is not None else features.dim

    gallery = memory_gallery(settings, features, dim)
    fill_gallery(gallery, db_originals, original_names, [{"path": n, "set": "original"} for n in original_names])
    distractor_names = [path.relative_to(distractors_dir).as_posix() for path in distractor_kept]
    fill_gallery(
        gallery,
        db_distractors,
        [None] * len(distractor_names),
        [{"path": n, "set": "distractor"} for n in distractor_names],
    )
    depth = gallery.size
    search_started = time.perf_counter()
    kept_jobs = [jobs[i] for i in copies.kept]
    all_scores, all_positive, ranks, per_copy = [], [], [], []
    for job, neighbours in zip(
        kept_jobs, rankings(gallery, queries, depth, progress=not args.no_progress), strict=True
    ):
        scores = np.fromiter((n.score for n in neighbours), dtype=np.float64, count=len(neighbours))
        positive = np.fromiter((n.label == job.plan.original for n in neighbours), dtype=bool, count=len(neighbours))
        found = np.flatnonzero(positive)
        rank = int(found[0]) + 1 if len(found) else None
        all_scores.append(scores)
        all_positive.append(positive)
        ranks.append(rank)
        top = neighbours[0] if neighbours else None
        per_copy.append(
            {
                "copy": job.name,
                "edits": list(job.plan.kinds),
                "rank": rank,
                "score": float(scores[found[0]]) if rank else None,
                "top": (top.metadata or {}).get("path") if top is not None else None,
                "top_score": top.score if top is not None else None,
            }
        )
    search_seconds = time.perf_counter() - search_started
    gallery_info = gallery.info()
    gallery.close()

    n_queries = len(kept_jobs)
    micro_ap = micro_average_precision(np.concatenate(all_scores), np.concatenate(all_positive), n_queries)
    recall = {str(k): mean([float(r is not None and r <= k) for r in ranks]) for k in ks}
    per_edit = {}
    for kind in EDIT_KINDS:
        hits = [float(r == 1) for job, r in zip(kept_jobs, ranks, strict=True) if kind in job.plan.kinds]
        if hits:
            per_edit[kind] = {"copies": len(hits), "recall_at_1": mean(hits)}
    describe = features.describe()
    if whitening is not None:
        describe["whitening"] = {
            "learned_on": len(distractor_kept),
            "dim": whitening.dim,
            "energy_kept": round(whitening.energy_kept, 4),
        }
    return {
        "task": "copydetect",
        "micro_ap": micro_ap,
        "recall_at_k": recall,
        "map": mean([1.0 / r if r else 0.0 for r in ranks]),
        "chance": {"recall_at_1": 1.0 / depth, "micro_ap": 1.0 / depth},
        "recall_at_1_per_edit": per_edit,
        "k": ks,
        **describe,
        "whiten": whitening is not None,
        "provider": features.model.provider if features.model is not None else None,
        "gallery": {key: gallery_info[key] for key in ("backend", "index_type", "dim", "size", "model")},
        "ranking_depth": depth,
        "seed": args.seed,
        "copies_per_original": args.copies_per_original,
        "originals": {
            "folder": str(originals_dir),
            "images": len(original_files),
            "embedded": len(originals.kept),
            "skipped": len(originals.skipped),
        },
        "distractors": {
            "folder": str(distractors_dir),
            "images": len(distractors),
            "embedded": len(distractor_kept),
            "skipped": len(database_distractors.skipped),
            "excluded": list(args.exclude),
            "max_distractors": args.max_distractors or None,
        },
        "copies": {"made": len(jobs), "embedded": n_queries, "skipped": len(copies.skipped), "donors": len(donors)},
        "skipped_files": (originals.skipped + database_distractors.skipped + copies.skipped)[:100],
        "per_copy": per_copy,
        "seconds": {
            "embedding": round(embed_seconds, 2),
            "search": round(search_seconds, 2),
            "total": round(time.perf_counter() - started, 2),
        },
    }


def summary(result: dict[str, Any]) -> str:
    """The human-readable lines printed at the end."""
    recall = "  ".join(f"R@{k} {100 * v:.1f}" for k, v in result["recall_at_k"].items())
    whiten = " + whitening" if result["whiten"] else ""
    return (
        f"{result['model']} ({result['features']}{whiten}, dim {result['gallery']['dim']}): "
        f"µAP {100 * result['micro_ap']:.2f}  {recall}  mAP {100 * result['map']:.2f}\n"
        f"{result['copies']['embedded']} copies of {result['originals']['embedded']} originals against "
        f"{result['gallery']['size']} database images (chance R@1 {100 * result['chance']['recall_at_1']:.2f}) "
        f"in {result['seconds']['total']:.1f} s"
    )


def main(args: argparse.Namespace) -> int:
    return run_command(PROG, run, summary, args)

"""``dino retrieval``: image retrieval on labelled folders, through the service's gallery.

The paper evaluates DINO's frozen [CLS] feature for image retrieval on the revisited Oxford and
Paris landmarks (Caron et al. 2021, Sec. 4.2, Table 6; Radenovic et al. 2018): every query ranks
the whole database by cosine similarity, and the score is the mean average precision over queries.
Those sets need their landmark ground truth; this command runs the same protocol on any labelled
ImageFolder pair (``DIR/<class>/<image>``), where a database image is relevant to a query when it
has the query's class:

    dino retrieval --model models/NAME --database DIR --queries DIR [--k 1,5,10] [--output result.json]

Both folders go through the service's own path (:mod:`service.evaluation.features`): the same
decoding and preprocessing, the same OnnxModel, the L2-normalised [CLS] embedding. The database
goes into the service's gallery (an in-memory :class:`service.gallery.EmbeddingIndex`, flat = exact
inner product; ``--index-type hnsw`` measures the approximate index instead), and each query is
answered by the gallery's ``search`` with k = the database size: the exact full ranking, from which
AP is computed without truncation (with HNSW, relevant images the graph search does not return count
as never found).

Reported (JSON with ``--output``): mAP; recall@k (the share of queries with at least one relevant
image in the top k, the "recall@k" of retrieval papers); precision@k (the mean share of relevant
images in the top k); mAP per class; counts of images embedded and skipped (unreadable files are
skipped and counted, never fatal).

Baselines: ``--baseline pixels`` ranks by raw pixels (no model; see
:class:`service.evaluation.features.PixelFeatures`); a random-init network is evaluated by passing
its exported model folder as ``--model``.

Bad input (missing or empty folder, images outside class subfolders, a query class that the
database lacks, an unusable model folder) is one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from dino.images import label_of
from service.evaluation.features import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_THREADS,
    EvaluationError,
    embed_files,
    fill_gallery,
    image_files,
    load_settings,
    make_features,
    memory_gallery,
    parse_ks,
    rankings,
    run_command,
)
from service.evaluation.metrics import average_precision, hit_at_k, mean, precision_at_k

log = logging.getLogger(__name__)

PROG = "dino retrieval"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder (default: DINO_MODEL_DIR, else the first folder of models/)")
    parser.add_argument("--database", required=True, help="labelled image folder DIR/<class>/<image>: the gallery")
    parser.add_argument("--queries", required=True, help="labelled image folder DIR/<class>/<image>: the queries")
    parser.add_argument("--k", default="1,5,10", help="ranks of recall@k and precision@k (default 1,5,10)")
    parser.add_argument("--output", help="write the result as JSON to this file")
    parser.add_argument(
        "--baseline", choices=["pixels"], help="raw pixels instead of a model (random init: pass its folder as --model)"
    )
    parser.add_argument("--pixel-size", type=int, default=16, help="pixels baseline: side of the pooled grid (16)")
    parser.add_argument("--image-size", type=int, default=64, help="pixels baseline: centre crop side (64)")
    parser.add_argument(
        "--max-per-class",
        type=int,
        default=0,
        help="use only the first N images (sorted) of each class of both folders (default: all)",
    )
    parser.add_argument("--index-type", choices=["flat", "hnsw"], default="flat", help="gallery index (default flat)")
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], default=None, help="default: DINO_PROVIDER")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per inference call")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="decoding threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def labelled_files(root: Path, role: str, max_per_class: int = 0) -> tuple[list[Path], list[str]]:
    """The images of a labelled folder and their classes (subfolder names), optionally the first
    ``max_per_class`` of each class; EvaluationError for a missing/empty folder or unlabelled images."""
    files = image_files(root, role)
    labels = [label_of(path, root) for path in files]
    unlabelled = [path for path, label in zip(files, labels, strict=True) if label is None]
    if unlabelled:
        raise EvaluationError(
            f"{len(unlabelled)} images of the {role} folder are not in a class subfolder (e.g. {unlabelled[0]}): "
            f"the layout is {root}/<class>/<image>"
        )
    if max_per_class > 0:
        taken: Counter[str] = Counter()
        chosen = []
        for path, label in zip(files, labels, strict=True):
            assert label is not None
            if taken[label] < max_per_class:
                taken[label] += 1
                chosen.append((path, label))
        files, labels = [p for p, _ in chosen], [label for _, label in chosen]
    return files, [str(label) for label in labels]


def check_classes(query_labels: list[str], database_labels: list[str], when: str = "") -> None:
    """Every query class must have images in the database (else its AP is undefined)."""
    missing = sorted(set(query_labels) - set(database_labels))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise EvaluationError(f"query classes absent from the database{when}: {shown}")


def retrieval_metrics(relevance: list[np.ndarray], n_relevant: list[int], ks: list[int]) -> dict[str, Any]:
    """mAP, recall@k and precision@k of ranked relevance lists (one per query)."""
    aps = [average_precision(rel, n) for rel, n in zip(relevance, n_relevant, strict=True)]
    return {
        "map": mean(aps),
        "recall_at_k": {str(k): mean([float(hit_at_k(rel, k)) for rel in relevance]) for k in ks},
        "precision_at_k": {str(k): mean([precision_at_k(rel, k) for rel in relevance]) for k in ks},
        "aps": aps,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole evaluation; returns the JSON result."""
    started = time.perf_counter()
    ks = parse_ks(args.k)
    database_dir, queries_dir = Path(args.database), Path(args.queries)
    db_files, db_labels = labelled_files(database_dir, "database", args.max_per_class)
    q_files, q_labels = labelled_files(queries_dir, "queries", args.max_per_class)
    check_classes(q_labels, db_labels)

    settings = load_settings(args.model, args.provider, args.index_type)
    features = make_features(
        settings, kind="cls", baseline=args.baseline, image_size=args.image_size, pixel_size=args.pixel_size
    )
    options = dict(batch_size=max(1, args.batch_size), threads=max(1, args.threads), progress=not args.no_progress)
    embed_started = time.perf_counter()
    db = embed_files(features, db_files, database_dir, desc="database", **options)
    queries = embed_files(features, q_files, queries_dir, desc="queries", **options)
    embed_seconds = time.perf_counter() - embed_started
    db_kept_labels = [db_labels[i] for i in db.kept]
    q_kept_labels = [q_labels[i] for i in queries.kept]
    if not db.kept:
        raise EvaluationError(f"none of the {len(db_files)} database images could be read")
    if not queries.kept:
        raise EvaluationError(f"none of the {len(q_files)} query images could be read")
    check_classes(q_kept_labels, db_kept_labels, " once unreadable images are skipped")

    gallery = memory_gallery(settings, features)
    fill_gallery(
        gallery,
        db.features,
        db_kept_labels,
        [{"path": db_files[i].relative_to(database_dir).as_posix()} for i in db.kept],
    )
    per_class = Counter(db_kept_labels)
    depth = gallery.size  # the full ranking: AP over the whole database
    search_started = time.perf_counter()
    relevance = []
    for label, neighbours in zip(
        q_kept_labels, rankings(gallery, queries.features, depth, progress=not args.no_progress), strict=True
    ):
        relevance.append(np.fromiter((n.label == label for n in neighbours), dtype=bool, count=len(neighbours)))
    search_seconds = time.perf_counter() - search_started
    gallery_info = gallery.info()
    gallery.close()

    metrics = retrieval_metrics(relevance, [per_class[label] for label in q_kept_labels], ks)
    by_class: dict[str, list[float]] = defaultdict(list)
    for label, ap in zip(q_kept_labels, metrics.pop("aps"), strict=True):
        by_class[label].append(ap)
    return {
        "task": "retrieval",
        **metrics,
        "map_per_class": {label: mean(aps) for label, aps in sorted(by_class.items())},
        # a random ranking: precision at any rank (and about its AP) is the query class's share of the database
        "chance": {"precision": mean([per_class[label] / depth for label in q_kept_labels])},
        "k": ks,
        **features.describe(),
        "provider": features.model.provider if features.model is not None else None,
        "gallery": {key: gallery_info[key] for key in ("backend", "index_type", "dim", "size", "model")},
        "ranking_depth": depth,
        "database": {
            "folder": str(database_dir),
            "images": len(db_files),
            "embedded": len(db.kept),
            "skipped": len(db.skipped),
            "classes": len(per_class),
        },
        "queries": {
            "folder": str(queries_dir),
            "images": len(q_files),
            "embedded": len(queries.kept),
            "skipped": len(queries.skipped),
            "classes": len(set(q_kept_labels)),
        },
        "max_per_class": args.max_per_class or None,
        "skipped_files": (db.skipped + queries.skipped)[:100],
        "seconds": {
            "embedding": round(embed_seconds, 2),
            "search": round(search_seconds, 2),
            "total": round(time.perf_counter() - started, 2),
        },
    }


def summary(result: dict[str, Any]) -> str:
    """The human-readable lines printed at the end."""
    recall = "  ".join(f"R@{k} {100 * v:.1f}" for k, v in result["recall_at_k"].items())
    precision = "  ".join(f"P@{k} {100 * v:.1f}" for k, v in result["precision_at_k"].items())
    db, q, chance = result["database"], result["queries"], result["chance"]["precision"]
    return (
        f"{result['model']} ({result['features']}, dim {result['dim']}): mAP {100 * result['map']:.2f}  {recall}  "
        f"{precision}\n{q['embedded']} queries against {db['embedded']} database images "
        f"({db['skipped'] + q['skipped']} unreadable skipped; chance precision {100 * chance:.1f}) "
        f"in {result['seconds']['total']:.1f} s"
    )


def main(args: argparse.Namespace) -> int:
    return run_command(PROG, run, summary, args)

"""What the evaluation commands share: images through the service's own path, the features of the
paper's evaluations, PCA whitening, and the gallery that ranks them.

Images are read exactly as the service reads an upload (:class:`service.preprocess.Preprocessor`:
safe decoding with the service's limits, the model's evaluation transform) and embedded by the same
:class:`service.runtime.OnnxModel`, so that an evaluation measures what ``POST /embed`` and
``/neighbors`` answer, not a re-implementation of them. Unreadable images are skipped and counted.

Features (Caron et al. 2021, Sec. 4.2):

- ``cls``: the L2-normalised [CLS] embedding (:func:`service.state.embed_tensors`): what the
  service stores in its gallery, and the paper's feature for image retrieval (Table 6).
- ``cls+gem``: the paper's feature for copy detection (Table 7): the [CLS] embedding concatenated
  with the patch tokens (model output ``patch_tokens`` [B, N, D]) pooled by GeM with p = 4, as in
  the reference ``eval_copy_detection.py``. The [CLS] token summarises the image for the
  self-distillation objective, which is trained to be invariant to crops and colour changes; the
  pooled patch tokens keep local evidence that survives edits to other parts of the image. Each
  part is L2-normalised before the concatenation (which is L2-normalised again) so that neither
  part dominates the cosine similarity: the reference code concatenates the raw vectors, whose
  norms come from the last LayerNorm and may differ.
- ``pixels``: the baseline a learned feature must beat: the service's preprocessed input tensor
  (resize, centre crop, mean/std normalisation) averaged down to ``pixel_size`` x ``pixel_size``
  (default 16x16, i.e. 768 values), L2-normalised. Averaging 4x4 blocks of the 64 px crop keeps
  the layout and colours that identify a near-copy while ignoring JPEG noise, and keeps the
  dimension small enough to learn a whitening from a few thousand images.

Whitening (:class:`Whitening`): as in the paper's copy detection, a PCA whitening learned on
distractor images (unlabelled, from the same distribution as the database), applied to queries and
database alike, then L2-normalised. It flattens the directions in which all images vary a lot
(shared by everything, so uninformative for telling one photo from another) and amplifies the rare
ones.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import ValidationError
from tqdm import tqdm

from dino.images import IMAGE_EXTENSIONS, ImageInputError, list_image_files
from service.gallery import EmbeddingIndex, GalleryError, Neighbor
from service.gallery.factory import open_faiss_index
from service.preprocess import EvalTransform, Preprocessor
from service.runtime import ModelLoadError, OnnxModel
from service.settings import ModelNotFoundError, ServiceSettings
from service.state import embed_tensors, l2_normalize

log = logging.getLogger(__name__)

#: the normalisation of every model this project exports (ImageNet statistics), for the pixel baseline
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: GeM exponent of the paper's copy detection feature (reference eval_copy_detection.py); p = 1 is
#: average pooling, p -> infinity max pooling: 4 lets the strongest local responses dominate
GEM_P = 4.0
#: GeM is defined on non-negative activations: patch tokens are clamped at this value first, as the
#: reference code does (negative LayerNorm outputs carry no "presence" evidence for the pooling)
GEM_EPS = 1e-6
#: eigenvalues below this share of the largest are raised to it before whitening (reference PCA)
WHITENING_EPS = 1e-5
DEFAULT_BATCH_SIZE = 64
DEFAULT_THREADS = max(1, min(8, os.cpu_count() or 1))
#: the choices of --features
FEATURE_KINDS = ("cls", "cls+gem")

T = TypeVar("T")


class EvaluationError(Exception):
    """Bad input to an evaluation command (one line for the user, exit code 1)."""


# --------------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------------


class Features:
    """How model inputs [B, 3, H, W] become L2-normalised feature vectors [B, dim].

    ``model_name`` and ``model_sha256`` identify the features in the gallery (the OnnxModel's, or a
    made-up identity for the pixel baseline); ``preprocessor`` is the service's reader of image bytes.
    """

    kind: str
    dim: int
    model_name: str
    model_sha256: str
    preprocessor: Preprocessor
    model: OnnxModel | None = None

    def __call__(self, tensors: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What the JSON result records about the features."""
        return {"features": self.kind, "dim": self.dim, "model": self.model_name, "model_sha256": self.model_sha256}


def service_preprocessor(model: OnnxModel, settings: ServiceSettings) -> Preprocessor:
    """The service's reader for ``model``: decoding limits from the settings, the model's eval transform."""
    return Preprocessor.for_model(model.spec, settings.max_image_pixels, settings.max_jpeg_scans)


class ClsFeatures(Features):
    """The service's embedding: the L2-normalised [CLS] token (what POST /embed answers)."""

    kind = "cls"

    def __init__(self, model: OnnxModel, settings: ServiceSettings):
        self.model = model
        self.dim = model.spec.embed_dim
        self.model_name, self.model_sha256 = model.name, model.sha256
        self.preprocessor = service_preprocessor(model, settings)

    def __call__(self, tensors: np.ndarray) -> np.ndarray:
        assert self.model is not None
        return embed_tensors(self.model, tensors)


def gem_pool(tokens: np.ndarray, p: float = GEM_P, eps: float = GEM_EPS) -> np.ndarray:
    """Generalised mean pooling over tokens [B, N, D] -> [B, D]: (mean_n max(x, eps)^p)^(1/p)."""
    clamped = np.maximum(np.asarray(tokens, dtype=np.float64), eps)
    return np.power(np.mean(np.power(clamped, p), axis=1), 1.0 / p).astype(np.float32)


class ClsGemFeatures(Features):
    """The paper's copy detection feature: [CLS] (L2-normalised) ++ GeM-pooled patch tokens
    (L2-normalised), the concatenation L2-normalised; twice the model's dimension."""

    kind = "cls+gem"

    def __init__(self, model: OnnxModel, settings: ServiceSettings, p: float = GEM_P):
        self.model = model
        self.p = p
        self.dim = 2 * model.spec.embed_dim
        self.model_name, self.model_sha256 = model.name, model.sha256
        self.preprocessor = service_preprocessor(model, settings)

    def __call__(self, tensors: np.ndarray) -> np.ndarray:
        assert self.model is not None
        out = self.model.run(tensors, ["embedding", "patch_tokens"])
        cls = l2_normalize(out["embedding"])
        gem = l2_normalize(gem_pool(out["patch_tokens"], self.p))
        return l2_normalize(np.concatenate([cls, gem], axis=1))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "gem_p": self.p}


class PixelFeatures(Features):
    """Raw pixels: the normalised input tensor averaged down to ``pixel_size``^2 per channel, L2-normalised."""

    kind = "pixels"

    def __init__(self, settings: ServiceSettings, image_size: int = 64, pixel_size: int = 16):
        if image_size < 1 or pixel_size < 1 or image_size % pixel_size:
            raise EvaluationError(f"--pixel-size {pixel_size} must divide --image-size {image_size}")
        self.image_size, self.pixel_size = image_size, pixel_size
        self.dim = 3 * pixel_size * pixel_size
        # the resize rule of model.json's default (shorter side image_size * 8/7, as ModelSpec)
        transform = EvalTransform(image_size, round(image_size * 8 / 7), IMAGENET_MEAN, IMAGENET_STD)
        self.preprocessor = Preprocessor(transform, settings.max_image_pixels, settings.max_jpeg_scans)
        self.model_name = f"raw-pixels-{image_size}px-{pixel_size}x{pixel_size}"
        # no model file: a stable identity made from the recipe, in the form of a model's sha256
        self.model_sha256 = hashlib.sha256(self.model_name.encode()).hexdigest()

    def __call__(self, tensors: np.ndarray) -> np.ndarray:
        batch = np.asarray(tensors, dtype=np.float32)
        b, c, h, w = batch.shape
        f = h // self.pixel_size
        pooled = batch.reshape(b, c, self.pixel_size, f, self.pixel_size, f).mean(axis=(3, 5))
        return l2_normalize(pooled.reshape(b, -1))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "image_size": self.image_size, "pixel_size": self.pixel_size}


def load_settings(model: str | None, provider: str | None, index_type: str | None) -> ServiceSettings:
    """The service's settings (DINO_* environment) with the command's flags on top."""
    overrides: dict[str, Any] = {"model_dir": model, "provider": provider, "index_type": index_type}
    return ServiceSettings(**{k: v for k, v in overrides.items() if v is not None})


def load_model(settings: ServiceSettings) -> OnnxModel:
    """The model of ``--model`` (default: the shipped one), loaded as ``dino serve`` loads it."""
    return OnnxModel.from_settings(settings)


def make_features(
    settings: ServiceSettings,
    *,
    kind: str = "cls",
    baseline: str | None = None,
    image_size: int = 64,
    pixel_size: int = 16,
    gem_p: float = GEM_P,
) -> Features:
    """The features of a command's flags: raw pixels (no model is loaded), or the model's ``kind``."""
    if baseline == "pixels":
        return PixelFeatures(settings, image_size, pixel_size)
    model = load_model(settings)
    if kind == "cls+gem":
        return ClsGemFeatures(model, settings, gem_p)
    if kind != "cls":
        raise EvaluationError(f"unknown features {kind!r}; choose one of {FEATURE_KINDS}")
    return ClsFeatures(model, settings)


# --------------------------------------------------------------------------------------------------
# images -> features
# --------------------------------------------------------------------------------------------------


def image_files(root: Path, role: str) -> list[Path]:
    """Every image below ``root`` (sorted); EvaluationError when the folder is missing or holds none."""
    if not root.is_dir():
        raise EvaluationError(f"{role} folder {root} does not exist or is not a folder")
    files = list_image_files(root)
    if not files:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise EvaluationError(f"no images in the {role} folder {root} (looked for {extensions})")
    return files


@dataclass
class Embedded:
    """Features of the readable items of a list: row i of ``features`` is item ``kept[i]``."""

    features: np.ndarray
    kept: list[int]
    skipped: list[dict[str, str]] = field(default_factory=list)  #: {"item": ..., "reason": ...}


def embed_items(
    features: Features,
    items: Sequence[T],
    read: Callable[[T], bytes],
    name: Callable[[T], str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int = DEFAULT_THREADS,
    progress: bool = True,
    desc: str = "embedding",
) -> Embedded:
    """Read (``read(item)`` -> image bytes), decode and preprocess ``items`` in a thread pool as the
    service does, and embed them in batches; unreadable items are logged, skipped and listed."""
    preprocessor = features.preprocessor

    def prepare(item: T) -> tuple[np.ndarray | None, str]:
        try:
            return preprocessor.prepare(read(item)).tensor, ""
        except ImageInputError as exc:
            return None, exc.detail
        except OSError as exc:  # unreadable from disk
            return None, f"cannot read the file: {exc.strerror or exc}"

    chunks: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[dict[str, str]] = []
    with (
        ThreadPoolExecutor(max_workers=max(1, threads)) as pool,
        tqdm(total=len(items), unit="img", desc=desc, disable=not progress) as bar,
    ):
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            good: list[np.ndarray] = []
            for offset, (tensor, reason) in enumerate(pool.map(prepare, chunk)):
                if tensor is None:
                    log.warning("skipping %s: %s", name(chunk[offset]), reason)
                    skipped.append({"item": name(chunk[offset]), "reason": reason})
                else:
                    good.append(tensor)
                    kept.append(start + offset)
            if good:
                chunks.append(features(np.stack(good)))
            bar.update(len(chunk))
    matrix = np.concatenate(chunks) if chunks else np.zeros((0, features.dim), dtype=np.float32)
    return Embedded(np.ascontiguousarray(matrix, dtype=np.float32), kept, skipped)


def embed_files(features: Features, files: Sequence[Path], root: Path, **options: Any) -> Embedded:
    """:func:`embed_items` for image files (named by their path relative to ``root``)."""
    return embed_items(features, files, Path.read_bytes, lambda p: p.relative_to(root).as_posix(), **options)


# --------------------------------------------------------------------------------------------------
# whitening
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Whitening:
    """PCA whitening: x -> normalise(diag(lambda^-1/2) V^T (x - mean)), learned on a set of features.

    As the reference ``utils.PCA(whit=0.5)`` of DINO: eigendecomposition of the covariance, eigenvalues
    below ``WHITENING_EPS`` x the largest raised to it, every direction scaled to unit variance. Two
    differences, both for small learning sets: the covariance is that of the centred features (the
    reference uses the uncentred second moment), and at most n - 1 directions are kept when n
    learning images span fewer than the feature's dimension (the others have zero variance: scaling
    them up would only amplify noise). ``dim`` is the output dimension.
    """

    mean: np.ndarray  #: [D]
    projection: np.ndarray  #: [dim, D]
    energy_kept: float  #: share of the variance in the kept directions

    @property
    def dim(self) -> int:
        return int(self.projection.shape[0])

    @classmethod
    def fit(cls, features: np.ndarray, power: float = 0.5) -> Whitening:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise EvaluationError("whitening needs the features of at least 2 distractor images")
        mean = x.mean(axis=0)
        centred = x - mean
        cov = centred.T @ centred / len(x)
        eigenvalues, eigenvectors = np.linalg.eigh(cov)
        order = np.argsort(eigenvalues)[::-1][: min(len(x) - 1, x.shape[1])]
        total = float(np.clip(eigenvalues, 0, None).sum())
        values = np.maximum(eigenvalues[order], eigenvalues.max() * WHITENING_EPS)
        projection = (eigenvectors[:, order] / values**power).T
        energy = float(np.clip(eigenvalues[order], 0, None).sum() / total) if total > 0 else 0.0
        return cls(mean.astype(np.float32), projection.astype(np.float32), energy)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return l2_normalize((np.asarray(features, dtype=np.float32) - self.mean) @ self.projection.T)


# --------------------------------------------------------------------------------------------------
# the gallery
# --------------------------------------------------------------------------------------------------


def memory_gallery(settings: ServiceSettings, features: Features, dim: int | None = None) -> EmbeddingIndex:
    """The service's FAISS gallery, in memory, for these features (index type from the settings).

    For the model's own [CLS] embedding this is exactly what ``dino serve`` opens
    (:func:`service.gallery.factory.open_faiss_index`); other features (concatenated, whitened,
    pixels) have another dimension, so the same class is constructed with that dimension and the
    model's identity.
    """
    dim = features.dim if dim is None else dim
    if features.model is not None and dim == features.model.spec.embed_dim and features.kind == "cls":
        return open_faiss_index(settings, features.model, None, read_only=False)  # DINO_INDEX_READ_ONLY aside
    return EmbeddingIndex(
        None,
        dim=dim,
        model_sha256=features.model_sha256,
        model_name=f"{features.model_name} ({features.kind})",
        index_type=settings.index_type,
        hnsw_m=settings.hnsw_m,
        hnsw_ef_construction=settings.hnsw_ef_construction,
        hnsw_ef_search=settings.hnsw_ef_search,
    )


#: entries per gallery add
ADD_BATCH = 4096


def fill_gallery(
    gallery: EmbeddingIndex,
    vectors: np.ndarray,
    labels: Sequence[str | None],
    metadata: Sequence[dict | None],
) -> None:
    """Add ``vectors`` with their labels and metadata, in batches (no stored images)."""
    for start in range(0, len(vectors), ADD_BATCH):
        stop = start + ADD_BATCH
        gallery.add(vectors[start:stop], labels[start:stop], metadata[start:stop])


def rankings(
    gallery: EmbeddingIndex, queries: np.ndarray, depth: int, *, progress: bool = True, desc: str = "searching"
) -> Iterator[list[Neighbor]]:
    """The gallery's answer (``search(query, k=depth)``, best first) for each query in turn.

    With ``depth`` = the gallery's size and a flat index, this is the exact full ranking of the
    database by cosine similarity, from which average precision is computed without truncation.
    """
    for query in tqdm(queries, unit="query", desc=desc, disable=not progress):
        yield gallery.search(query, depth)


def parse_ks(text: str) -> list[int]:
    """``"1,5,10"`` -> [1, 5, 10] (sorted, unique); EvaluationError for anything else."""
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise EvaluationError(f"--k takes comma-separated positive integers such as 1,5,10, not {text!r}") from None
    if not ks or ks[0] < 1:
        raise EvaluationError(f"--k takes comma-separated positive integers such as 1,5,10, not {text!r}")
    return ks


def run_command(
    prog: str,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    summary: Callable[[dict[str, Any]], str],
    args: argparse.Namespace,
) -> int:
    """Run an evaluation command: its result as JSON to ``--output``, a summary on stdout, exit code 0;
    bad input as one line on stderr and exit code 1."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run(args)
    except ValidationError as exc:
        first = exc.errors()[0]
        print(f"{prog}: {first['msg']} ({'.'.join(map(str, first['loc'])) or 'settings'})", file=sys.stderr)
        return 1
    except (EvaluationError, ModelNotFoundError, ModelLoadError, GalleryError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    if args.output:
        try:
            Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        except OSError as exc:
            print(f"{prog}: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    print(summary(result))
    return 0

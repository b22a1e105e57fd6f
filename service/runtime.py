"""The ONNX model: a model folder (model.json + model.onnx) loaded into an onnxruntime session.

The execution provider is chosen once at load: CUDA when asked for or, in ``auto`` mode, when a
usable NVIDIA GPU is present; the CPU otherwise. onnxruntime silently falls back to the CPU when the
CUDA libraries are missing, so the *active* providers are read back from the session and logged.

The precision picks the file of the folder (:func:`choose_file`): ``model.onnx`` (fp32),
``model_fp16.onnx`` (fp16, for CUDA) or ``model_int8.onnx`` (int8, for the CPU). ``auto`` serves fp16
on CUDA when the folder has it, int8 on the CPU when the folder has it *and* its k-NN drop measured
at export is at most :data:`AUTO_INT8_MAX_DROP` points, and fp32 otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from dino.model_folder import FORMAT_VERSION, METADATA_FILE, OUTPUT_NAMES, sha256_file

if TYPE_CHECKING:
    from service.settings import ServiceSettings

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
#: model.json format versions this service understands
SUPPORTED_FORMAT_VERSIONS = (FORMAT_VERSION,)
PRECISIONS = ("auto", "fp32", "int8", "fp16")
#: k-NN top-1 points the int8 file may lose (as measured by ``dino export --int8``) for ``auto`` to serve it
AUTO_INT8_MAX_DROP = 0.5


class ModelLoadError(Exception):
    """The model folder is unusable (bad model.json, checksum mismatch, wrong outputs, provider missing)."""


@dataclass(frozen=True)
class ModelSpec:
    """The parts of model.json the service relies on (validated at load)."""

    name: str
    arch: str
    patch_size: int
    embed_dim: int
    num_heads: int
    image_size: int
    resize_size: int
    mean: tuple[float, ...]  #: per RGB channel (3 values)
    std: tuple[float, ...]  #: per RGB channel (3 values)
    input_name: str
    dynamic_hw: bool
    file: str
    sha256: str
    fp16_file: str | None
    fp16_sha256: str | None
    int8_file: str | None
    int8_sha256: str | None
    int8_knn_drop: float | None  #: k-NN top-1 points lost by the int8 file, as measured at export
    raw: dict

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, columns) of an ``image_size`` input."""
        side = self.image_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @classmethod
    def from_json(cls, path: Path) -> ModelSpec:
        """Parse and validate ``model.json``."""
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: cannot read model metadata: {exc}") from exc
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{path}: expected a JSON object")
        version = raw.get("format_version", 1)
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise ModelLoadError(
                f"{path}: format_version {version} is not supported (known: {SUPPORTED_FORMAT_VERSIONS})"
            )
        try:
            spec = cls(
                name=str(raw["name"]),
                arch=str(raw.get("arch", "unknown")),
                patch_size=int(raw["patch_size"]),
                embed_dim=int(raw["embed_dim"]),
                num_heads=int(raw["num_heads"]),
                image_size=int(raw["image_size"]),
                resize_size=int(raw.get("resize_size") or round(int(raw["image_size"]) * 8 / 7)),
                mean=tuple(float(v) for v in raw["mean"]),
                std=tuple(float(v) for v in raw["std"]),
                input_name=str(raw.get("input_name", "image")),
                dynamic_hw=bool(raw.get("dynamic_hw", False)),
                file=str(raw.get("file", "model.onnx")),
                sha256=str(raw["sha256"]).lower(),
                fp16_file=raw.get("fp16_file"),
                fp16_sha256=(str(raw["fp16_sha256"]).lower() if raw.get("fp16_sha256") else None),
                int8_file=raw.get("int8_file"),
                int8_sha256=(str(raw["int8_sha256"]).lower() if raw.get("int8_sha256") else None),
                int8_knn_drop=_int8_drop(raw.get("int8")),
                raw=raw,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{path}: missing or invalid field {exc}") from exc
        if len(spec.mean) != 3 or len(spec.std) != 3 or min(spec.std) <= 0:
            raise ModelLoadError(f"{path}: mean and std must be 3 values (std > 0)")
        if spec.image_size <= 0 or spec.patch_size <= 0 or spec.image_size % spec.patch_size:
            raise ModelLoadError(
                f"{path}: image_size {spec.image_size} is not a multiple of patch_size {spec.patch_size}"
            )
        for filename in (spec.file, spec.fp16_file, spec.int8_file):
            # the file names come from a JSON file that may have been edited: keep them inside the folder
            if filename is not None and (Path(filename).name != filename or filename in (".", "..")):
                raise ModelLoadError(f"{path}: model file name {filename!r} must be a plain file name")
        return spec


def _int8_drop(record: Any) -> float | None:
    """The measured k-NN drop of model.json's ``int8`` record (None when not measured or unreadable)."""
    if not isinstance(record, dict):
        return None
    drop = record.get("knn_drop_points")
    if isinstance(drop, bool) or not isinstance(drop, int | float) or drop != drop:  # NaN
        return None
    return float(drop)


def choose_file(spec: ModelSpec, model_dir: Path, precision: str, providers: list[str]) -> tuple[str, str, str]:
    """(file, its expected sha256, precision) of the folder to serve for ``precision`` on ``providers``.

    An explicit precision whose file the folder lacks is an error; ``auto`` falls back to fp32.
    """
    cuda = CUDA_PROVIDER in providers

    def present(name: str | None) -> bool:
        return name is not None and (model_dir / name).is_file()

    if precision == "fp16":
        if not present(spec.fp16_file):
            raise ModelLoadError(f"precision fp16 asked for, but {model_dir} has no fp16 file (dino export --fp16)")
        if not cuda:
            raise ModelLoadError("precision fp16 needs the CUDA provider: onnxruntime's CPU kernels are float32/int8")
        return str(spec.fp16_file), str(spec.fp16_sha256 or ""), "fp16"
    if precision == "int8":
        if not present(spec.int8_file):
            raise ModelLoadError(f"precision int8 asked for, but {model_dir} has no int8 file (dino export --int8)")
        return str(spec.int8_file), str(spec.int8_sha256 or ""), "int8"
    if precision == "auto":
        if cuda and present(spec.fp16_file):
            return str(spec.fp16_file), str(spec.fp16_sha256 or ""), "fp16"
        drop = spec.int8_knn_drop
        if not cuda and present(spec.int8_file) and drop is not None and drop <= AUTO_INT8_MAX_DROP:
            return str(spec.int8_file), str(spec.int8_sha256 or ""), "int8"
    return spec.file, spec.sha256, "fp32"


#: the dynamic batcher's cap by provider when DINO_MAX_BATCH_SIZE is not set. On the CPU
#: (benchmarks/precision.py, 2 threads) the default model in int8 peaks at batch 16 (596 img/s,
#: against 486 at 8 and 587 at 32) and ViT-S/16 is flat from 8 to 32 (76.5 / 73.8): larger batches
#: only add latency. A GPU keeps gaining up to 32 and beyond.
DEFAULT_BATCH_CAP = {CPU_PROVIDER: 16, CUDA_PROVIDER: 32}


def default_batch_cap(provider: str) -> int:
    """The batch cap for the active execution provider."""
    return DEFAULT_BATCH_CAP.get(provider, DEFAULT_BATCH_CAP[CPU_PROVIDER])


def check_model_file(settings: ServiceSettings) -> str:
    """The file ``dino serve`` will load for these settings, checked before any worker starts, so that a
    precision the folder cannot serve is one clear line rather than a failure in every worker."""
    model_dir = settings.resolved_model_dir()
    spec = ModelSpec.from_json(model_dir / METADATA_FILE)
    file, _, _ = choose_file(spec, model_dir, settings.precision, choose_providers(settings.provider))
    if not (model_dir / file).is_file():
        raise ModelLoadError(f"{model_dir / file}: model file missing")
    return file


def nvidia_gpu_present() -> bool:
    """Best-effort check for an NVIDIA GPU, so that ``auto`` does not make onnxruntime print CUDA
    library errors on machines without one. Outside Linux we cannot tell cheaply: assume yes and let
    onnxruntime decide."""
    if not sys.platform.startswith("linux"):
        return True
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


def choose_providers(requested: str) -> list[str]:
    """Provider list to try for ``requested`` in {auto, cpu, cuda}."""
    available = ort.get_available_providers()
    if requested == "cpu":
        return [CPU_PROVIDER]
    if requested == "cuda":
        if CUDA_PROVIDER not in available:
            raise ModelLoadError(
                f"provider 'cuda' asked for, but this onnxruntime build has no CUDA provider (available: {available}); "
                "install onnxruntime-gpu or use provider 'auto'/'cpu'"
            )
        return [CUDA_PROVIDER, CPU_PROVIDER]
    if CUDA_PROVIDER in available and nvidia_gpu_present():
        return [CUDA_PROVIDER, CPU_PROVIDER]
    return [CPU_PROVIDER]


class OnnxModel:
    """An exported DINO backbone served by onnxruntime.

    ``run(batch)`` takes normalised float32 images [B, 3, H, W] and returns a dict of the requested
    outputs (``embedding`` [B, D], ``patch_tokens`` [B, N, D], ``attention`` [B, heads, N]) as float32.
    Thread-safe: onnxruntime sessions may be run from several threads (the batcher uses one).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        provider: str = "auto",
        precision: str = "auto",
        verify_sha256: bool = True,
        intra_op_threads: int = 0,
    ):
        self.model_dir = Path(model_dir)
        self.spec = ModelSpec.from_json(self.model_dir / METADATA_FILE)
        providers = choose_providers(provider)

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads

        if precision not in PRECISIONS:
            raise ModelLoadError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        file, expected_sha, self.precision = choose_file(self.spec, self.model_dir, precision, providers)
        path = self.model_dir / file
        if not path.is_file():
            raise ModelLoadError(f"{path}: model file missing")
        if verify_sha256:
            actual = sha256_file(path)
            if expected_sha and actual != expected_sha:
                raise ModelLoadError(
                    f"{path}: sha256 {actual} does not match model.json ({expected_sha}); "
                    "the folder is corrupt or was edited"
                )
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"{path}: onnxruntime cannot load the model: {exc}") from exc
        self.file = file
        self.providers = self.session.get_providers()
        if provider == "cuda" and CUDA_PROVIDER not in self.providers:
            raise ModelLoadError(
                "provider 'cuda' asked for, but onnxruntime could not start it "
                "(missing CUDA/cuDNN libraries or no GPU); see the onnxruntime log above"
            )
        if CUDA_PROVIDER in providers and CUDA_PROVIDER not in self.providers:
            log.warning("CUDA provider could not start (see onnxruntime's message above): falling back to the CPU")

        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != self.spec.input_name:
            raise ModelLoadError(
                f"{path}: expected one input named {self.spec.input_name!r}, found {[i.name for i in inputs]}"
            )
        self.input_dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        missing = [name for name in OUTPUT_NAMES if name not in self.output_names]
        if missing:
            raise ModelLoadError(f"{path}: outputs {missing} missing (found {list(self.output_names)})")
        log.info(
            "model %s (%s/%d, %d px, dim %d, %s) loaded from %s; active execution provider: %s",
            self.spec.name,
            self.spec.arch,
            self.spec.patch_size,
            self.spec.image_size,
            self.spec.embed_dim,
            self.precision,
            path,
            self.providers[0],
        )

    @classmethod
    def from_settings(cls, settings: ServiceSettings, model_dir: Path | None = None, **overrides: Any) -> OnnxModel:
        """The model of ``model_dir`` (default: the settings' model folder) as ``dino serve`` loads it:
        the settings' provider, precision, checksum check and threads; ``overrides`` replace any of those."""
        options: dict[str, Any] = dict(
            provider=settings.provider,
            precision=settings.precision,
            verify_sha256=settings.verify_sha256,
            intra_op_threads=settings.intra_op_threads,
        )
        options.update(overrides)
        return cls(model_dir or settings.resolved_model_dir(), **options)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def sha256(self) -> str:
        """Identity of the model (the float32 file's checksum from model.json, whichever file is served)."""
        return self.spec.sha256

    @property
    def provider(self) -> str:
        """The execution provider that actually runs the graph."""
        return self.providers[0]

    def run(self, batch: np.ndarray, outputs: Iterable[str] = OUTPUT_NAMES) -> dict[str, np.ndarray]:
        """Run a batch [B, 3, H, W] of normalised images; returns the requested outputs as float32."""
        names = [name for name in OUTPUT_NAMES if name in set(outputs)]
        feed = {self.spec.input_name: np.ascontiguousarray(batch, dtype=self.input_dtype)}
        results = self.session.run(names, feed)
        return {name: np.asarray(value, dtype=np.float32) for name, value in zip(names, results, strict=True)}

    def warm_up(self, batches: int = 2, batch_size: int = 1) -> float:
        """Run a few dummy batches (allocations, kernel selection, CUDA context); returns the seconds spent."""
        start = time.perf_counter()
        size = self.spec.image_size
        dummy = np.zeros((batch_size, 3, size, size), dtype=np.float32)
        for _ in range(batches):
            self.run(dummy)
        seconds = time.perf_counter() - start
        log.info("model warmed up (%d batches) in %.2f s", batches, seconds)
        return seconds

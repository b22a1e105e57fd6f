"""The running service: model, preprocessing pool, batcher, gallery and metrics, built at startup.

:func:`load_state` does the blocking work (load + verify + warm up the model, open the gallery);
the app's lifespan runs it in a thread and then starts the batcher (and, for a remote gallery, the
watchdog that checks it and reconnects). Request handlers reach the state through
:func:`service.dependencies.get_state` and use its async helpers, which keep all decoding,
inference, disk and network work off the event loop. Gallery calls run in their own thread pool:
a slow or unreachable Milvus never takes the threads that decode images for /embed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dino.images import ImageInputError
from service.batching import DynamicBatcher, QueueFullError
from service.gallery import Gallery, GalleryHealth
from service.gallery.factory import open_gallery
from service.memory import return_large_blocks_to_the_system
from service.metrics import ServiceMetrics
from service.preprocess import PreparedImage, Preprocessor, make_thumbnail
from service.runtime import OnnxModel, default_batch_cap
from service.settings import ServiceSettings

log = logging.getLogger(__name__)


class RequestTooLarge(Exception):
    """A request that can never be served as sent (more images than the whole queue): HTTP 413."""


#: guards the L2 normalisation of an all-zero embedding
NORM_EPSILON = 1e-12


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, NORM_EPSILON)


def embed_tensors(model: OnnxModel, tensors: np.ndarray) -> np.ndarray:
    """L2-normalised [CLS] embeddings [B, D] of model inputs [B, 3, H, W] (as POST /embed answers them)."""
    return l2_normalize(model.run(tensors, ["embedding"])["embedding"])


@dataclass
class ServiceState:
    """Everything a request handler needs."""

    settings: ServiceSettings
    model: OnnxModel
    preprocessor: Preprocessor
    batcher: DynamicBatcher
    gallery: Gallery
    metrics: ServiceMetrics
    pool: ThreadPoolExecutor
    #: gallery work (disk, Milvus), apart from ``pool`` so that a stuck backend cannot starve decoding
    gallery_pool: ThreadPoolExecutor
    ready: bool = False
    started_at: float = field(default_factory=time.time)
    #: images of all requests admitted to decoding and not finished yet
    decoding: int = 0

    def __post_init__(self) -> None:
        # one slot per pool thread, handed out first come, first served across requests
        self.decode_slots = asyncio.Semaphore(self.settings.preprocess_threads)
        self._watchdog: asyncio.Task | None = None

    @property
    def decode_concurrency(self) -> int:
        """Images of one request decoded at the same time: half the pool, so others always get a turn."""
        return self.settings.decode_threads_per_request or max(1, self.settings.preprocess_threads // 2)

    async def run_blocking(self, fn, *args):
        """Run ``fn(*args)`` in the service's worker pool (decoding, encoding, rendering)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def run_gallery(self, fn, *args):
        """Run ``fn(*args)`` (a gallery call: disk or network) in the gallery's thread pool."""
        return await asyncio.get_running_loop().run_in_executor(self.gallery_pool, fn, *args)

    def gallery_health(self) -> GalleryHealth:
        """The gallery's state as last seen (no I/O), also published as metrics."""
        health = self.gallery.health()
        self.metrics.gallery_available.set(1 if health.available else 0)
        self.metrics.gallery_size.set(self.gallery.size)
        return health

    async def _watch_gallery(self) -> None:
        """Check a remote gallery every few seconds and reconnect when it was down: the gallery comes
        back on its own, and /readyz tells the truth even without gallery traffic."""
        interval = self.settings.milvus_retry_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self.run_gallery(self.gallery.probe)
            except Exception:  # never let the watchdog die: it is what brings the gallery back
                log.exception("gallery check failed")
            self.gallery_health()

    async def prepare(self, images: Sequence[bytes], names: Sequence[str] | None = None) -> list[PreparedImage]:
        """Decode + transform the images of one request in the pool; a bad image fails the request with its position.

        Admission and fairness: the images wait in one bounded queue (``max_queue_size`` images across
        all requests, 503 beyond it; a request larger than the whole queue is a 413), and one request
        decodes at most ``decode_concurrency`` images at a time, each holding one of the pool's slots
        (first come, first served). So a request of many costly images takes turns with the others
        instead of filling the pool until it is done.
        """
        count = len(images)
        limit = self.settings.max_queue_size
        if count > limit:
            raise RequestTooLarge(
                f"too many images: {count} in one request, the queue holds at most {limit} (DINO_MAX_QUEUE_SIZE)"
            )
        if self.decoding + count > limit:
            self.metrics.images.labels("refused").inc(count)
            raise QueueFullError(f"busy: {self.decoding} images are waiting to be decoded; retry later")
        self.decoding += count
        results: list[PreparedImage | BaseException | None] = [None] * count
        order = iter(range(count))  # shared by the request's decoders: each image is taken once
        failed = False

        def one(data: bytes) -> PreparedImage:
            started = time.perf_counter()
            try:
                return self.preprocessor.prepare(data)
            finally:
                self.metrics.preprocess_seconds.observe(time.perf_counter() - started)

        async def decoder() -> None:
            nonlocal failed
            for i in order:
                if failed:  # the request fails anyway: do not spend CPU on its other images
                    return
                async with self.decode_slots:
                    try:
                        results[i] = await self.run_blocking(one, images[i])
                    except Exception as exc:
                        results[i], failed = exc, True

        try:
            await asyncio.gather(*(decoder() for _ in range(min(count, self.decode_concurrency))))
        finally:
            self.decoding -= count
        for i, result in enumerate(results):
            if isinstance(result, ImageInputError):
                self.metrics.images.labels("rejected").inc()
                if count > 1 or (names and names[i]):
                    where = f"image {i}" + (f" ({names[i]})" if names and names[i] else "")
                    raise type(result)(f"{where}: {result.detail}") from result
                raise result
            if isinstance(result, BaseException):
                raise result
        self.metrics.images.labels("accepted").inc(count)
        return [result for result in results if isinstance(result, PreparedImage)]  # all of them, by now

    async def infer(self, prepared: Iterable[PreparedImage], outputs: Iterable[str]) -> list[dict[str, np.ndarray]]:
        """Model outputs of prepared images through the dynamic batcher."""
        return await self.batcher.infer([p.tensor for p in prepared], outputs)

    async def embed(self, prepared: Sequence[PreparedImage]) -> np.ndarray:
        """L2-normalised embeddings [n, D] of prepared images."""
        results = await self.infer(prepared, ["embedding"])
        return l2_normalize(np.stack([r["embedding"] for r in results]))

    def thumbnail(self, crop: Image.Image) -> bytes:
        """The stored gallery image: the model's crop (at ``thumbnail_size`` if set) as JPEG."""
        return make_thumbnail(crop, self.settings.thumbnail_size, self.settings.thumbnail_quality)

    async def start(self) -> None:
        await self.batcher.start()
        self.gallery_health()
        self._watchdog = asyncio.create_task(self._watch_gallery()) if self.gallery.needs_watchdog else None
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        await self.batcher.stop()
        self.pool.shutdown(wait=True)
        self.gallery_pool.shutdown(wait=True)
        self.gallery.close()


def load_state(settings: ServiceSettings, metrics: ServiceMetrics, model_dir: Path | None = None) -> ServiceState:
    """Load and warm up the model and open the gallery (blocking; run it in a thread)."""
    return_large_blocks_to_the_system()
    model = OnnxModel.from_settings(settings, model_dir)
    model.warm_up(settings.warmup_batches)
    gallery = open_gallery(settings, model)
    if settings.gallery == "faiss" and settings.index_dir is None:
        log.warning("no index folder given (--index / DINO_INDEX_DIR): the gallery is kept in memory and lost at exit")
    if settings.gallery == "milvus" and settings.index_dir is not None:
        log.warning("DINO_INDEX_DIR is not used: the gallery is in Milvus (DINO_GALLERY=milvus)")
    metrics.model_info.labels(model.name, model.sha256, model.provider, model.file, model.precision).set(1)
    batcher = DynamicBatcher(
        model,
        max_batch_size=settings.max_batch_size or default_batch_cap(model.provider),
        max_wait_ms=settings.max_batch_wait_ms,
        max_queue_size=settings.max_queue_size,
        metrics=metrics,
    )
    return ServiceState(
        settings=settings,
        model=model,
        preprocessor=Preprocessor.for_model(model.spec, settings.max_image_pixels, settings.max_jpeg_scans),
        batcher=batcher,
        gallery=gallery,
        metrics=metrics,
        pool=ThreadPoolExecutor(max_workers=settings.preprocess_threads, thread_name_prefix="dino-preprocess"),
        gallery_pool=ThreadPoolExecutor(max_workers=settings.gallery_threads, thread_name_prefix="dino-gallery"),
    )

"""Dynamic batching: images from concurrent requests share one onnxruntime call.

Each image is queued with a future. A collector task on the event loop takes the first waiting
image, then keeps collecting until ``max_batch_size`` images are gathered or ``max_wait`` has passed
since the first one, and hands the batch to a single inference thread. The event loop never runs
inference: it only awaits the thread. While a batch runs, new images queue up and form the next
batch, so under load batches fill up without waiting at all.

Only the outputs some image in the batch asked for are fetched from onnxruntime (copying
``patch_tokens`` off the GPU for every batch would waste bandwidth).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.metrics import ServiceMetrics
from service.runtime import OnnxModel

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """Too many images are waiting for inference: the client should retry later (HTTP 503)."""


class BatcherStoppedError(Exception):
    """The batcher is not running (startup not finished or shutting down): HTTP 503."""


@dataclass
class _Job:
    tensor: np.ndarray
    outputs: frozenset[str]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """Groups single-image inference requests into batched ``OnnxModel.run`` calls.

    Use ``await start()`` once on the event loop, ``await infer(tensors, outputs)`` from request
    handlers and ``await stop()`` at shutdown.
    """

    def __init__(
        self,
        model: OnnxModel,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue_size: int,
        metrics: ServiceMetrics | None = None,
    ):
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.metrics = metrics
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        # one thread: onnxruntime already parallelises inside a call; two concurrent calls would compete
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dino-inference")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the collector task on the running event loop."""
        if self.running:
            return
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._collect_forever(), name="dino-batcher")

    async def stop(self) -> None:
        """Stop collecting; images still queued fail with :class:`BatcherStoppedError`."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._queue is not None:
            while not self._queue.empty():
                job = self._queue.get_nowait()
                if not job.future.done():
                    job.future.set_exception(BatcherStoppedError("the server is shutting down"))
        self._executor.shutdown(wait=True)

    async def infer(self, tensors: Iterable[np.ndarray], outputs: Iterable[str]) -> list[dict[str, np.ndarray]]:
        """Run each [3, H, W] tensor through the model; one dict of outputs per tensor, in order."""
        if not self.running or self._queue is None:
            raise BatcherStoppedError("the model is not ready")
        tensors = list(tensors)
        wanted = frozenset(outputs)
        if self._queue.qsize() + len(tensors) > self.max_queue_size:
            raise QueueFullError(f"inference queue full ({self.max_queue_size} images waiting); retry later")
        loop = asyncio.get_running_loop()
        jobs = [_Job(tensor, wanted, loop.create_future()) for tensor in tensors]
        for job in jobs:
            self._queue.put_nowait(job)
        if self.metrics:
            self.metrics.queue_depth.set(self._queue.qsize())
        return list(await asyncio.gather(*(job.future for job in jobs)))

    async def _collect_forever(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch_size:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            # a client that went away cancelled its future: do not spend inference on it
            batch = [job for job in batch if not job.future.done()]
            if self.metrics:
                self.metrics.queue_depth.set(self._queue.qsize())
            if batch:
                await self._run_batch(batch)

    def _run_model(self, tensors: list[np.ndarray], outputs: frozenset[str]) -> dict[str, np.ndarray]:
        """In the inference thread: stack (a copy of tens of MB for big batches, so not on the loop) and run."""
        return self.model.run(np.stack(tensors), outputs)

    async def _run_batch(self, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        outputs = frozenset().union(*(job.outputs for job in batch))
        tensors = [job.tensor for job in batch]
        try:
            results = await loop.run_in_executor(self._executor, self._run_model, tensors, outputs)
        except Exception as exc:  # an onnxruntime failure fails the batch's requests (HTTP 500), not the batcher
            log.exception("inference failed for a batch of %d images", len(batch))
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        seconds = time.perf_counter() - started
        if self.metrics:
            self.metrics.batch_size.observe(len(batch))
            self.metrics.inference_seconds.observe(seconds)
            for job in batch:
                self.metrics.queue_wait_seconds.observe(started - job.enqueued)
        for i, job in enumerate(batch):
            if not job.future.done():
                job.future.set_result(
                    {name: job_output[i] for name, job_output in results.items() if name in job.outputs}
                )

"""Micro-batching: concurrent requests' images share one forward pass, off the event loop."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imgsearch.encoders import Encoder


def warm_up(encoder: Encoder, max_batch: int) -> None:
    """One full batch of a blank image before the service answers. onnxruntime's CPU arena grows to the largest batch
    it has run and keeps that (int8 Lite0: 73 MiB of anonymous memory after batches of up to 8, 152 MiB after 32), so
    without this the service's memory steps up whenever a larger batch than any before first comes, at any hour."""
    from PIL import Image

    blank = encoder.preprocess(Image.new("RGB", (encoder.input_size,) * 2))
    encoder.encode(encoder.stack([blank] * max_batch))


@dataclass
class _Request:
    images: list[Any]  # preprocessed: the encoder's input, not decoded images
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class MicroBatcher:
    """Collects preprocessed images from concurrent callers for at most `max_wait` seconds or `max_batch` images,
    encodes them on a worker thread in passes of at most `max_batch`, and hands each caller its rows.
    `observe(batch_size, seconds)` is told about every forward pass (the metrics), from that thread."""

    def __init__(self, encoder: Encoder, *, max_batch: int = 32, max_wait: float = 0.005, observe=None) -> None:
        self.encoder = encoder
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.observe = observe
        self.queue: asyncio.Queue[_Request] = asyncio.Queue()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name="imgsearch-micro-batcher")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def encode(self, images: list[Any]) -> np.ndarray:
        request = _Request(images)
        await self.queue.put(request)
        return await request.future

    async def _run(self) -> None:
        while True:
            pending = [await self.queue.get()]
            size = len(pending[0].images)
            while size < self.max_batch and not self.queue.empty():  # requests that queued during the last pass
                request = self.queue.get_nowait()
                pending.append(request)
                size += len(request.images)
            deadline = time.monotonic() + self.max_wait
            while size < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    request = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
                pending.append(request)
                size += len(request.images)
            await self._encode(pending)

    def _encode_in_passes(self, images: list[Any]) -> np.ndarray:
        """Forward passes of at most max_batch images (a request of many images can carry a batch past it): the
        runtime's buffers grow to the largest batch they see and keep that size, which warm_up reaches at start."""
        vectors = []
        for start in range(0, len(images), self.max_batch):
            passed = images[start : start + self.max_batch]
            started = time.perf_counter()
            vectors.append(self.encoder.encode(self.encoder.stack(passed)))
            if self.observe:  # per pass: the metric is images per forward pass
                self.observe(len(passed), time.perf_counter() - started)
        return np.concatenate(vectors)

    async def _encode(self, pending: list[_Request]) -> None:
        images = [image for request in pending for image in request.images]
        try:
            vectors = await asyncio.to_thread(self._encode_in_passes, images)
        except Exception as error:  # every waiting caller gets the failure, the batcher keeps running
            for request in pending:
                if not request.future.done():
                    request.future.set_exception(error)
            return
        offset = 0
        for request in pending:
            count = len(request.images)
            if not request.future.done():
                request.future.set_result(vectors[offset : offset + count])
            offset += count

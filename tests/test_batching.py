"""The service's micro-batcher: with no wait, a lone request goes at once, and requests that queue while a forward
pass runs share the next one. The encoder is a stand-in whose forward pass takes a known time; the batching
around it is what is tested."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from imgsearch.api.batching import MicroBatcher
from imgsearch.encoders.base import Encoder


class SlowEncoder(Encoder):
    name, dim, input_size, preprocess_version = "slow", 2, 8, "test"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.batches: list[int] = []

    def preprocess(self, image):  # never called: the batcher is given preprocessed arrays
        raise AssertionError

    def encode(self, batch):
        self.batches.append(len(batch))
        time.sleep(self.seconds)
        return np.tile(np.array([[1.0, 0.0]], dtype=np.float32), (len(batch), 1))


def test_requests_queued_during_a_pass_share_the_next_without_waiting():
    async def scenario() -> tuple[list[int], float]:
        encoder = SlowEncoder(0.3)
        batcher = MicroBatcher(encoder, max_batch=32, max_wait=0.0)
        batcher.start()
        image = np.zeros((3, 8, 8), dtype=np.float32)
        started = time.perf_counter()
        first = asyncio.create_task(batcher.encode([image]))
        await asyncio.sleep(0.1)  # the first pass is running
        rest = [asyncio.create_task(batcher.encode([image, image])) for _ in range(5)]
        vectors = await asyncio.gather(first, *rest)
        await batcher.stop()
        assert [len(v) for v in vectors] == [1, 2, 2, 2, 2, 2]
        return encoder.batches, time.perf_counter() - started

    batches, seconds = asyncio.run(scenario())
    assert batches == [1, 10]  # the lone request went at once; the five that queued behind it went together
    assert seconds < 0.9  # two passes of 0.3 s, not six

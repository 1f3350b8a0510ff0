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


class CountingEncoder(SlowEncoder):
    def encode(self, batch):  # each image's vector holds its first value: the order is checkable
        self.batches.append(len(batch))
        return np.stack([[float(image.flat[0]), 0.0] for image in batch]).astype(np.float32)


def test_no_forward_pass_is_larger_than_max_batch_and_warm_up_runs_one_full_pass():
    from imgsearch.api.batching import warm_up

    async def scenario():
        encoder = CountingEncoder(0.0)
        observed = []
        batcher = MicroBatcher(encoder, max_batch=4, max_wait=0.05, observe=lambda size, seconds: observed.append(size))
        batcher.start()
        images = [np.full((3, 8, 8), i, dtype=np.float32) for i in range(13)]
        many, few = await asyncio.gather(batcher.encode(images[:10]), batcher.encode(images[10:]))
        await batcher.stop()
        return encoder.batches, observed, many, few

    batches, observed, many, few = asyncio.run(scenario())
    assert max(batches) <= 4 and sum(batches) == 13, batches  # a request of 10 images does not make a pass of 10+
    assert observed == batches  # the metric counts forward passes as they ran
    assert [v[0] for v in many] == list(range(10)) and [v[0] for v in few] == [10, 11, 12]  # each caller its own, in order

    class Blank(CountingEncoder):
        def preprocess(self, image):
            return np.zeros((3, 8, 8), dtype=np.float32)

    encoder = Blank(0.0)
    warm_up(encoder, 32)
    assert encoder.batches == [32]


def test_duplicates_requests_that_come_during_a_scan_share_the_next_one():
    """SharedScans (api/service.py): five requests arriving while a scan runs cost one more scan, not five, and get a
    scan that started after they came; other parameters get their own; a request that goes away cancels no one's."""
    from imgsearch.api.service import SharedScans

    async def scenario():
        scans = SharedScans()
        started: list[str] = []

        def scan(name: str):
            def run() -> str:
                started.append(name)
                time.sleep(0.3)
                return f"{name} #{len(started)}"
            return run

        first = asyncio.create_task(scans.run("a", scan("a")))
        await asyncio.sleep(0.1)  # the first scan is running
        queued = [asyncio.create_task(scans.run("a", scan("a"))) for _ in range(5)]
        leaving = asyncio.create_task(scans.run("a", scan("a")))
        other = asyncio.create_task(scans.run("b", scan("b")))
        await asyncio.sleep(0.05)
        leaving.cancel()
        answers = await asyncio.gather(first, *queued, other)
        await scans.finish()
        return started, answers

    started, answers = asyncio.run(scenario())
    assert sorted(started) == ["a", "a", "b"], started
    assert answers[0] == "a #1"
    assert len(set(answers[1:6])) == 1 and answers[1] != "a #1", answers  # the five share one later scan
    assert answers[6].startswith("b"), answers


def test_writes_and_scans_still_queued_when_the_service_stops_are_refused_503():
    """After SIGTERM (Service.stopping) the write holding the lock and the scan running finish; the writes and scans
    queued behind them are answered 503 with Retry-After at once, so the graceful stop waits for work, not a queue."""
    from fastapi import HTTPException

    from imgsearch.api.service import Service, SharedScans

    async def scenario():
        service = Service.__new__(Service)  # the lock logic only: no encoder, no store
        service.write_lock, service.stopping = asyncio.Lock(), False
        scans = SharedScans(lambda: service.stopping)
        release = asyncio.Event()

        async def write(hold: bool) -> str:
            async with service.writing(references=False):
                if hold:
                    await release.wait()
                return "written"

        def scan() -> str:
            time.sleep(0.3)
            return "scanned"

        running = [asyncio.create_task(write(True)), asyncio.create_task(scans.run("a", scan))]
        await asyncio.sleep(0.1)
        queued = [asyncio.create_task(write(False)) for _ in range(3)] + [asyncio.create_task(scans.run("a", scan))]
        await asyncio.sleep(0.05)
        service.stopping = True
        release.set()
        return await asyncio.gather(*running), await asyncio.gather(*queued, return_exceptions=True)

    finished, refused = asyncio.run(scenario())
    assert finished == ["written", "scanned"]
    assert all(isinstance(error, HTTPException) and error.status_code == 503 and error.headers["Retry-After"] for error in refused), refused

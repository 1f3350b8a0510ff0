"""What the service loads once (encoder, store, batcher, limits) and how it reads uploaded images."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request, UploadFile
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from imgsearch.api.batching import MicroBatcher, warm_up
from imgsearch.api.files import ServedFiles
from imgsearch.api.limits import PixelBudget, release_free_memory
from imgsearch.config import Settings, is_lite_uri
from imgsearch.errors import EmbeddingMovedError, ImageDecodeError, StoreUnavailableError
from imgsearch.images import load_image, read_header

log = logging.getLogger(__name__)

HEALTH_CACHE_SECONDS = 1.0
# How long a service may go on searching after `reindex` moved its alias to another embedding before it notices.
EMBEDDING_CHECK_SECONDS = 5.0


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("imgsearch_requests_total", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("imgsearch_request_seconds", "Request latency", ["endpoint"], registry=self.registry)
        # set_function'd by create_app to the requests its middleware counts (the scrape reading it included)
        self.in_flight = Gauge("imgsearch_requests_in_flight", "HTTP requests being handled, this one included", registry=self.registry)
        self.heap = Gauge("imgsearch_heap_bytes", "glibc's malloc heap: live allocations (in_use), and freed memory it keeps (free)",
                          ["state"], registry=self.registry)
        self.encode = Histogram("imgsearch_encode_seconds", "Time of one batched forward pass", registry=self.registry)
        self.batch = Histogram(
            "imgsearch_batch_size", "Images per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry
        )

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch.observe(size)
        self.encode.observe(seconds)


@dataclass
class Upload:
    name: str  # as the client sent it: shown back, never used as a path
    data: bytes
    image_format: str
    tensor: Any  # the encoder's input; the decoded image is freed as soon as this exists


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning('recomputing the "unknown" threshold failed: %s (the previous one stays)', task.exception())


RETRY_SECONDS = 2.0  # how often background work that found Milvus down or restarting tries again


async def when_milvus_answers(call, what: str, give_up=lambda: False):
    """`call()` on a worker thread, repeated every RETRY_SECONDS while Milvus is down or restarting (one warning when
    it starts waiting, one when it is done), unless `give_up()` (then the error propagates)."""
    waiting = False
    while True:
        try:
            result = await asyncio.to_thread(call)
        except StoreUnavailableError as error:
            if give_up():
                raise
            if not waiting:
                log.warning("%s waits for Milvus (%s); retrying every %.0f s", what, error, RETRY_SECONDS)
            waiting = True
            await asyncio.sleep(RETRY_SECONDS)
            continue
        if waiting:
            log.warning("%s: done once Milvus answered again", what)
        return result


class Recalibration:
    """The self-calibrated "unknown" threshold (imgsearch/recognition/abstention.py), recomputed off the request path after the
    service changes references: at 100k references it takes about a minute. One run at a time; requests that come
    while one runs are served by one more run after it, which all of them await. A run that fails because Milvus is
    down or restarting is repeated (every RETRY_SECONDS) until Milvus answers or the service stops: references an
    enrolment stored just before an outage never keep a stale threshold."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.task: asyncio.Task | None = None
        self.again = False
        self.stopping = False

    async def request(self, wait_seconds: float) -> tuple[dict[str, Any] | None, bool]:
        """(the new calibration, or None; whether it is still running after `wait_seconds`, and will be in effect
        when it ends)."""
        self.request_in_background()
        try:
            return await asyncio.wait_for(asyncio.shield(self.task), wait_seconds), False
        except TimeoutError:
            return None, True

    def request_in_background(self) -> None:
        """Recalibrate without waiting (a deletion answers at once)."""
        if self.task is not None and not self.task.done():
            self.again = True
        else:
            self.task = asyncio.create_task(self._run())
            self.task.add_done_callback(_log_failure)

    async def _run(self) -> dict[str, Any] | None:
        from dataclasses import asdict

        from imgsearch.recognition.abstention import self_calibrate

        while True:
            self.again = False
            calibration = await when_milvus_answers(
                lambda: self_calibrate(self.store), 'recomputing the "unknown" threshold', lambda: self.stopping
            )
            if not self.again:
                return asdict(calibration) if calibration else None

    async def finish(self) -> None:
        """Wait for a run in progress (its threshold is written before the store closes); one waiting for Milvus
        makes its next try its last."""
        self.stopping = True
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)


def refuse_when_stopping(stopping: bool) -> None:
    """Work that has not started when serve got SIGTERM is refused, so that the stop waits only for work running:
    under load, writes and scans queue (the soak's for 10-40 s) and would hold the stop past its limit."""
    if stopping:
        raise HTTPException(503, "the service is stopping; send the request again", headers={"Retry-After": "5"})


class SharedScans:
    """Whole-collection scans (duplicates), one at a time, its memory one scan's. Requests that come while a scan
    runs share the next one with the same parameters, which starts after all of them arrived, instead of queueing one
    scan each: under the soak's 16 users they had queued for 100 s, and held the service's graceful stop as long."""

    def __init__(self, stopping=lambda: False) -> None:
        self.lock = asyncio.Lock()
        self.waiting: dict[Any, asyncio.Task] = {}  # per parameters: the scan that starts when the running one ends
        self.running: asyncio.Task | None = None
        self.stopping = stopping  # then scans not started yet are refused (503)

    async def run(self, key: Any, scan):
        """`scan()` on a worker thread, or the result of one that starts after this call."""
        task = self.waiting.get(key)
        if task is None:
            task = self.waiting[key] = asyncio.create_task(self._when_free(key, scan))
            task.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved, even with no one left
        return await asyncio.shield(task)  # a request that goes away does not cancel the others' scan

    async def _when_free(self, key: Any, scan):
        async with self.lock:
            del self.waiting[key]  # from now on requests wait for a scan that starts after them
            refuse_when_stopping(self.stopping())
            self.running = asyncio.current_task()
            try:
                return await asyncio.to_thread(scan)
            finally:  # a scan holds tens of MB (vectors, pixel signatures) that glibc would otherwise keep
                await asyncio.to_thread(release_free_memory)

    async def finish(self) -> None:
        """Scans not started are dropped; the running one ends before the store closes."""
        for task in list(self.waiting.values()):
            task.cancel()
        await asyncio.gather(*self.waiting.values(), *([self.running] if self.running else []), return_exceptions=True)


class Service:
    """Settings, encoder and store, loaded once; the batcher, write lock and decode budget start with the loop."""

    def __init__(self, settings: Settings) -> None:
        from imgsearch.recognition.review import OpenedReview
        from imgsearch.session import open_session

        self.settings = settings
        self.encoder, self.store = open_session(settings)
        warm_up(self.encoder, settings.batch_size)  # memory at its plateau from the start (batching.py)
        self.files = ServedFiles(self.store, settings.upload_dir, settings.answer_paths)
        self.batcher: MicroBatcher | None = None
        self.write_lock: asyncio.Lock | None = None  # uploads, enrolments and deletions are written one at a time
        self.scans: SharedScans | None = None
        self.budget: PixelBudget | None = None
        self.recalibration: Recalibration | None = None
        self._review = OpenedReview(self.store)  # the review collection, opened on first use
        self._health_checked = -HEALTH_CACHE_SECONDS
        self._health_error: StoreUnavailableError | None = None
        self._embedding_checked = -EMBEDDING_CHECK_SECONDS
        self._embedding_error: EmbeddingMovedError | None = None
        self._startup_check: asyncio.Task | None = None
        self.stopping = False  # set when serve gets SIGTERM (app.py): queued writes and scans are refused

    def start(self, metrics: Metrics) -> None:
        settings = self.settings
        self.batcher = MicroBatcher(
            self.encoder, max_batch=settings.batch_size, max_wait=settings.batch_wait_ms / 1000, observe=metrics.observe_batch
        )
        self.write_lock = asyncio.Lock()
        self.scans = SharedScans(lambda: self.stopping)
        self.budget = PixelBudget(settings.decode_pixel_budget, settings.decode_wait_seconds)
        self.recalibration = Recalibration(self.store)
        self.batcher.start()
        self._startup_check = asyncio.get_running_loop().create_task(self._recalibrate_if_stale())

    async def _recalibrate_if_stale(self) -> None:
        """An earlier process (this service killed, a CLI run stopped) may have changed references and not lived to
        recompute "unknown": do it now, in the background."""
        from imgsearch.recognition.abstention import calibration_is_stale

        # a service started before Milvus checks once Milvus answers
        if await when_milvus_answers(lambda: calibration_is_stale(self.store), 'checking the "unknown" threshold'):
            log.warning('references changed after the "unknown" threshold was last computed: recomputing it')
            self.recalibration.request_in_background()

    @contextlib.asynccontextmanager
    async def writing(self, *, references: bool = True):
        """The write lock: uploads, enrolments and deletions are written one at a time, and one still waiting for it
        when the service is stopping is refused (503). `references`: the write may change references; one cut by a
        Milvus outage may have stored some before it failed, so the threshold is recomputed once Milvus answers
        (Recalibration)."""
        async with self.write_lock:
            refuse_when_stopping(self.stopping)
            try:
                yield
            except StoreUnavailableError:
                if references:
                    self.recalibration.request_in_background()
                raise

    async def recalibrate(self) -> tuple[dict[str, Any] | None, bool]:
        """Recompute the "unknown" threshold after references changed; waits settings.calibration_wait_seconds."""
        return await self.recalibration.request(self.settings.calibration_wait_seconds)

    async def check_store(self) -> None:
        """StoreUnavailableError (503) unless Milvus can serve the collection; the answer is reused for
        HEALTH_CACHE_SECONDS, so a load balancer polling /health costs Milvus one call a second at most."""
        now = time.monotonic()
        if now - self._health_checked >= HEALTH_CACHE_SECONDS:
            self._health_checked = now
            try:
                await asyncio.to_thread(self.store.check_serving)
                self._health_error = None
            except StoreUnavailableError as error:
                self._health_error = error
        if self._health_error is not None:
            raise self._health_error

    async def check_embedding(self) -> None:
        """EmbeddingMovedError (503) once the alias this service searches names a collection of another embedding:
        its encoder would compare its queries with vectors of another model, or be refused by Milvus for their width.
        Asked at most every EMBEDDING_CHECK_SECONDS; a Lite file has no aliases."""
        if is_lite_uri(self.store.uri):
            return
        now = time.monotonic()
        if now - self._embedding_checked >= EMBEDDING_CHECK_SECONDS:
            self._embedding_checked = now
            try:
                await asyncio.to_thread(self.store.check_embedding_unchanged)
                self._embedding_error = None
            except EmbeddingMovedError as error:
                self._embedding_error = error
        if self._embedding_error is not None:
            raise self._embedding_error

    def review(self, *, create: bool = True):
        """The review collection (recognition/review.py), opened once it exists."""
        return self._review.get(create=create)

    async def stop(self) -> None:
        if self._startup_check is not None:
            self._startup_check.cancel()
            await asyncio.gather(self._startup_check, return_exceptions=True)
        await self.recalibration.finish()  # its threshold is written before the store closes
        await self.scans.finish()
        await self.batcher.stop()
        self._review.close()
        self.store.close()

    async def read_images(self, uploads: list[UploadFile]) -> list[Upload]:
        """Read, check and preprocess the uploads, one image at a time under the shared pixel budget: the decoded
        image exists only while it is turned into the encoder's input, so memory is bounded by the budget, not by
        how many large images arrive at once."""
        settings = self.settings
        if not uploads:
            raise HTTPException(422, "send at least one image")
        if len(uploads) > settings.max_images_per_request:
            raise HTTPException(413, f"{len(uploads)} images in one request; the limit is {settings.max_images_per_request}")
        prepared = []
        for upload in uploads:
            name = upload.filename or "upload"
            data = await upload.read(settings.max_upload_bytes + 1)
            if len(data) > settings.max_upload_bytes:
                raise HTTPException(413, f"{name} is larger than {settings.max_upload_bytes} bytes")
            try:
                pixels, image_format = await asyncio.to_thread(read_header, data, max_pixels=settings.max_image_pixels, name=name)
                async with self.budget.hold(pixels):
                    tensor = await asyncio.to_thread(self._preprocess, data, name)
            except ImageDecodeError as error:
                raise HTTPException(422, f"{name}: {error.reason}") from None
            prepared.append(Upload(name, data, image_format, tensor))
        return prepared

    def _preprocess(self, data: bytes, name: str):
        image = load_image(data, max_pixels=self.settings.max_image_pixels, min_side=self.encoder.input_size, name=name)
        return self.encoder.preprocess(image)


def service_of(request: Request) -> Service:
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise HTTPException(503, "the service is still loading")
    return service


async def service_of_its_embedding(request: Request) -> Service:
    """service_of for the routes that encode or compare vectors: 503 once the alias moved to another embedding."""
    service = service_of(request)
    await service.check_embedding()
    return service

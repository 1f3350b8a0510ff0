"""Write encoded rows to Milvus on a background thread, with a bound on how many images are in flight."""

from __future__ import annotations

import logging
import queue
import threading
import time

from imgsearch.errors import StoreError
from imgsearch.store import ImageRecord, MilvusStore

log = logging.getLogger(__name__)

WRITE_QUEUE_CHUNKS = 2


class Writer:
    """Upserts chunks on a background thread behind a bounded queue, so Milvus writes overlap encoding
    and a slow store applies back-pressure instead of letting rows pile up in memory."""

    def __init__(self, store: MilvusStore, in_flight: InFlight, max_queued_chunks: int = WRITE_QUEUE_CHUNKS) -> None:
        self.store = store
        self.in_flight = in_flight
        self.queue: queue.Queue[list[ImageRecord] | None] = queue.Queue(maxsize=max_queued_chunks)
        self.seconds = 0.0
        self.written = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="imgsearch-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (records := self.queue.get()) is not None:
            if self.error is None:
                started = time.perf_counter()
                try:
                    self.store.upsert(records)
                    self.written += len(records)
                    log.info("upserted %d rows (%d in this run)", len(records), self.written)
                except BaseException as error:  # handed to the main thread in put()/close()
                    self.error = error
                self.seconds += time.perf_counter() - started
            self.in_flight.remove(len(records))

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise StoreError(f"writing to Milvus failed: {self.error}") from self.error

    def put(self, records: list[ImageRecord]) -> None:
        self._raise_if_failed()
        if records:
            self.queue.put(records)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise_if_failed()


class InFlight:
    """Counts images decoded but not yet written; its maximum shows memory is bounded."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.current = 0
        self.peak = 0

    def add(self, count: int) -> None:
        with self.lock:
            self.current += count
            self.peak = max(self.peak, self.current)

    def remove(self, count: int) -> None:
        with self.lock:
            self.current -= count

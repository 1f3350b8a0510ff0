"""Write encoded rows to Milvus behind a bounded queue: from a child process with its own client, or from a thread.

Why a process (IMGSEARCH_WRITER=process; `auto` is a thread, which measured as fast on a CPU and an H200, docs/gpu.md):
building an upsert (each vector becomes a Python list, then protobuf) and, on Milvus Lite, the
engine's work hold the GIL for milliseconds at a time; in the encoding process that starves the thread driving the
GPU (docs/gpu.md). The child gets chunks through a pipe, upserts them and acknowledges each; the parent logs
"upserted" on the acknowledgement, counts the rows in flight, and reads through its own client afterwards.
Crash safety is unchanged: an upsert is idempotent and keyed by content, so a chunk written, or not, by a writer
whose parent died is simply skipped or encoded by the rerun.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
import time

from imgsearch.config import WriterPlace
from imgsearch.errors import ImgsearchError, StoreError
from imgsearch.store import ImageRecord, MilvusStore, connect, upsert_rows
from imgsearch.store.retry import retry_window

log = logging.getLogger(__name__)

WRITE_QUEUE_CHUNKS = 2
PARENT_POLL_SECONDS = 1.0  # how often an idle writer process checks that its parent is alive


def start_writer(store: MilvusStore, in_flight: InFlight, kind: WriterPlace = "auto") -> Writer | WriterProcess:
    """`process` where another process can reach the collection (a server URI, or the loopback gRPC server pymilvus
    runs for a Lite file in this process), else a thread. `auto` is a thread: the process was no faster on a CPU
    (docs/benchmarks.md) nor on an H200, into a Lite file or a server, and costs its own client's memory
    (docs/gpu.md)."""
    uri = store.writer_uri() if kind == "process" else None
    if uri is None:
        if kind == "process":
            log.warning("no address another process can write to %s through: writing from a thread", store.uri)
        return Writer(store, in_flight)
    return WriterProcess(store, uri, in_flight)


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
        if isinstance(self.error, ImgsearchError):  # already says what failed
            raise self.error
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


class WriterProcess:
    """The same contract as Writer, with the upserts in a spawned child process (a fresh interpreter: no forked
    gRPC state) that opens its own Milvus client on `uri`. At most `max_queued_chunks` chunks are unacknowledged;
    they are kept until acknowledged, so if the child dies (or cannot start, as in a script without a
    `__main__` guard) they are rewritten, idempotently, by a writer thread that takes over."""

    def __init__(self, store: MilvusStore, uri: str, in_flight: InFlight, max_queued_chunks: int = WRITE_QUEUE_CHUNKS) -> None:
        self.store = store
        self.in_flight = in_flight
        self.max_queued_chunks = max_queued_chunks
        self.seconds = 0.0  # time spent upserting (in the child, alongside encoding)
        self.written = 0
        self.error: str | None = None
        self.unacknowledged: list[list[ImageRecord]] = []  # oldest first
        self.fallback: Writer | None = None
        context = multiprocessing.get_context("spawn")
        self.connection, child_end = context.Pipe()
        self.process = context.Process(
            target=write_from_pipe, args=(child_end, uri, store.token, store.collection, os.getpid(), retry_window()),
            name="imgsearch-writer",
            daemon=True,
        )
        self.process.start()
        child_end.close()

    def put(self, records: list[ImageRecord]) -> None:
        self._raise_if_failed()
        if not records:
            return
        while self.fallback is None and len(self.unacknowledged) >= self.max_queued_chunks:
            self._receive(block=True)
        self._raise_if_failed()
        if self.fallback is not None:
            self.fallback.put(records)
            return
        try:
            self.connection.send(records)
        except OSError:  # the child is gone: _take_over below writes this chunk with the others
            pass
        self.unacknowledged.append(records)
        while self.fallback is None and self.connection.poll():
            self._receive(block=False)
        if not self.process.is_alive() and self.fallback is None:
            self._take_over()

    def close(self) -> None:
        try:
            if self.fallback is None and self.process.is_alive():
                try:
                    self.connection.send(None)
                except OSError:
                    pass
                while self.fallback is None and self._receive(block=True):
                    pass
            if self.fallback is None and self.unacknowledged:
                self._take_over()
        finally:
            self.process.join(timeout=30)
            if self.process.is_alive():
                self.process.kill()
            self.connection.close()
        if self.fallback is not None:
            self.fallback.close()
            self.written += self.fallback.written
            self.seconds += self.fallback.seconds
        self._raise_if_failed()

    def _receive(self, *, block: bool) -> bool:
        """Take one message from the child; False once it has sent its last (or is gone, and a thread took over)."""
        while block and not self.connection.poll(PARENT_POLL_SECONDS):
            if not self.process.is_alive():
                self._take_over()
                return False
        try:
            message = self.connection.recv()
        except (EOFError, OSError):
            self._take_over()
            return False
        if message[0] == "closed":
            return False
        rows, seconds = len(self.unacknowledged.pop(0)), message[2]
        self.seconds += seconds
        if message[0] == "written":
            self.written += rows
            log.info("upserted %d rows (%d in this run)", rows, self.written)
        elif self.error is None:
            self.error = message[1]
        self.in_flight.remove(rows)
        return True

    def _take_over(self) -> None:
        """The child died: a writer thread rewrites what it had not acknowledged and writes the rest."""
        self.process.join(timeout=5)
        log.warning("the writer process ended (exit code %s); writing from this process instead", self.process.exitcode)
        self.fallback = Writer(self.store, self.in_flight)
        pending, self.unacknowledged = self.unacknowledged, []
        for records in pending:
            self.fallback.put(records)

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise StoreError(self.error)


def write_from_pipe(connection, uri: str, token: str, collection: str, parent: int, retry_seconds: float = 0.0) -> None:
    """The writer process: upsert each chunk received, answer ("written" | "failed", detail, seconds); stop at None,
    when the pipe closes, or when the parent is gone (SIGKILLed: nobody would read the answers). A Milvus restart
    is waited out for `retry_seconds`, as in the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides and closes
    client = connect(uri, token, retry_window=retry_seconds)
    failed: str | None = None
    try:
        while True:
            if not connection.poll(PARENT_POLL_SECONDS):
                if os.getppid() != parent:
                    return
                continue
            records = connection.recv()
            if records is None:
                connection.send(("closed", None, 0.0))
                return
            started = time.perf_counter()
            if failed is None:  # after a failure, acknowledge without writing: the parent raises at its next call
                try:
                    upsert_rows(client, collection, records)
                except Exception as error:
                    failed = str(error) if isinstance(error, ImgsearchError) else f"writing to Milvus failed: {error}"
            connection.send(("failed" if failed else "written", failed, time.perf_counter() - started))
    except (EOFError, OSError, BrokenPipeError):
        return
    finally:
        client.close()


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

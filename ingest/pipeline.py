"""Ingest a catalog into Milvus: plan (hash + diff), then decode in workers, encode in batches, upsert in chunks.

Why this is safe to interrupt and rerun: ids are SHA-256 hashes of file bytes, so an image
always maps to the same row and an upsert of it is idempotent; a rerun skips what is stored.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imgsearch.encoders import Encoder
from imgsearch.errors import ImageDecodeError, InvalidInputError, StoreError
from imgsearch.images import describe_os_error, load_image
from imgsearch.store import ImageRecord, MilvusStore
from imgsearch.ingest.catalog import CatalogEntry, Shard, absolute, bytes_sha256, catalog_folder, check_catalog, file_sha256, scan_catalog

log = logging.getLogger(__name__)

PREFETCH_BATCHES = 4  # per worker
WRITE_QUEUE_CHUNKS = 2
# Forked workers start at once and share the parent's imported modules; they only read files and run
# PIL/torchvision, never the parent's gRPC or Milvus client. IMGSEARCH_WORKER_START=spawn is the cautious fallback.
WORKER_START_METHOD = os.environ.get("IMGSEARCH_WORKER_START", "fork")
PLAN_CHUNK = 512  # catalog entries hashed and diffed against the store at a time
HASH_THREADS = 4
MAX_AUTO_WORKERS = 8

# progress(stage, done, total): stage is "scan" (total unknown: None) or "encode"
ProgressCallback = Callable[[str, int, int | None], None]


@dataclass
class IngestReport:
    indexed: int = 0  # newly encoded and stored
    skipped: int = 0  # already stored with the same path, label and metadata
    updated: int = 0  # already stored; path, label or metadata changed (renames): not re-encoded
    pruned: int = 0
    other_shards: int = 0  # with --shard: images left to the other shards
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    # Stage split. decode_seconds is summed over worker processes (read + hash + decode + preprocess);
    # wait_seconds is how long the encoder sat idle waiting for decoded batches.
    decode_seconds: float = 0.0
    wait_seconds: float = 0.0
    encode_seconds: float = 0.0
    insert_seconds: float = 0.0
    workers: int = 0
    max_in_flight: int = 0
    in_flight_bound: int = 0

    @property
    def images_per_second(self) -> float:
        return self.indexed / self.seconds if self.seconds > 0 else 0.0

    def summary_line(self) -> str:
        line = f"indexed {self.indexed}, skipped {self.skipped} unchanged, failed {len(self.failed)}"
        extras = []
        if self.updated:
            extras.append(f"updated {self.updated} moved/relabelled")
        if self.pruned:
            extras.append(f"pruned {self.pruned}")
        if self.other_shards:
            extras.append(f"{self.other_shards} left to other shards")
        extras.append(f"{self.seconds:.1f} s, {self.images_per_second:.1f} images/s")
        return f"{line} ({'; '.join(extras)})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "indexed": self.indexed,
            "skipped": self.skipped,
            "updated": self.updated,
            "pruned": self.pruned,
            "other_shards": self.other_shards,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "stages": {
                "decode_seconds": round(self.decode_seconds, 3),
                "wait_seconds": round(self.wait_seconds, 3),
                "encode_seconds": round(self.encode_seconds, 3),
                "insert_seconds": round(self.insert_seconds, 3),
            },
            "workers": self.workers,
            "max_in_flight": self.max_in_flight,
        }


def auto_workers(pending: int, batch_size: int) -> int:
    """Decode in the main process for tiny jobs (spawning workers costs more); else leave one core to encoding."""
    if pending < 2 * batch_size:
        return 0
    return max(1, min(MAX_AUTO_WORKERS, (os.cpu_count() or 2) - 1))


class PlannedImages(IterableDataset):
    """Streams the plan file; each worker decodes every n-th line, so no process holds the catalog."""

    def __init__(self, plan_path: Path, preprocess: Callable, max_pixels: int, min_side: int) -> None:
        self.plan_path = plan_path
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.min_side = min_side

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        with open(self.plan_path, encoding="utf-8") as plan:
            for line in islice(plan, worker_id, None, num_workers):
                item = json.loads(line)
                started = time.perf_counter()
                try:
                    data = Path(item["path"]).read_bytes()
                    item["id"] = bytes_sha256(data)  # the bytes we encode decide the id, even if the file just changed
                    image = load_image(data, max_pixels=self.max_pixels, min_side=self.min_side, name=item["path"])
                    item["tensor"] = self.preprocess(image)
                except ImageDecodeError as error:
                    item["error"] = error.reason
                except OSError as error:
                    item["error"] = describe_os_error(error)
                item["decode_seconds"] = time.perf_counter() - started
                yield item


def collate_planned(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [item for item in items if "tensor" in item]
    return {
        "items": good,
        "batch": torch.stack([item.pop("tensor") for item in good]) if good else None,
        "failed": [{"path": item["path"], "error": item["error"]} for item in items if "error" in item],
        "decode_seconds": sum(item.pop("decode_seconds", 0.0) for item in items),
    }


def ingest_catalog(
    root: Path,
    encoder: Encoder,
    store: MilvusStore,
    *,
    use_labels: bool = True,
    manifest: Path | None = None,
    **options: Any,
) -> IngestReport:
    """Index a catalog folder (labels from sub-folders), one image, or a manifest; the folder (or the one image) is
    recorded with the collection as a root the REST service may serve files from."""
    check_catalog(root, manifest)
    store.add_roots([catalog_folder(root) if manifest is not None else absolute(root)])
    return ingest_entries(scan_catalog(root, use_labels=use_labels, manifest=manifest), encoder, store, **options)


def ingest_entries(
    entries: Iterable[CatalogEntry],
    encoder: Encoder,
    store: MilvusStore,
    *,
    prune: bool = False,
    relabel_duplicates: bool = False,
    shard: Shard | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    max_pixels: int = 64_000_000,
    upsert_chunk: int = 512,
    progress: ProgressCallback | None = None,
) -> IngestReport:
    """Hash, skip what is stored, decode in workers, encode in batches and upsert; enrolment uses it too."""
    started = time.perf_counter()
    report = IngestReport()
    with tempfile.TemporaryDirectory(prefix="imgsearch-plan-") as tmp:
        plan_path = Path(tmp) / "plan.jsonl"
        warm_up = _warm_up_in_background(encoder, batch_size)
        pending = _plan(iter(entries), store, plan_path, report, progress, relabel_duplicates, shard)
        if warm_up is not None:
            warm_up.join()
        if pending:
            preprocess = encoder.transfer_preprocess or encoder.preprocess
            dataset = PlannedImages(plan_path, preprocess, max_pixels, encoder.input_size)
            _encode_and_store(dataset, pending, encoder, store, report, batch_size, workers, upsert_chunk, progress)
    if prune:
        report.pruned = prune_missing(store, shard)
    store.flush()
    report.seconds = time.perf_counter() - started
    return report


def _warm_up_in_background(encoder: Encoder, batch_size: int) -> threading.Thread | None:
    """On CUDA the first forward pass loads kernels and picks algorithms (seconds); do it while hashing."""
    if encoder.device.type != "cuda":
        return None
    size = encoder.input_size
    dtype = torch.uint8 if encoder.transfer_preprocess is not None else torch.float32
    thread = threading.Thread(
        target=encoder.encode, args=(torch.zeros(batch_size, 3, size, size, dtype=dtype),), name="imgsearch-warm-up", daemon=True
    )
    thread.start()
    return thread


def _plan(
    entries: Iterator[CatalogEntry],
    store: MilvusStore,
    plan_path: Path,
    report: IngestReport,
    progress: ProgressCallback | None,
    relabel_duplicates: bool = False,
    shard: Shard | None = None,
) -> int:
    """Hash every entry, settle what is already stored, and write the rest to the plan file.
    `relabel_duplicates` (enrolment): stored content under another label takes the new label."""
    pending = 0
    planned_ids: set[str] = set()
    scanned = 0
    with open(plan_path, "w", encoding="utf-8") as plan, ThreadPoolExecutor(HASH_THREADS) as pool:
        while chunk := list(islice(entries, PLAN_CHUNK)):
            chunk = _valid_entries(chunk, report)
            hashes = list(pool.map(_hash_or_error, [entry.path for entry in chunk]))
            if shard is not None:
                mine = [digest is None or shard.contains(digest) for digest, _ in hashes]
                report.other_shards += mine.count(False)
                chunk = [entry for entry, keep in zip(chunk, mine) if keep]
                hashes = [pair for pair, keep in zip(hashes, mine) if keep]
            known = store.get([digest for digest, _ in hashes if digest], fields=("id", "path", "label", "metadata"))
            moved: list[tuple[CatalogEntry, str]] = []
            for entry, (digest, error) in zip(chunk, hashes):
                if error:
                    report.failed.append({"path": str(entry.path), "error": error})
                elif digest in known:
                    row = known[digest]
                    same = row["path"] == str(entry.path) and row["label"] == entry.label and (
                        row.get("metadata") or {}
                    ) == entry.metadata
                    # A second copy of stored content is not a move while the stored file still exists.
                    relabel = relabel_duplicates and row["label"] != entry.label
                    if same or (not relabel and row["path"] != str(entry.path) and Path(row["path"]).exists()):
                        report.skipped += 1
                    else:
                        moved.append((entry, digest))
                elif digest in planned_ids:
                    report.skipped += 1  # duplicate content within this run
                else:
                    planned_ids.add(digest)
                    plan.write(
                        json.dumps({"id": digest, "path": str(entry.path), "label": entry.label, "metadata": entry.metadata})
                        + "\n"
                    )
                    pending += 1
            report.updated += _update_moved(store, moved)
            scanned += len(chunk)
            if progress:
                progress("scan", scanned, None)
    return pending


def _valid_entries(chunk: list[CatalogEntry], report: IngestReport) -> list[CatalogEntry]:
    """Rows with a bad label, path or metadata are reported as failed before anything is written; the rest go on."""
    valid = []
    for entry in chunk:
        try:
            valid.append(entry.validated())
        except InvalidInputError as error:
            report.failed.append({"path": str(entry.path), "error": str(error)})
    return valid


def _hash_or_error(path: Path) -> tuple[str | None, str | None]:
    try:
        return file_sha256(path), None
    except OSError as error:
        return None, describe_os_error(error)


def _update_moved(store: MilvusStore, moved: list[tuple[CatalogEntry, str]]) -> int:
    """Renamed or relabelled files keep their vector: rewrite the row's fields without re-encoding."""
    if not moved:
        return 0
    vectors = store.get([digest for _, digest in moved], fields=("id", "vector"))
    store.upsert(
        [
            ImageRecord(id=digest, vector=vectors[digest]["vector"], path=str(entry.path), label=entry.label, metadata=entry.metadata)
            for entry, digest in moved
        ]
    )
    return len(moved)


class _Writer:
    """Upserts chunks on a background thread behind a bounded queue, so Milvus writes overlap encoding
    and a slow store applies back-pressure instead of letting rows pile up in memory."""

    def __init__(self, store: MilvusStore, in_flight: "_InFlight", max_queued_chunks: int = WRITE_QUEUE_CHUNKS) -> None:
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


class _InFlight:
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


def in_flight_bound(batch_size: int, workers: int, upsert_chunk: int) -> int:
    """Most images alive at once: prefetched batches, the batch being encoded, the buffer, queued and writing chunks."""
    prefetched = workers * PREFETCH_BATCHES * batch_size
    return prefetched + batch_size + (upsert_chunk + batch_size) * (WRITE_QUEUE_CHUNKS + 2)


def _encode_and_store(
    dataset: PlannedImages,
    pending: int,
    encoder: Encoder,
    store: MilvusStore,
    report: IngestReport,
    batch_size: int,
    workers: int | None,
    upsert_chunk: int,
    progress: ProgressCallback | None,
) -> None:
    num_workers = auto_workers(pending, batch_size) if workers is None else workers
    report.workers = num_workers
    report.in_flight_bound = in_flight_bound(batch_size, num_workers, upsert_chunk)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_planned,
        pin_memory=encoder.pin_memory,
        prefetch_factor=PREFETCH_BATCHES if num_workers else None,
        multiprocessing_context=WORKER_START_METHOD if num_workers else None,
    )
    in_flight = _InFlight()
    writer = _Writer(store, in_flight)
    buffer: list[ImageRecord] = []
    done = 0
    try:
        waited = time.perf_counter()
        for batch in loader:
            report.wait_seconds += time.perf_counter() - waited
            report.failed.extend(batch["failed"])
            report.decode_seconds += batch["decode_seconds"]
            if batch["batch"] is not None:
                in_flight.add(len(batch["items"]))
                encode_started = time.perf_counter()
                vectors = encoder.encode(batch["batch"])
                report.encode_seconds += time.perf_counter() - encode_started
                for item, vector in zip(batch["items"], vectors):
                    buffer.append(
                        ImageRecord(id=item["id"], vector=vector, path=item["path"], label=item["label"], metadata=item["metadata"])
                    )
                report.indexed += len(batch["items"])
            if len(buffer) >= upsert_chunk:
                writer.put(buffer)
                buffer = []
            done += len(batch["items"]) + len(batch["failed"])
            if progress:
                progress("encode", done, pending)
            waited = time.perf_counter()
        writer.put(buffer)
    finally:
        writer.close()
        report.insert_seconds = writer.seconds
        report.max_in_flight = in_flight.peak


def prune_missing(store: MilvusStore, shard: Shard | None = None) -> int:
    """Delete rows whose file no longer exists (only this shard's rows, when sharded)."""
    gone = [
        row["id"]
        for row in store.iter_rows(("id", "path"))
        if (shard is None or shard.contains(row["id"])) and not Path(row["path"]).exists()
    ]
    return store.delete(gone) if gone else 0

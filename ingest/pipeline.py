"""Ingest a catalog into Milvus: plan (plan.py: hash and diff), read (reader.py: decode in workers), encode in
batches here, write (writer.py: upsert chunks on a background thread).

Why this is safe to interrupt and rerun: ids are SHA-256 hashes of file bytes, so an image
always maps to the same row and an upsert of it is idempotent; a rerun skips what is stored.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from imgsearch.encoders import Encoder
from imgsearch.ingest.catalog import CatalogEntry, Shard, absolute, catalog_folder, check_catalog, scan_catalog
from imgsearch.ingest.plan import plan_entries, prune_missing
from imgsearch.ingest.reader import PREFETCH_BATCHES, PlannedImages, auto_workers, batch_loader
from imgsearch.ingest.report import IngestReport, ProgressCallback
from imgsearch.ingest.writer import WRITE_QUEUE_CHUNKS, InFlight, Writer
from imgsearch.store import ImageRecord, MilvusStore

__all__ = ["IngestReport", "ingest_catalog", "ingest_entries", "prune_missing"]


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
        pending = plan_entries(iter(entries), store, plan_path, report, progress, relabel_duplicates, shard)
        if warm_up is not None:
            warm_up.join()
        if pending:
            preprocess = encoder.transfer_preprocess or encoder.preprocess
            dataset = PlannedImages(plan_path, preprocess, max_pixels, encoder.input_size)
            encode_and_store(dataset, pending, encoder, store, report, batch_size, workers, upsert_chunk, progress)
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


def in_flight_bound(batch_size: int, workers: int, upsert_chunk: int) -> int:
    """Most images alive at once: prefetched batches, the batch being encoded, the buffer, queued and writing chunks."""
    prefetched = workers * PREFETCH_BATCHES * batch_size
    return prefetched + batch_size + (upsert_chunk + batch_size) * (WRITE_QUEUE_CHUNKS + 2)


def encode_and_store(
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
    loader = batch_loader(dataset, batch_size, num_workers, encoder.pin_memory)
    in_flight = InFlight()
    writer = Writer(store, in_flight)
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

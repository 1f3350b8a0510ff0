"""Ingest a catalog into Milvus: plan (plan.py: hash and diff), read (reader.py: decode in workers) and encode in
batches here, or both in lanes, a thread per core (reader.split_cores decides), write (writer.py: upsert chunks
from a thread, or from a child process when asked).

Why this is safe to interrupt and rerun: ids are SHA-256 hashes of file bytes, so an image
always maps to the same row and an upsert of it is idempotent; a rerun skips what is stored.
"""

from __future__ import annotations

import contextlib
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgsearch.config import DEFAULT_BATCH_SIZE, DEFAULT_MAX_PIXELS, DEFAULT_UPSERT_CHUNK, WriterPlace, is_lite_uri
from imgsearch.encoders import Encoder
from imgsearch.ingest.catalog import CatalogEntry, Location, Shard, absolute, catalog_folder, check_catalog, scan_catalog
from imgsearch.ingest.hashes import HashCache, default_hash_cache
from imgsearch.ingest.plan import Settler, drop_replaced, new_content, new_row_metadata, plan_entries, prune_missing, record_copies
from imgsearch.ingest.reader import MAX_AUTO_WORKERS, MAX_LANES, PREFETCH_BATCHES, PlannedImages, batches, chunked, collate, split_cores
from imgsearch.ingest.report import IngestReport, ProgressCallback
from imgsearch.ingest.writer import WRITE_QUEUE_CHUNKS, InFlight, WriterProcess, start_writer
from imgsearch.storage import FileStamp
from imgsearch.store import ImageRecord, MilvusStore

if TYPE_CHECKING:  # ray: imported only for --ray
    from imgsearch.ingest.ray_pipeline import RayIngest

__all__ = ["IngestReport", "ingest_catalog", "ingest_entries", "ingest_options", "prune_missing"]


def ingest_options(settings: Any) -> dict[str, Any]:
    """The ingest_entries options a Settings object decides: one place for the CLI's ingest, enrol and reindex."""
    return {
        "batch_size": settings.batch_size, "workers": settings.workers, "max_pixels": settings.max_image_pixels,
        "upsert_chunk": settings.upsert_chunk, "hash_cache": settings.hash_cache, "writer": settings.writer,
    }


def ingest_catalog(
    root: Location,
    encoder: Encoder,
    store: MilvusStore,
    *,
    use_labels: bool = True,
    manifest: Location | None = None,
    **options: Any,
) -> IngestReport:
    """Index a catalog folder or bucket prefix (labels from sub-folders or key prefixes), one image, or a manifest;
    the folder (or the one image) is recorded with the collection as a root the REST service may serve files from."""
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
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    upsert_chunk: int = DEFAULT_UPSERT_CHUNK,
    progress: ProgressCallback | None = None,
    wait_for_index: bool = True,
    hash_cache: Path | None = None,
    calibrate: bool = True,
    writer: WriterPlace = "auto",
    ray: RayIngest | None = None,
    seal: bool = True,
) -> IngestReport:
    """Settle what is stored, read each other file once in decode workers, encode in batches and upsert; enrolment
    uses it too. `wait_for_index`: return once Milvus Lite has indexed the new rows (the service does not wait: it
    answers while Lite builds in the background). `hash_cache`: the SQLite file of remembered hashes (default
    ~/.cache/imgsearch/file-hashes.sqlite). `calibrate`: when labeled rows changed, recompute the collection's own
    abstention threshold (recognition/abstention.py) afterwards. `writer`: upsert from a child process or a thread (writer.py).
    `ray`: read, encode and upsert on a Ray cluster (ray_pipeline.py) instead of in this process's workers.
    `seal`: flush at the end, sealing the new rows' segments for indexing (2.5-3 s on the 2.3.5 server). A server
    keeps acknowledged upserts without it (its write-ahead log: a SIGKILLed server kept them, tests/test_faults.py),
    so the service's one-image writes skip it there; Milvus Lite is always flushed.
    Interrupted (Ctrl-C, SIGTERM), the KeyboardInterrupt carries what was done in `done`, for the CLI's last line."""
    report = IngestReport()
    try:
        return _ingest_entries(
            entries, encoder, store, report, prune=prune, relabel_duplicates=relabel_duplicates, shard=shard, batch_size=batch_size,
            workers=workers, max_pixels=max_pixels, upsert_chunk=upsert_chunk, progress=progress, wait_for_index=wait_for_index,
            hash_cache=hash_cache, calibrate=calibrate, writer=writer, ray=ray, seal=seal,
        )
    except KeyboardInterrupt as interrupt:
        interrupt.done = report.interrupted_line()
        raise


def _ingest_entries(
    entries: Iterable[CatalogEntry], encoder: Encoder, store: MilvusStore, report: IngestReport, *, prune: bool,
    relabel_duplicates: bool, shard: Shard | None, batch_size: int, workers: int | None, max_pixels: int, upsert_chunk: int,
    progress: ProgressCallback | None, wait_for_index: bool, hash_cache: Path | None, calibrate: bool, writer: WriterPlace,
    ray: RayIngest | None, seal: bool,
) -> IngestReport:
    settler = Settler(store, report, relabel_duplicates)
    hashes = HashCache(hash_cache or default_hash_cache())
    try:
        with tempfile.TemporaryDirectory(prefix="imgsearch-plan-") as tmp:
            plan_path = Path(tmp) / "plan.jsonl"
            warm_up = _warm_up_in_background(encoder, batch_size)
            pending = plan_entries(iter(entries), settler, hashes, plan_path, progress, shard)
            if warm_up is not None:
                warm_up.join()
            if pending and ray is not None:  # the CPU tasks decode everything: no device JPEGs, no shards
                from imgsearch.ingest.ray_pipeline import encode_and_store_on_ray

                dataset = PlannedImages(plan_path, encoder.preprocess, max_pixels, encoder.input_size)
                read = encode_and_store_on_ray(
                    dataset, pending, encoder, store, ray_ingest=ray, report=report, settler=settler, batch_size=batch_size,
                    upsert_chunk=upsert_chunk, progress=progress,
                )
                remember_hashes(hashes, read)
            elif pending:
                preprocess = encoder.transfer_preprocess or encoder.preprocess
                dataset = PlannedImages(
                    plan_path, preprocess, max_pixels, encoder.input_size, shard, device_jpegs=encoder.jpeg_decoder is not None
                )
                encode_and_store(
                    dataset, encoder, store, pending=pending, report=report, settler=settler, hashes=hashes, batch_size=batch_size,
                    workers=workers, upsert_chunk=upsert_chunk, progress=progress, writer_kind=writer,
                )
    finally:
        hashes.close()
    report.copies, report.copies_left_out = record_copies(store, settler.copies)
    if settler.replaced:
        store.flush()  # the new rows are durable before the rows they replace go
        report.replaced = drop_replaced(store, settler.replaced)
    if prune:
        report.pruned = prune_missing(store, shard)
    if seal or is_lite_uri(store.uri):
        store.flush()
    if wait_for_index and (report.indexed or report.updated or report.pruned or report.replaced):
        if progress:
            progress("index", 0, None)
        report.index_seconds = store.wait_for_index()  # else Lite searches the new rows without it, or builds at exit
    if calibrate:
        from imgsearch.recognition.abstention import calibration_is_stale, self_calibrate

        # a run that changed no references recalibrates anyway when an earlier one stopped before it could
        if report.references_changed or calibration_is_stale(store):
            if progress:
                progress("calibrate", 0, None)
            calibration = self_calibrate(store)
            report.calibration = asdict(calibration) if calibration else None
    report.seconds = time.perf_counter() - report.started
    return report


def _warm_up_in_background(encoder: Encoder, batch_size: int) -> threading.Thread | None:
    """On CUDA the first forward pass loads kernels and picks algorithms (seconds); do it while hashing."""
    if encoder.device_type != "cuda":
        return None
    import torch

    size = encoder.input_size
    dtype = torch.uint8 if encoder.transfer_preprocess is not None else torch.float32
    thread = threading.Thread(
        target=encoder.encode, args=(torch.zeros(batch_size, 3, size, size, dtype=dtype),), name="imgsearch-warm-up", daemon=True
    )
    thread.start()
    return thread


def in_flight_bound(batch_size: int, prefetched_batches: int, upsert_chunk: int) -> int:
    """Most images alive at once: prefetched batches, the batch being encoded, the buffer, queued and writing chunks."""
    return (prefetched_batches + 1) * batch_size + (upsert_chunk + batch_size) * (WRITE_QUEUE_CHUNKS + 2)


def prefetched_batches(workers: int, lanes: int) -> int:
    """Batches decoded ahead of the one being encoded: each worker's queue share, or each lane's batch in hand and
    its place in the queue of encoded batches."""
    return max(workers * PREFETCH_BATCHES, 2 * lanes if lanes > 1 else 0)


def encode_and_store(
    dataset: PlannedImages,
    encoder: Encoder,
    store: MilvusStore,
    *,
    pending: int,
    report: IngestReport,
    settler: Settler,
    hashes: HashCache,
    batch_size: int,
    workers: int | None,
    upsert_chunk: int,
    progress: ProgressCallback | None,
    writer_kind: WriterPlace,
) -> None:
    """Encode the `pending` planned files that hold new content, in batches, and hand the rows to a writer in chunks.
    `workers` None: the cores are shared between decode workers and the encoder's threads (reader.split_cores)."""
    cores = os.cpu_count() or 1
    threads_before = getattr(encoder, "threads", None)
    # a thread count pinned by IMGSEARCH_ONNX_THREADS (a Ray actor's, or the user's) is kept
    balanced = workers is None and threads_before == 0 and not encoder.tensor_batches
    if workers is not None:
        report.workers = workers
    elif not balanced:  # an encoder whose threads are not ours to set (torch's, a GPU's): every core but one decodes
        report.workers = split_cores(cores, decode_ms=1.0, encode_ms=0.0, pending=pending, batch_size=batch_size).decode_workers
    if balanced:  # the most that balanced_batches can choose
        prefetched = max(prefetched_batches(min(cores - 1, MAX_AUTO_WORKERS), 1), prefetched_batches(0, min(cores, MAX_LANES)))
    else:
        prefetched = prefetched_batches(report.workers, 1)
    report.in_flight_bound = in_flight_bound(batch_size, prefetched, upsert_chunk)
    in_flight = InFlight()
    if encoder.tensor_batches:
        from imgsearch.ingest.torch_reader import batch_loader  # torch: only torch encoders need it

        loader = batch_loader(dataset, batch_size, report.workers, encoder.pin_memory)
    elif balanced:
        loader = balanced_batches(dataset, encoder, settler, in_flight, batch_size, pending, report)
    else:
        loader = batches(dataset, batch_size, report.workers)
    writer = start_writer(store, in_flight, writer_kind)
    report.writer = "process" if isinstance(writer, WriterProcess) else "thread"
    buffer: list[ImageRecord] = []
    done = 0
    try:
        waited = time.perf_counter()
        for batch in loader:
            report.wait_seconds += time.perf_counter() - waited
            report.first_batch_seconds = report.first_batch_seconds or time.perf_counter() - report.started
            done += report.add_read(batch)
            remember_hashes(hashes, batch["items"] + batch["other_shards"])
            for item in batch["items"]:
                if item.get("previous") not in (None, item["id"]):
                    settler.replaced[item["path"]] = item["previous"]
            buffer += encode_batch(batch, encoder, dataset, settler, report, in_flight)
            if len(buffer) >= upsert_chunk:
                writer.put(buffer)
                buffer = []
            if progress:
                progress("encode", done, pending)
            waited = time.perf_counter()
        writer.put(buffer)
    finally:
        if hasattr(loader, "close"):  # a generator's own clean-up (lanes stop, workers end) now, not when collected
            loader.close()
        writer.close()
        report.insert_seconds = writer.seconds
        report.max_in_flight = in_flight.peak
        if balanced:
            encoder.set_threads(threads_before)  # the service's encoder goes back to answering queries on every core
    if isinstance(writer, WriterProcess):
        store.count()  # one Strong read: this client's later Session searches (calibration) see the child's rows


def balanced_batches(
    dataset: PlannedImages, encoder: Encoder, settler: Settler, in_flight: InFlight, batch_size: int, pending: int,
    report: IngestReport,
) -> Iterator[dict[str, Any]]:
    """The plan's batches, with the cores shared as reader.split_cores says: small jobs stay in this process on
    every core; up to MAX_LANES cores, each core is a lane that decodes and encodes its own batches; on more, the
    first batch is decoded in this process and encoded on one thread (its per-image costs, in core-ms), then
    workers decode the rest and the encoder runs on the other cores."""
    cores = os.cpu_count() or 1
    first = split_cores(cores, 1.0, 1.0, pending, batch_size)  # neither of the first two needs the costs
    if first.lanes > 1:
        report.workers, report.encoder_threads, report.lanes = 0, 1, first.lanes
        encoder.set_threads(1)
        read = decode_seconds = encoded = encode_seconds = 0
        for batch in lane_batches(dataset, encoder, settler, in_flight, batch_size, first.lanes):
            read, decode_seconds = read + len(batch["items"]) + len(batch["failed"]), decode_seconds + batch["decode_seconds"]
            encoded, encode_seconds = encoded + len(batch["encoded"]), encode_seconds + batch["encode_seconds"]
            yield batch
        # what each lane's core spent per image: the stage costs, for the report
        report.measured_ms = {"decode": round(1000 * decode_seconds / max(read, 1), 3), "encode": round(1000 * encode_seconds / max(encoded, 1), 3)}
        return
    if first.decode_workers == 0:
        report.workers, report.encoder_threads = 0, first.encoder_threads
        yield from batches(dataset, batch_size, 0)
        return
    encoder.set_threads(1)
    items = list(islice(dataset.items(), batch_size))
    batch = collate(items)
    decode_ms = 1000 * batch["decode_seconds"] / max(len(items), 1)
    indexed, encode_seconds = report.indexed, report.encode_seconds
    yield batch  # encoded by the caller, on the one thread
    encoded = report.indexed - indexed
    encode_ms = 1000 * (report.encode_seconds - encode_seconds) / encoded if encoded else decode_ms  # none new: alike
    split = split_cores(cores, decode_ms, encode_ms, pending - len(items), batch_size)
    report.workers, report.encoder_threads = split.decode_workers, split.encoder_threads
    report.measured_ms = {"decode": round(decode_ms, 3), "encode": round(encode_ms, 3)}
    encoder.set_threads(split.encoder_threads)
    yield from batches(dataset, batch_size, split.decode_workers, start=len(items))


LANE_DONE = object()
LANE_POLL_SECONDS = 0.2


def lane_batches(
    dataset: PlannedImages, encoder: Encoder, settler: Settler, in_flight: InFlight, batch_size: int, lanes: int
) -> Iterator[dict[str, Any]]:
    """Batches already encoded by `lanes` threads, each reading, decoding and encoding every lanes-th file of the
    plan on one core (the encoder's session runs on one intra-op thread and takes concurrent calls). Settling new
    content asks Milvus, so lanes take turns at it. Stopped early (Ctrl-C, an error), each lane ends after the
    batch it is on; a lane's error is raised here."""
    encoded: queue.Queue = queue.Queue(maxsize=lanes)
    stop = threading.Event()
    settling = threading.Lock()

    def hand_over(thing: Any) -> None:
        while not stop.is_set():
            try:
                encoded.put(thing, timeout=LANE_POLL_SECONDS)
                return
            except queue.Full:
                pass

    def lane(index: int) -> None:
        try:
            for chunk in chunked(dataset.items(index, lanes), batch_size):
                if stop.is_set():
                    return
                batch = collate(chunk)
                encode_new_content(batch, encoder, dataset, settler, in_flight, settling)
                hand_over(batch)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread, which raises it
            hand_over(error)
        finally:
            hand_over(LANE_DONE)

    threads = [threading.Thread(target=lane, args=(index,), name=f"imgsearch-lane-{index}", daemon=True) for index in range(lanes)]
    for thread in threads:
        thread.start()
    finished = 0
    try:
        while finished < lanes:
            batch = encoded.get()
            if batch is LANE_DONE:
                finished += 1
            elif isinstance(batch, BaseException):
                raise batch
            else:
                yield batch
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def encode_new_content(
    batch: dict[str, Any], encoder: Encoder, dataset: PlannedImages, settler: Settler, in_flight: InFlight,
    settling: Any = None,
) -> None:
    """Encode a decoded batch's new content (JPEGs left to the device decoded there first) into the batch:
    `encoded` items, their `vectors`, the `encode_seconds`; counted in flight from before they are encoded.
    `settling`: a lock when lanes settle content side by side."""
    items, inputs = batch["items"], batch["batch"]
    started = time.perf_counter()
    if batch["jpegs"]:  # the encode stage's time includes decoding them on the device
        from imgsearch.ingest.torch_reader import decode_on_device  # torch: only CUDA encoders get JPEGs

        items, inputs, batch["device_failed"], batch["device_decoded"] = decode_on_device(batch, encoder, dataset)
    with settling or contextlib.nullcontext():
        items, inputs = new_content(items, inputs, settler)
    batch["encoded"], batch["vectors"] = items, None
    if items:
        in_flight.add(len(items))
        batch["vectors"] = encoder.encode(inputs)
    batch["encode_seconds"] = time.perf_counter() - started


def encode_batch(
    batch: dict[str, Any], encoder: Encoder, dataset: PlannedImages, settler: Settler, report: IngestReport, in_flight: InFlight
) -> list[ImageRecord]:
    """The rows of a decoded batch's new content, encoded here unless a lane did."""
    if "encoded" not in batch:
        encode_new_content(batch, encoder, dataset, settler, in_flight)
    report.failed.extend(batch.get("device_failed", ()))
    report.gpu_decoded += batch.get("device_decoded", 0)
    items = batch["encoded"]
    if not items:
        return []
    report.add_encoded(items, batch["encode_seconds"])
    return [
        ImageRecord(id=item["id"], vector=vector, path=item["path"], label=item["label"], metadata=new_row_metadata(item))
        for item, vector in zip(items, batch["vectors"])
    ]


RACY_SECONDS = 2.0  # a file changed this recently may change again within its mtime's granularity: not remembered


def remember_hashes(hashes: HashCache, items: list[dict[str, Any]]) -> None:
    now_ns = time.time_ns()
    hashes.remember(
        (item["path"], FileStamp(*item["stamp"]), item["id"])
        for item in items
        if "stamp" in item and now_ns - item["stamp"][1] > RACY_SECONDS * 1e9
    )

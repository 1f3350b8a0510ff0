"""Read the plan: worker processes read, hash, decode and preprocess images into batches for the encoder.

Two transports carry the same batches: torch's DataLoader for torch encoders (shared memory, pinned batches for the
GPU; ingest/torch_reader.py), and plain worker processes for the ONNX runtime, which never imports torch: they write
each batch's inputs into shared memory (BatchSlots) and put the rest on a queue.
"""

from __future__ import annotations

import json
import mmap
import multiprocessing
import os
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from imgsearch import storage
from imgsearch.errors import ImageDecodeError, ImgsearchError
from imgsearch.images import device_decodable_jpeg, load_image
from imgsearch.ingest.catalog import Shard, bytes_sha256
from imgsearch.processes import die_with_parent

PREFETCH_BATCHES = 4  # per worker
# Forked workers start at once and share the parent's imported modules; they only read files and run
# PIL/numpy (or torchvision), never the parent's gRPC or Milvus client. IMGSEARCH_WORKER_START=spawn is the cautious
# fallback.
WORKER_START_METHOD = os.environ.get("IMGSEARCH_WORKER_START", "fork")
MAX_AUTO_WORKERS = 8
MAX_LANES = 8
WORKER_POLL_SECONDS = 1.0


class DecodeWorkerError(ImgsearchError):
    """A decode worker process died (killed, or out of memory)."""


@dataclass(frozen=True)
class CoreSplit:
    decode_workers: int  # processes reading, hashing, decoding and preprocessing (0: this process does it)
    encoder_threads: int  # the encoder's intra-op threads per forward pass
    lanes: int = 1  # threads of this process that each decode and encode their own batches


def split_cores(cores: int, decode_ms: float, encode_ms: float, pending: int, batch_size: int) -> CoreSplit:
    """How the cores share decoding and encoding, from each stage's cost per image in core-ms: one busy thread per
    core in all (more made the encoder's spinning threads and the workers take turns). Tiny jobs decode in this
    process between forward passes on every core: starting anything costs more.

    Up to MAX_LANES cores, one lane per core: a thread that decodes its own batches and encodes them on one intra-op
    thread, beside the others (onnxruntime and Pillow release the GIL). That reaches the machine bound,
    cores / (decode_ms + encode_ms), which no whole-thread split can: on 2 cores, camera JPEGs decoding at 9 ms and
    encoding at 31 (fp32) allow the best split 0.81 of it (docs/benchmarks.md). On more cores a split loses less
    and one process's GIL would serve many lanes (unmeasured), so workers and threads split the cores where the
    slower side is fastest; ties give the encoder the core."""
    cores = max(1, cores)
    if pending < 2 * batch_size or cores == 1:
        return CoreSplit(0, cores)
    if cores <= MAX_LANES:
        return CoreSplit(0, 1, lanes=cores)
    decode_ms, encode_ms = max(decode_ms, 1e-6), max(encode_ms, 1e-6)

    def rate(workers: int) -> float:
        if workers == 0:  # one after the other: decode on one core, then encode on all
            return 1 / (decode_ms + encode_ms / cores)
        return min(workers / decode_ms, (cores - workers) / encode_ms)

    workers = max(range(min(cores, MAX_AUTO_WORKERS + 1)), key=lambda workers: (rate(workers), -workers))
    return CoreSplit(workers, cores - workers)


@dataclass
class PlannedImages:
    """The plan file and how to turn each of its lines into the encoder's input."""

    plan_path: Path
    preprocess: Callable
    max_pixels: int
    min_side: int
    shard: Shard | None = None  # content of other shards is hashed, never decoded
    device_jpegs: bool = False  # pass baseline JPEGs' bytes on undecoded: the encoder's GPU decodes them

    def items(self, worker_id: int = 0, num_workers: int = 1, start: int = 0) -> Iterator[dict[str, Any]]:
        """Every num_workers-th line from line start + worker_id, read, hashed and preprocessed: no process holds the
        catalog. Objects are fetched up to storage.REQUESTS_IN_FLIGHT ahead of the one being decoded."""
        with open(self.plan_path, encoding="utf-8") as plan:
            items = (json.loads(line) for line in islice(plan, start + worker_id, None, num_workers))
            for item, fetched in storage.read_ahead(items, lambda item: item["path"]):
                yield self.read(item, fetched)

    def read(self, item: dict[str, Any], fetched: Any = None) -> dict[str, Any]:
        """The one read of a file: its bytes are hashed (the id), stamped for the hash cache, decoded, preprocessed.
        `settled`: the plan knew this hash (from the cache) and settled it; otherwise the main process does.
        `fetched`: an object's (bytes, None) or the error fetching it, from read_ahead."""
        started = time.perf_counter()
        try:
            if isinstance(fetched, BaseException):
                raise fetched
            data, stamp = fetched or storage.read_bytes(item["path"])
            planned_id = item["id"]
            item["id"] = bytes_sha256(data)  # the bytes we encode decide the id, even if the file just changed
            item["settled"] = item["id"] == planned_id
            if stamp is not None:
                item["stamp"] = tuple(stamp)
            elif item.get("stamp") and item["stamp"][0] != len(data):  # the object changed since it was listed
                del item["stamp"]
            if self.shard is not None and not self.shard.contains(item["id"]):
                item["other_shard"] = True
                return item
            if self.device_jpegs and (header := device_decodable_jpeg(data, max_pixels=self.max_pixels)) is not None:
                item["jpeg"], (item["orientation"], item["pixels"]) = data, header
            else:
                image = load_image(data, max_pixels=self.max_pixels, min_side=self.min_side, name=item["path"])
                item["tensor"] = self.preprocess(image)
        except ImageDecodeError as error:
            item["error"] = error.reason
        except storage.transport_errors() as error:
            item["error"] = storage.describe_error(error)
        item["decode_seconds"] = time.perf_counter() - started
        return item


def collate(items: list[dict[str, Any]], stack: Callable = np.stack, buffer: Callable = bytes) -> dict[str, Any]:
    """One batch: the decoded items and their stacked inputs, then the items whose JPEG bytes the GPU decodes
    (`jpegs`, each made a `buffer`, with their EXIF `orientations` and `pixels`), the failures, the time spent decoding."""
    good = [item for item in items if "tensor" in item]
    jpegs = [item for item in items if "jpeg" in item]
    return {
        "items": good + jpegs,  # the rows of `batch`, then those of the decoded `jpegs`
        "batch": stack([item.pop("tensor") for item in good]) if good else None,
        "jpegs": [buffer(item.pop("jpeg")) for item in jpegs],
        "orientations": [item.pop("orientation") for item in jpegs],
        "pixels": [item.pop("pixels") for item in jpegs],
        "failed": [{"path": item["path"], "error": item["error"]} for item in items if "error" in item],
        "other_shards": [item for item in items if item.get("other_shard")],
        "decode_seconds": sum(item.pop("decode_seconds", 0.0) for item in items),
    }


def batches(dataset: PlannedImages, batch_size: int, workers: int, start: int = 0) -> Iterator[dict[str, Any]]:
    """Batches of the plan from line `start` as numpy arrays, decoded by `workers` processes (0: in this one); torch
    encoders read through torch_reader.py instead."""
    if workers == 0:
        yield from _batched(dataset.items(start=start), batch_size)
    else:
        yield from _from_worker_processes(dataset, batch_size, workers, start)


def chunked(items: Iterator[dict[str, Any]], batch_size: int) -> Iterator[list[dict[str, Any]]]:
    while chunk := list(islice(items, batch_size)):
        yield chunk


def _batched(items: Iterator[dict[str, Any]], batch_size: int) -> Iterator[dict[str, Any]]:
    for chunk in chunked(items, batch_size):
        yield collate(chunk)


class BatchSlots:
    """Shared memory that forked decode workers write their batches' inputs into, `per_worker` slots each: the
    queue carries only the items and a slot number, where it carried each batch pickled (19 MB for 32 images at
    224 px, copied on both sides). A worker takes its slots in turn, each once the parent is done with the batch
    that slot held before (a semaphore per worker counts its free slots); the parent reads the slot in place."""

    def __init__(self, input_shape: tuple[int, ...], dtype: np.dtype, batch_size: int, workers: int, per_worker: int, context: Any) -> None:
        self.input_shape, self.dtype, self.per_worker = tuple(input_shape), np.dtype(dtype), per_worker
        self.slot_bytes = batch_size * int(np.prod(self.input_shape)) * self.dtype.itemsize
        self.memory = mmap.mmap(-1, self.slot_bytes * per_worker * workers)  # anonymous and shared: forked children see it
        self.free = [context.Semaphore(per_worker) for _ in range(workers)]

    def view(self, slot: int, rows: int) -> np.ndarray:
        return np.frombuffer(self.memory, self.dtype, rows * int(np.prod(self.input_shape)), slot * self.slot_bytes).reshape(rows, *self.input_shape)

    def fits(self, tensors: list[Any]) -> bool:
        return all(isinstance(tensor, np.ndarray) and tensor.shape == self.input_shape and tensor.dtype == self.dtype for tensor in tensors)


def batch_slots(dataset: PlannedImages, batch_size: int, workers: int, context: Any) -> BatchSlots | None:
    """Slots for forked workers whose inputs are numpy arrays of one shape (the preprocessing of a blank image tells
    it); None (the batch travels in the queue) for spawned workers, which cannot inherit anonymous memory."""
    from PIL import Image

    if context.get_start_method() != "fork":
        return None
    sample = dataset.preprocess(Image.new("RGB", (max(dataset.min_side, 64),) * 2))
    if not isinstance(sample, np.ndarray):
        return None
    return BatchSlots(sample.shape, sample.dtype, batch_size, workers, PREFETCH_BATCHES + 1, context)


def put_while_parent_lives(out: Any, item: Any, parent: int) -> None:
    while True:
        try:
            out.put(item, timeout=WORKER_POLL_SECONDS)
            return
        except queue.Full:
            if os.getppid() != parent:
                os._exit(1)


def acquire_while_parent_lives(free: Any, parent: int) -> None:
    while not free.acquire(timeout=WORKER_POLL_SECONDS):
        if os.getppid() != parent:
            os._exit(1)


def _decode_worker(
    dataset: PlannedImages, batch_size: int, worker_id: int, workers: int, start: int, out: Any, parent: int,
    slots: BatchSlots | None = None,
) -> None:
    die_with_parent(parent)
    taken = 0
    for chunk in chunked(dataset.items(worker_id, workers, start), batch_size):
        tensors = [item["tensor"] for item in chunk if "tensor" in item]
        if slots is None or not tensors or not slots.fits(tensors):
            put_while_parent_lives(out, collate(chunk), parent)
            continue
        acquire_while_parent_lives(slots.free[worker_id], parent)
        slot = worker_id * slots.per_worker + taken % slots.per_worker
        taken += 1
        np.stack(tensors, out=slots.view(slot, len(tensors)))
        put_while_parent_lives(out, collate(chunk, stack=lambda _: None) | {"slot": slot, "rows": len(tensors)}, parent)
    put_while_parent_lives(out, None, parent)  # this worker is done


def _from_worker_processes(dataset: PlannedImages, batch_size: int, workers: int, start: int) -> Iterator[dict[str, Any]]:
    context = multiprocessing.get_context(WORKER_START_METHOD)
    slots = batch_slots(dataset, batch_size, workers, context)
    out = context.Queue(maxsize=workers * PREFETCH_BATCHES)  # bounds the batches alive at once
    processes = [
        context.Process(target=_decode_worker, args=(dataset, batch_size, worker_id, workers, start, out, os.getpid(), slots),
                        daemon=True, name=f"imgsearch-decode-{worker_id}")
        for worker_id in range(workers)
    ]
    for process in processes:
        process.start()
    finished = 0
    try:
        while finished < workers:
            try:
                batch = out.get(timeout=WORKER_POLL_SECONDS)
            except queue.Empty:
                dead = [process for process in processes if process.exitcode not in (None, 0)]
                if dead:
                    raise DecodeWorkerError(f"decode worker {dead[0].name} died (exit code {dead[0].exitcode})") from None
                continue
            if batch is None:
                finished += 1
            elif "slot" in batch:
                slot = batch.pop("slot")
                batch["batch"] = slots.view(slot, batch.pop("rows"))
                yield batch  # the caller is done with it when it asks for the next
                del batch
                slots.free[slot // slots.per_worker].release()
            else:
                yield batch
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join()
        out.close()
        out.cancel_join_thread()

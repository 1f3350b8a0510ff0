"""Ingest on a Ray cluster (`imgsearch ingest --ray`). The driver plans exactly as a local ingest does (plan.py:
listing, the hash cache, skipping stored content, rewriting moves and relabels); only the files that need reading go
to Ray Data:

    plan lines -> read tasks: read, hash, decode, preprocess (reader.PlannedImages.read, on CPUs)
               -> the Ledger actor settles each batch's new hashes (stored content and copies within the run are
                  dropped before anything is encoded) and keeps the failures and stamps for the driver
               -> encoder actors (ActorPoolStrategy: one per GPU, or onnxruntime actors sized from the CPUs)
               -> MilvusSink: upserts in chunks to the Milvus server, idempotent by content hash

Afterwards the driver does what a local ingest does (pipeline.ingest_entries): copies, replaced rows, prune, index,
calibration. Ray retries a killed task and restarts a killed actor; the Ledger settles a retried batch as it did
the first time, so nothing is counted or skipped twice. A killed driver leaves only whole rows: the rerun encodes
what is not stored.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from imgsearch import storage
from imgsearch.encoders import Encoder, encoder_from_settings
from imgsearch.errors import ImgsearchError, RayIngestError, RayUnavailableError, UsageError
from imgsearch.ingest.plan import Settler, new_content
from imgsearch.ingest.reader import PlannedImages
from imgsearch.ingest.report import IngestReport, ProgressCallback
from imgsearch.store import MilvusStore

log = logging.getLogger(__name__)

# A local cluster (no address): Ray's object store would take about 30% of RAM. Ray Data budgets each stage's blocks
# from it (a read task's block is BATCHES_PER_TASK batches of 32 preprocessed 224 px images: 154 MB); on 2,000 camera
# JPEGs 1 GiB held the read tasks back (49-51 images/s in the ingest), 2 GiB did not (61), 4 GiB gained nothing (58).
LOCAL_OBJECT_STORE_BYTES = 2 << 30
BATCHES_PER_TASK = 8  # a read task reads this many batches: fewer, longer tasks spend less on scheduling
ENCODER_THREADS_MAX = 4  # onnxruntime threads per CPU encoder actor: more actors rather than wider ones
# Test hooks: an encoder actor exits after this many batches, once (the marker file records that it did).
EXIT_AFTER_BATCHES_VARIABLE = "IMGSEARCH_RAY_TEST_EXIT_AFTER_BATCHES"
EXIT_MARKER_VARIABLE = "IMGSEARCH_RAY_TEST_EXIT_MARKER"


@dataclass
class RayIngest:
    """How an ingest runs on the cluster this process joined (start_ray). `load_encoder` is picklable and builds the
    driver's encoder in each actor (the packaged weights, or a path every node can read); `storage_options` go to
    every read task (fsspec's options are per process)."""

    load_encoder: Callable[[], Encoder]
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EncoderPool:
    """The encoder actors for a cluster's resources."""

    actors: int
    num_cpus: float
    num_gpus: float
    threads: int  # onnxruntime intra-op threads per actor; 0 on GPUs (torch decides)


def encoder_pool(resources: dict[str, float]) -> EncoderPool:
    """One actor per GPU; on CPU-only clusters half the cores are reserved for encoding (reading, hashing and decoding
    a photo cost about what encoding it does: docs/benchmarks.md), in actors of up to ENCODER_THREADS_MAX cores, and
    the read tasks take the other half. Each actor runs twice as many onnxruntime threads as the cores it reserved,
    so encoding takes up the cycles the read tasks leave while they wait on I/O and Ray, as a local ingest's encoder
    shares the cores with its decode workers (with a 1 GiB object store, 1 thread per reserved core gave 44-48 images/s in
    the ingest of 2,000 camera JPEGs here, 2 threads 49-51)."""
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return EncoderPool(actors=gpus, num_cpus=1, num_gpus=1, threads=0)
    encoding_cores = max(1, int(resources.get("CPU", 1)) // 2)
    threads = min(ENCODER_THREADS_MAX, encoding_cores)
    return EncoderPool(actors=max(1, encoding_cores // threads), num_cpus=threads, num_gpus=0, threads=2 * threads)


def check_ray_ingest(uri: str, shard: str | None = None) -> None:
    """Before anything starts: Ray writes from many processes (a Milvus Lite file is one process's), and shares the
    catalog out itself."""
    from imgsearch.config import is_lite_uri

    if shard:
        raise UsageError("--shard splits a catalog between processes started by hand; with --ray the cluster shares it out")
    if is_lite_uri(uri):
        raise UsageError(
            f"--ray needs a Milvus server: {uri} is a Milvus Lite file, which one process opens at a time; serve it with "
            f"`milvus-lite server --data-dir {uri}` and pass --uri http://127.0.0.1:19530, or use a Milvus server's URI"
        )


def start_ray(address: str) -> bool:
    """Join (or, with no address, start) the cluster; True when this call did, so the caller shuts it down."""
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'imgsearch-milvus[ray]'") from None
    if ray.is_initialized():  # a caller (a test session, a notebook) already joined one
        return False
    if address and address != "auto":
        check_reachable(address)
    options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, "configure_logging": True}
    try:
        if address:
            ray.init(address=address, **options)
        else:  # this machine only: loopback, a bounded object store; RAY_TMPDIR moves /tmp/ray
            ray.init(object_store_memory=LOCAL_OBJECT_STORE_BYTES, _node_ip_address="127.0.0.1", **options)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as error:
        where = f"at {address}" if address else "on this machine"
        raise RayUnavailableError(f"cannot reach a Ray cluster {where}: {first_line(error)}") from None
    except Exception as error:  # Ray raises a bare Exception when a node misses its fixed 30 s to register
        if address or "timed out during startup" not in str(error):
            raise
        raise RayUnavailableError(
            "a local Ray node did not start within Ray's 30 s (a busy machine?): start one with `ray start --head` "
            "and pass its address with --ray-address"
        ) from None
    return True


@contextmanager
def on_ray(settings: Any) -> Iterator[Callable[[Encoder], RayIngest]]:
    """The cluster the settings name, joined (or started) for one command; yields how to run an ingest on it with the
    driver's encoder. A cluster started here stops at the end."""
    started = start_ray(settings.ray_address)
    try:
        yield lambda encoder: RayIngest(partial(encoder_from_settings, settings, auto_int8=encoder.precision == "int8"), settings.storage_options)
    finally:
        if started:
            import ray

            ray.shutdown()


CONNECT_SECONDS = 5.0


def check_reachable(address: str) -> None:
    """Ray retries an unreachable head for minutes before failing; one TCP connection says it at once."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=CONNECT_SECONDS).close()
    except ValueError:
        raise UsageError(f"--ray-address must be auto or HOST:PORT (the head node's GCS port, 6379 by default), not {address!r}") from None
    except OSError as error:
        raise RayUnavailableError(f"cannot reach a Ray cluster at {address}: {error.strerror or first_line(error)}") from None


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def encode_and_store_on_ray(
    dataset: PlannedImages,
    pending: int,
    encoder: Encoder,
    store: MilvusStore,
    *,
    ray_ingest: RayIngest,
    report: IngestReport,
    settler: Settler,
    batch_size: int,
    upsert_chunk: int,
    progress: ProgressCallback | None,
) -> list[dict[str, Any]]:
    """Read, settle, encode and upsert the `pending` plan lines on the cluster; fills `report` and `settler` as the
    local pipeline does and returns the files read ({path, stamp, id}) for the hash cache."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from imgsearch.ingest.milvus_sink import MilvusSink

    context = DataContext.get_current()
    context.enable_progress_bars = False  # imgsearch's own bar (a TTY without --json) counts the files the Ledger settled
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-run INFO lines and the bars-disabled warning
    pool = encoder_pool(ray.cluster_resources())
    report.workers = pool.actors
    report.writer = "ray"
    ledger = ray.remote(num_cpus=0)(Ledger).remote(
        store.uri, store.token, store.collection, settler.relabel_duplicates, sorted(settler.planned_ids), settler.started
    )
    with open(dataset.plan_path, encoding="utf-8") as plan:
        lines = [{"line": line} for line in plan]
    identity = {"name": encoder.name, "dim": encoder.dim, "preprocess_version": encoder.preprocess_version, "precision": encoder.precision}
    sink = MilvusSink(store.uri, store.token, store.collection, upsert_chunk)
    started = time.perf_counter()
    reporter = report_progress(ledger, pending, progress) if progress else None
    try:
        (
            ray.data.from_items(lines, override_num_blocks=max(1, min(math.ceil(pending / (batch_size * BATCHES_PER_TASK)), 10_000)))
            .map_batches(
                read_batch, batch_size=batch_size, batch_format="pyarrow", num_cpus=1,
                fn_kwargs={"dataset": dataset, "ledger": ledger, "storage_options": ray_ingest.storage_options},
            )
            .map_batches(
                EncoderActor, batch_size=batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=pool.actors),
                num_cpus=pool.num_cpus, num_gpus=pool.num_gpus,
                fn_constructor_kwargs={"load_encoder": ray_ingest.load_encoder, "identity": identity, "threads": pool.threads},
                runtime_env={"env_vars": test_hooks()},
            )
            .write_datasink(sink)
        )
    except Exception as error:
        raise RayIngestError(f"the Ray run failed: {cause_of(error)}") from None
    finally:
        if reporter is not None:
            reporter.set()
        state = ray.get(ledger.state.remote())
        ray.kill(ledger)
        report.failed.extend({"path": path, "error": error} for path, error in state["failed"].items())
        report.skipped += state["skipped"]
        report.updated += state["updated"]
        report.decode_seconds += state["decode_seconds"]
        for digest, paths in state["copies"].items():
            settler.copies[digest].update(paths)
        settler.replaced.update(state["replaced"])
    written = sink.written
    report.indexed = len(written)
    report.labeled_indexed = sum(1 for labeled in written.values() if labeled)
    report.encode_seconds = sink.encode_seconds
    report.insert_seconds = sink.insert_seconds
    report.wait_seconds = max(0.0, time.perf_counter() - started - report.encode_seconds / max(1, pool.actors))
    if progress:
        progress("encode", len(written), pending)
    return state["read"]


PROGRESS_SECONDS = 1.0


def report_progress(ledger: Any, pending: int, progress: ProgressCallback) -> threading.Event:
    """Ask the Ledger how many files it has settled, every PROGRESS_SECONDS, until the returned event is set."""
    import ray

    done = threading.Event()

    def poll() -> None:
        while not done.wait(PROGRESS_SECONDS):
            try:
                progress("encode", ray.get(ledger.settled.remote(), timeout=PROGRESS_SECONDS), pending)
            except Exception:  # a slow or busy actor: the next poll tries again
                continue

    threading.Thread(target=poll, name="imgsearch-ray-progress", daemon=True).start()
    return done


def cause_of(error: BaseException) -> str:
    """The first imgsearch error inside Ray's wrappers, else the innermost cause's first line."""
    seen = error
    while seen is not None:
        if isinstance(seen, ImgsearchError):
            return first_line(seen)
        cause = getattr(seen, "cause", None) or seen.__cause__
        if cause is None or cause is seen:
            break
        seen = cause
    return first_line(seen or error)


def test_hooks() -> dict[str, str]:
    return {name: os.environ[name] for name in (EXIT_AFTER_BATCHES_VARIABLE, EXIT_MARKER_VARIABLE) if name in os.environ}


def read_batch(batch: Any, *, dataset: PlannedImages, ledger: Any, storage_options: dict[str, Any]) -> Any:
    """A read task: each plan line read once (hashed, decoded, preprocessed); the Ledger says which to encode."""
    import pyarrow
    import ray
    from ray.data.extensions import ArrowTensorArray

    storage.configure(storage_options)  # a fresh worker: fsspec's options are process-wide
    items = [dataset.read(json.loads(line)) for line in batch.column("line").to_pylist()]
    tensors = [item.pop("tensor", None) for item in items]
    keep = ray.get(ledger.settle.remote(items))
    kept = [index for index, wanted in enumerate(keep) if wanted]
    size = dataset.min_side
    stacked = np.stack([np.asarray(tensors[index]) for index in kept]) if kept else np.zeros((0, 3, size, size), np.float32)
    # A table with its types stated: Ray cannot infer a tensor column's type from a batch with no rows.
    return pyarrow.table({
        "item": pyarrow.array([json.dumps(row_fields(items[index])) for index in kept], pyarrow.string()),
        "tensor": ArrowTensorArray.from_numpy(stacked),
    })


def row_fields(item: dict[str, Any]) -> dict[str, Any]:
    return {key: item.get(key) for key in ("id", "path", "label", "metadata", "upload")}


class Ledger:
    """The one place a Ray run settles new hashes (an actor: every read task asks it), so copies within the run are
    encoded once. Idempotent per path: a retried batch gets the answers its first attempt got."""

    def __init__(self, uri: str, token: str, collection: str, relabel_duplicates: bool, planned_ids: list[str], started: float) -> None:
        self.store = MilvusStore.open_existing(uri, collection, token)
        self.report = IngestReport()
        self.settler = Settler(self.store, self.report, relabel_duplicates)
        self.settler.planned_ids = set(planned_ids)  # new or moved in the driver's plan
        self.settler.started = started  # the driver's: reads see what was stored before the run
        self.answers: dict[str, bool] = {}  # path -> whether its content is encoded in this run
        self.failed: dict[str, str] = {}
        self.read: dict[str, dict[str, Any]] = {}  # path -> {path, stamp, id}: the driver's hash cache remembers them

    def settle(self, items: list[dict[str, Any]]) -> list[bool]:
        fresh = []
        for item in items:
            path = item["path"]
            self.report.decode_seconds += item.get("decode_seconds", 0.0)
            if "error" in item:
                self.failed[path] = item["error"]
                self.answers[path] = False
                continue
            if "stamp" in item:
                self.read[path] = {"path": path, "stamp": item["stamp"], "id": item["id"]}
            if item.get("previous") not in (None, item["id"]):
                self.settler.replaced[path] = item["previous"]
            if path not in self.answers:
                fresh.append(item)
        if fresh:
            kept, _ = new_content(fresh, np.arange(len(fresh)), self.settler)
            encoded = {item["path"] for item in kept}
            self.answers.update({item["path"]: item["path"] in encoded for item in fresh})
        return [self.answers[item["path"]] for item in items]

    def settled(self) -> int:
        return len(self.answers)

    def state(self) -> dict[str, Any]:
        return {
            "failed": self.failed, "skipped": self.report.skipped, "updated": self.report.updated,
            "decode_seconds": self.report.decode_seconds, "read": list(self.read.values()),
            "copies": {digest: sorted(paths) for digest, paths in self.settler.copies.items()}, "replaced": self.settler.replaced,
        }


class EncoderActor:
    """Encodes batches; built once per actor with the driver's encoder, which it checks it got."""

    def __init__(self, load_encoder: Callable[[], Encoder], identity: dict[str, Any], threads: int) -> None:
        if threads:
            from imgsearch.encoders.onnx_runtime import THREADS_VARIABLE

            os.environ[THREADS_VARIABLE] = str(threads)
        self.encoder = load_encoder()
        got = {key: getattr(self.encoder, key) for key in identity}
        if got != identity:
            raise UsageError(f"an encoder actor built {got}, not the collection's {identity}: every node needs the same model and runtime")
        self.batches = 0
        self.exit_after = int(os.environ.get(EXIT_AFTER_BATCHES_VARIABLE, "0"))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.batches += 1
        if self.exit_after and self.batches > self.exit_after:
            exit_once(os.environ[EXIT_MARKER_VARIABLE])
        started = time.perf_counter()
        vectors = self.encoder.encode(batch["tensor"]) if len(batch["item"]) else np.zeros((0, self.encoder.dim), np.float32)
        seconds = time.perf_counter() - started
        return {"item": batch["item"], "vector": vectors, "encode_seconds": np.full(len(batch["item"]), seconds / max(1, len(batch["item"])))}


def exit_once(marker: str) -> None:
    """The test hook: the first actor past its batch count dies as a killed process would; a restarted one goes on."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)

"""Ingest a catalog into Milvus: plan (hash + diff), then decode in workers, encode in batches, upsert in chunks.

Why this is safe to interrupt and rerun: ids are SHA-256 hashes of file bytes, so an image
always maps to the same row and an upsert of it is idempotent; a rerun skips what is stored.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imgsearch.encoders import Encoder
from imgsearch.errors import ImageDecodeError
from imgsearch.images import load_image
from imgsearch.store import ImageRecord, MilvusStore
from ingest.catalog import CatalogEntry, bytes_sha256, file_sha256, scan_catalog

log = logging.getLogger(__name__)

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
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    encode_seconds: float = 0.0

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
        extras.append(f"{self.seconds:.1f} s, {self.images_per_second:.1f} images/s")
        return f"{line} ({'; '.join(extras)})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "indexed": self.indexed,
            "skipped": self.skipped,
            "updated": self.updated,
            "pruned": self.pruned,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
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
                try:
                    data = Path(item["path"]).read_bytes()
                    item["id"] = bytes_sha256(data)  # the bytes we encode decide the id, even if the file just changed
                    image = load_image(data, max_pixels=self.max_pixels, min_side=self.min_side, name=item["path"])
                    item["tensor"] = self.preprocess(image)
                except ImageDecodeError as error:
                    item["error"] = error.reason
                except OSError as error:
                    item["error"] = f"cannot read file ({error.strerror or error})"
                yield item


def collate_planned(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [item for item in items if "tensor" in item]
    return {
        "items": good,
        "batch": torch.stack([item.pop("tensor") for item in good]) if good else None,
        "failed": [{"path": item["path"], "error": item["error"]} for item in items if "error" in item],
    }


def ingest_catalog(
    root: Path,
    encoder: Encoder,
    store: MilvusStore,
    *,
    use_labels: bool = True,
    manifest: Path | None = None,
    prune: bool = False,
    batch_size: int = 32,
    workers: int | None = None,
    max_pixels: int = 64_000_000,
    upsert_chunk: int = 512,
    progress: ProgressCallback | None = None,
) -> IngestReport:
    started = time.perf_counter()
    report = IngestReport()
    with tempfile.TemporaryDirectory(prefix="imgsearch-plan-") as tmp:
        plan_path = Path(tmp) / "plan.jsonl"
        pending = _plan(scan_catalog(root, use_labels=use_labels, manifest=manifest), store, plan_path, report, progress)
        if pending:
            dataset = PlannedImages(plan_path, encoder.preprocess, max_pixels, encoder.input_size)
            _encode_and_store(dataset, pending, encoder, store, report, batch_size, workers, upsert_chunk, progress)
    if prune:
        report.pruned = prune_missing(store)
    store.flush()
    report.seconds = time.perf_counter() - started
    return report


def _plan(
    entries: Iterator[CatalogEntry],
    store: MilvusStore,
    plan_path: Path,
    report: IngestReport,
    progress: ProgressCallback | None,
) -> int:
    """Hash every entry, settle what is already stored, and write the rest to the plan file."""
    pending = 0
    planned_ids: set[str] = set()
    scanned = 0
    with open(plan_path, "w", encoding="utf-8") as plan, ThreadPoolExecutor(HASH_THREADS) as pool:
        while chunk := list(islice(entries, PLAN_CHUNK)):
            hashes = list(pool.map(_hash_or_error, [entry.path for entry in chunk]))
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
                    if same or (row["path"] != str(entry.path) and Path(row["path"]).exists()):
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


def _hash_or_error(path: Path) -> tuple[str | None, str | None]:
    try:
        return file_sha256(path), None
    except FileNotFoundError:
        return None, "file not found"
    except IsADirectoryError:
        return None, "is a directory"
    except OSError as error:
        return None, f"cannot read file ({error.strerror or error})"


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
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_planned,
        pin_memory=getattr(encoder, "pin_memory", False),
        prefetch_factor=4 if num_workers else None,
        # Workers are spawned, not forked: the parent runs gRPC threads (Milvus Lite) that fork would copy mid-state.
        multiprocessing_context="spawn" if num_workers else None,
    )
    buffer: list[ImageRecord] = []
    done = 0
    for batch in loader:
        report.failed.extend(batch["failed"])
        if batch["batch"] is not None:
            encode_started = time.perf_counter()
            vectors = encoder.encode(batch["batch"])
            report.encode_seconds += time.perf_counter() - encode_started
            for item, vector in zip(batch["items"], vectors):
                buffer.append(
                    ImageRecord(id=item["id"], vector=vector, path=item["path"], label=item["label"], metadata=item["metadata"])
                )
            report.indexed += len(batch["items"])
        if len(buffer) >= upsert_chunk:
            store.upsert(buffer)
            buffer = []
        done += len(batch["items"]) + len(batch["failed"])
        if progress:
            progress("encode", done, pending)
    store.upsert(buffer)


def prune_missing(store: MilvusStore) -> int:
    """Delete rows whose file no longer exists."""
    gone = [row["id"] for row in store.iter_rows(("id", "path")) if not Path(row["path"]).exists()]
    return store.delete(gone) if gone else 0

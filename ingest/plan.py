"""Plan an ingest: hash each catalog entry, settle what the store already holds, and write the rest to a plan file.

Ids are SHA-256 hashes of the file bytes, so a stored image is recognised wherever it moved: unchanged rows are
skipped, moved or relabelled ones are rewritten without re-encoding, and only new content is planned.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

from imgsearch.errors import InvalidInputError
from imgsearch.images import describe_os_error
from imgsearch.ingest.catalog import CatalogEntry, Shard, file_sha256
from imgsearch.ingest.report import IngestReport, ProgressCallback
from imgsearch.store import ImageRecord, MilvusStore

PLAN_CHUNK = 512  # catalog entries hashed and diffed against the store at a time
HASH_THREADS = 4


def plan_entries(
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
            chunk = valid_entries(chunk, report)
            hashes = list(pool.map(hash_or_error, [entry.path for entry in chunk]))
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
            report.updated += update_moved(store, moved)
            scanned += len(chunk)
            if progress:
                progress("scan", scanned, None)
    return pending


def valid_entries(chunk: list[CatalogEntry], report: IngestReport) -> list[CatalogEntry]:
    """Rows with a bad label, path or metadata are reported as failed before anything is written; the rest go on."""
    valid = []
    for entry in chunk:
        try:
            valid.append(entry.validated())
        except InvalidInputError as error:
            report.failed.append({"path": str(entry.path), "error": str(error)})
    return valid


def hash_or_error(path: Path) -> tuple[str | None, str | None]:
    try:
        return file_sha256(path), None
    except OSError as error:
        return None, describe_os_error(error)


def update_moved(store: MilvusStore, moved: list[tuple[CatalogEntry, str]]) -> int:
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


def prune_missing(store: MilvusStore, shard: Shard | None = None) -> int:
    """Delete rows whose file no longer exists (only this shard's rows, when sharded)."""
    gone = [
        row["id"]
        for row in store.iter_rows(("id", "path"))
        if (shard is None or shard.contains(row["id"])) and not Path(row["path"]).exists()
    ]
    return store.delete(gone) if gone else 0

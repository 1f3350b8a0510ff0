"""Plan an ingest: settle what the store already holds, and write the rest to a plan file for the decode workers.

Ids are SHA-256 hashes of the file bytes, so a stored image is recognised wherever it moved: unchanged rows are
skipped, moved or relabelled ones are rewritten without re-encoding, and only new content is encoded. The plan
reads no file: a file whose size, mtime and inode match the hash cache (hashes.py) is settled here from its
remembered hash; any other file is read once, by a decode worker, which hashes the bytes it decodes, and is
settled when its batch comes back (`Settler.settle`), before anything is encoded. A file the cache knew with other
content has changed in place: once its new row is stored, the old content's row goes (`drop_replaced`) if it still
names that path.

Several files with the same bytes are one row; the other paths are recorded in its metadata (`record_copies`), so
`imgsearch duplicates` can report them, and a row whose file changed or went keeps its vector under a copy that still
holds those bytes (`_delete_or_move_to_copies`) instead of being deleted.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from imgsearch import storage
from imgsearch.errors import InvalidInputError
from imgsearch.ingest.catalog import CatalogEntry, Shard, as_location, bytes_sha256, file_sha256
from imgsearch.ingest.hashes import HashCache
from imgsearch.ingest.report import IngestReport, ProgressCallback
from imgsearch.storage import FileStamp
from imgsearch.store import ImageRecord, MilvusStore
from imgsearch.validation import is_upload, recorded_copies, user_metadata, with_copies

PLAN_CHUNK = 512  # catalog entries settled against the store at a time


class Settler:
    """Decides, for content whose hash is known, whether it is stored unchanged (skipped), stored under another path
    or label (the row is rewritten without re-encoding), already planned in this run (skipped), or new."""

    def __init__(self, store: MilvusStore, report: IngestReport, relabel_duplicates: bool = False) -> None:
        self.store = store
        self.report = report
        self.relabel_duplicates = relabel_duplicates  # enrolment: stored content under another label takes the new one
        self.planned_ids: set[str] = set()
        self.replaced: dict[str, str] = {}  # path -> the hash its file held before it changed
        self.copies: dict[str, set[str]] = defaultdict(set)  # hash -> other paths holding those bytes
        # Reads see every row stored before the run began; this run's own are in planned_ids.
        self.started = time.time()

    def settle(self, pairs: list[tuple[CatalogEntry, str]]) -> list[tuple[CatalogEntry, str]]:
        """The (entry, hash) pairs to encode; the others are counted and their rows updated."""
        known = self.store.get([digest for _, digest in pairs], fields=("id", "path", "label", "metadata"), as_of=self.started)
        new: list[tuple[CatalogEntry, str]] = []
        moved: list[tuple[CatalogEntry, str]] = []
        for entry, digest in pairs:
            if digest in self.planned_ids:  # new or moved earlier in this run: its row is this run's business
                self.report.skipped += 1
                self.copies[digest].add(str(entry.path))
            elif digest in known:
                row = known[digest]
                # No metadata given (a folder walk, an enrolment): the row keeps what it has.
                same_metadata = entry.metadata is None or user_metadata(row.get("metadata")) == entry.metadata
                same = row["path"] == str(entry.path) and row["label"] == entry.label and same_metadata
                relabel = self.relabel_duplicates and row["label"] != entry.label
                elsewhere = row["path"] != str(entry.path) and storage.exists(row["path"])
                if same:
                    self.report.skipped += 1
                elif elsewhere and not relabel:  # a second copy of stored content is not a move
                    self.report.skipped += 1
                    self.copies[digest].add(str(entry.path))
                else:  # moved, relabelled, or new manifest metadata (update_moved keeps a stored file's path)
                    moved.append((entry, digest))
                    self.planned_ids.add(digest)  # reads see the row as it was before the run (as_of)
            else:
                self.planned_ids.add(digest)
                new.append((entry, digest))
        self.report.updated += update_moved(self.store, moved)
        return new


def new_content(items: list[dict[str, Any]], inputs: Any, settler: Settler) -> tuple[list[dict[str, Any]], Any]:
    """The items of a decoded batch that need encoding, and their rows of `inputs`: files whose hash the plan did
    not know are settled now (stored, moved, or a second copy in this run: not encoded)."""
    unsettled = [index for index, item in enumerate(items) if not item["settled"]]
    if not unsettled:
        return items, inputs
    pairs = [
        (CatalogEntry(as_location(items[i]["path"]), items[i]["label"], items[i]["metadata"], upload=items[i].get("upload", False)), items[i]["id"])
        for i in unsettled
    ]
    to_encode = {id(entry) for entry, _ in settler.settle(pairs)}
    dropped = {index for index, (entry, _) in zip(unsettled, pairs) if id(entry) not in to_encode}
    keep = [index for index in range(len(items)) if index not in dropped]
    if len(keep) == len(items):
        return items, inputs
    return [items[index] for index in keep], (inputs[keep] if keep else None)


def new_row_metadata(item: dict[str, Any]) -> dict[str, Any]:
    """A new row's metadata: what a manifest gave (nothing otherwise), and the upload mark for a file the service stored."""
    return with_copies(item["metadata"] or {}, [], upload=bool(item.get("upload")))[0]


def plan_entries(
    entries: Iterator[CatalogEntry],
    settler: Settler,
    hash_cache: HashCache,
    plan_path: Path,
    progress: ProgressCallback | None,
    shard: Shard | None = None,
) -> int:
    """Settle every entry whose hash the cache knows, and write the rest (new content, or files to read) to the
    plan file; returns how many lines it holds."""
    report = settler.report
    pending = 0
    scanned = 0
    with open(plan_path, "w", encoding="utf-8") as plan:
        while chunk := list(islice(entries, PLAN_CHUNK)):
            chunk = valid_entries(chunk, report)
            stamped: list[tuple[CatalogEntry, FileStamp]] = []
            unstamped = [entry for entry in chunk if entry.stamp is None]  # a bucket's listing stamped the others
            stamps = dict(zip(map(id, unstamped), storage.stat_many([str(entry.path) for entry in unstamped])))
            for entry in chunk:
                stamp = entry.stamp or stamps[id(entry)]
                if isinstance(stamp, BaseException):
                    report.failed.append({"path": str(entry.path), "error": storage.describe_error(stamp)})
                else:
                    stamped.append((entry, stamp))
            remembered, changed = hash_cache.lookup([(str(entry.path), stamp) for entry, stamp in stamped])
            known = [(entry, remembered[str(entry.path)]) for entry, _ in stamped if str(entry.path) in remembered]
            if shard is not None:
                mine = [pair for pair in known if shard.contains(pair[1])]
                report.other_shards += len(known) - len(mine)
                known = mine
            unread = [entry for entry, _ in stamped if str(entry.path) not in remembered]
            lines = [(entry, digest) for entry, digest in settler.settle(known)] + [(entry, None) for entry in unread]
            stamp_of = {str(entry.path): stamp for entry, stamp in stamped}
            for entry, digest in lines:
                item = {"id": digest, "path": str(entry.path), "label": entry.label, "metadata": entry.metadata, "upload": entry.upload}
                if storage.is_url(item["path"]):  # the reader cannot stamp an object: it keeps the listing's stamp
                    item["stamp"] = stamp_of[item["path"]]
                if str(entry.path) in changed:  # the file changed since it was last read: its old row may go
                    item["previous"] = changed[str(entry.path)]
                plan.write(json.dumps(item) + "\n")
            pending += len(lines)
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


def drop_replaced(store: MilvusStore, replaced: dict[str, str]) -> int:
    """Delete the rows of content that a file held before it changed (path -> old hash), where the row still names
    that path and no recorded copy still holds the bytes; a row the old content keeps under another path stays."""
    if not replaced:
        return 0
    rows = store.get(list(set(replaced.values())), fields=("id", "path", "metadata"))
    stale = [rows[digest] for path, digest in replaced.items() if digest in rows and rows[digest]["path"] == path]
    return _delete_or_move_to_copies(store, stale)


def update_moved(store: MilvusStore, moved: list[tuple[CatalogEntry, str]]) -> int:
    """Renamed or relabelled files keep their vector: rewrite the row's fields without re-encoding. An enrolment that
    relabels stored content through another copy of it changes only the label: the row keeps its path, metadata and
    copies, and the new file (if it still exists) is recorded as a copy. A move keeps the copies recorded, less the
    path it moves to. Metadata changes only where a manifest gives it."""
    if not moved:
        return 0
    stored = store.get([digest for _, digest in moved], fields=("id", "vector", "path", "metadata"))
    records = []
    for entry, digest in moved:
        row = stored[digest]
        new_path = str(entry.path)
        keep_path = row["path"] != new_path and storage.exists(row["path"])
        copies = [copy for copy in recorded_copies(row.get("metadata")) if copy != (row["path"] if keep_path else new_path)]
        if keep_path and new_path not in copies and storage.exists(new_path):
            copies.append(new_path)
        given = user_metadata(row.get("metadata")) if entry.metadata is None else entry.metadata
        path = row["path"] if keep_path else new_path
        # The upload mark describes the row's file: kept with its path, taken from the entry when the path changes.
        upload = (path == row["path"] and is_upload(row.get("metadata"))) or (path == new_path and entry.upload)
        metadata, _ = with_copies(given, copies, upload=upload)
        records.append(ImageRecord(id=digest, vector=row["vector"], path=path, label=entry.label, metadata=metadata))
    store.upsert(records)
    return len(moved)


def record_copies(store: MilvusStore, copies: dict[str, set[str]]) -> tuple[int, int]:
    """Add the other paths seen holding a stored row's bytes to its metadata; (paths added, paths left out because
    the row's metadata is full)."""
    if not copies:
        return 0, 0
    rows = store.get(list(copies), fields=("id", "vector", "path", "label", "metadata"))
    added = left_out = 0
    records = []
    for digest, paths in copies.items():
        row = rows.get(digest)
        if row is None:
            continue
        known = recorded_copies(row.get("metadata"))
        new = sorted(paths - set(known) - {row["path"]})
        if not new:
            continue
        metadata, dropped = with_copies(row.get("metadata"), known + new)
        added += len(new) - dropped
        left_out += dropped
        records.append(ImageRecord(id=digest, vector=row["vector"], path=row["path"], label=row["label"], metadata=metadata))
    store.upsert(records)
    return added, left_out


def _delete_or_move_to_copies(store: MilvusStore, rows: list[dict]) -> int:
    """Rows whose file is gone or changed: each moves to its first recorded copy that still holds its bytes
    (the vector stays); the others are deleted. Returns how many were deleted."""
    moved = []
    gone = []
    for row in rows:
        copies = recorded_copies(row.get("metadata"))
        survivor = next((copy for copy in copies if _holds(copy, row["id"])), None)
        if survivor is None:
            gone.append(row["id"])
        else:
            moved.append((row["id"], survivor, [copy for copy in copies if copy != survivor]))  # a copy is never an upload
    if moved:
        full = store.get([digest for digest, _, _ in moved], fields=("id", "vector", "label", "metadata"))
        store.upsert(
            [
                ImageRecord(
                    id=digest, vector=full[digest]["vector"], path=survivor, label=full[digest]["label"],
                    metadata=with_copies(full[digest].get("metadata"), rest, upload=False)[0],
                )
                for digest, survivor, rest in moved
                if digest in full
            ]
        )
    return store.delete(gone) if gone else 0


def _holds(path: str, digest: str) -> bool:
    try:
        if not storage.is_url(path):  # a local file is hashed in blocks, never held whole
            return file_sha256(Path(path)) == digest
        return bytes_sha256(storage.read_bytes(path)[0]) == digest
    except storage.transport_errors():
        return False


def prune_missing(store: MilvusStore, shard: Shard | None = None) -> int:
    """Delete rows whose file no longer exists (only this shard's rows, when sharded); a row with a recorded copy
    that still holds its bytes moves there instead."""
    rows = [row for row in store.iter_rows(("id", "path", "metadata")) if shard is None or shard.contains(row["id"])]
    gone = storage.missing(row["path"] for row in rows)  # objects: from one listing per prefix
    return _delete_or_move_to_copies(store, [row for row in rows if row["path"] in gone])

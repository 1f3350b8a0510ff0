"""Every use of Milvus Lite's private internals, in one file, so it can go when Lite has a public API for them.

Milvus Lite 3.2 (read in its engine/collection.py, and measured: docs/scaling.md) keeps new rows in a memtable
searched by brute force, until 128 MB of them are flushed to a segment; a background thread then compacts segments
(up to 100k rows each) and builds each new segment's HNSW index. A segment is searched by brute force until its index
is built, and the process waits for the builds at exit. There is no public call for this, so these functions reach
the in-process Lite collection; on a server, or a Lite they do not recognise, they do nothing.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any

from imgsearch.config import is_lite_uri
from imgsearch.errors import StoreLockedError


def check_lock(uri: str) -> None:
    """Milvus Lite allows one process per data directory; say so in one line instead of a traceback."""
    lock_path = Path(uri) / "LOCK"
    if not lock_path.is_file():
        return
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLockedError(
                f"{uri} is in use by another process (Milvus Lite allows one process per .db). Stop that process, "
                f"or share the data through a server: `milvus-lite server --data-dir {uri} --port 19540` and "
                "IMGSEARCH_MILVUS_URI=http://127.0.0.1:19540, or a Milvus server URI"
            ) from None
        fcntl.flock(handle, fcntl.LOCK_UN)


def grpc_address(uri: str) -> str | None:
    """The loopback address of the gRPC server pymilvus started in this process for the Lite file `uri`, through
    which another process can reach it; None if there is none."""
    entry = _server(uri)
    return f"http://127.0.0.1:{entry[2]}" if entry else None


def wait_for_index(uri: str, collection: str) -> float:
    """Block until the background index builds are done; the seconds waited (0 when there is nothing to wait for)."""
    lite_collection = _collection(uri, collection)
    if lite_collection is None or not hasattr(lite_collection, "_wait_for_bg"):
        return 0.0
    started = time.perf_counter()
    lite_collection._wait_for_bg()
    return time.perf_counter() - started


def index_coverage(uri: str, collection: str) -> tuple[int, int] | None:
    """(rows that searches reach through an index, all rows, deleted included); None when unknown."""
    lite_collection = _collection(uri, collection)
    try:
        segments = lite_collection._segments_snapshot()
        indexed = sum(segment.num_rows for segment in segments if "vector" in segment.indexes)
        return indexed, sum(segment.num_rows for segment in segments) + lite_collection._memtable.size()
    except AttributeError:
        return None


def _collection(uri: str, collection: str) -> Any:
    entry = _server(uri)
    try:
        return entry[1].get_collection(collection) if entry else None
    except Exception:  # another Lite's internals: no waiting, no coverage, nothing else changes
        return None


def _server(uri: str) -> tuple | None:
    """(gRPC server, database, port) that pymilvus started in this process for a Lite file, or None."""
    if not is_lite_uri(uri):
        return None
    try:
        from milvus_lite.server_manager import server_manager_instance

        entry = server_manager_instance._servers.get(os.path.abspath(uri))
        return entry if isinstance(entry, tuple) and len(entry) == 3 else None
    except Exception:  # another Lite's internals
        return None

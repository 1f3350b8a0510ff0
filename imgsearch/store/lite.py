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
import sys
import time
from pathlib import Path
from typing import Any

from imgsearch.config import is_lite_uri
from imgsearch.errors import StoreLockedError


def check_lock(uri: str) -> None:
    """Milvus Lite allows one process per data directory; say so in one line instead of a traceback, when the lock on
    `uri` is held by another process. Held by this one (a start that failed half-way, say, for lack of file
    descriptors), it says nothing: the caller's own error is the true one."""
    lock_path = Path(uri) / "LOCK"
    if not lock_path.is_file():
        return
    holders = _lock_holders(lock_path)
    if holders is None:  # no /proc/locks: probe the lock instead
        holders = set() if _can_lock(lock_path) else {0}
    holders.discard(os.getpid())
    if holders:
        raise StoreLockedError(
            f"{uri} is in use by another process{_pids(holders)} (Milvus Lite allows one process per .db). Stop that "
            f"process, or share the data through a server: `milvus-lite server --data-dir {uri} --port 19540` and "
            "IMGSEARCH_MILVUS_URI=http://127.0.0.1:19540, or a Milvus server URI"
        )


def _lock_holders(lock_path: Path) -> set[int] | None:
    """The ids of the processes holding a lock on `lock_path`, read from Linux's /proc/locks without touching the
    lock; None where there is no /proc/locks."""
    try:
        stat = lock_path.stat()
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    wanted = (os.major(stat.st_dev), os.minor(stat.st_dev), stat.st_ino)
    holders = set()
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->":  # "->" lines are waiters, not holders
            continue
        major, minor, inode = fields[5].split(":")
        if (int(major, 16), int(minor, 16), int(inode)) == wanted:
            holders.add(int(fields[4]))
    return holders


def _can_lock(lock_path: Path) -> bool:
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def _pids(pids: set[int]) -> str:
    known = sorted(pid for pid in pids if pid > 0)
    return f" (pid {', '.join(map(str, known))})" if known else ""


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


def open_databases() -> list[str]:
    """The Lite files this process serves (pymilvus keeps each one's gRPC server, threads and files until exit)."""
    manager = _manager()
    return list(manager._servers) if manager else []


def release(path: str) -> None:
    """Stop this process's server for the Lite file `path`, unlocking it; clients still open on it stop working."""
    manager = _manager()
    if manager:
        manager.release_server(path)


def _manager() -> Any:
    """pymilvus's Lite server manager when pymilvus has loaded it (this never imports milvus_lite), else None."""
    module = sys.modules.get("milvus_lite.server_manager")
    manager = getattr(module, "server_manager_instance", None)
    return manager if isinstance(getattr(manager, "_servers", None), dict) else None


def _collection(uri: str, collection: str) -> Any:
    entry = _server(uri)
    try:
        return entry[1].get_collection(collection) if entry else None
    except Exception:  # another Lite's internals: no waiting, no coverage, nothing else changes
        return None


def _server(uri: str) -> tuple | None:
    """(gRPC server, database, port) that pymilvus started in this process for a Lite file, or None."""
    manager = _manager()
    if manager is None or not is_lite_uri(uri):
        return None
    entry = manager._servers.get(os.path.abspath(uri))
    return entry if isinstance(entry, tuple) and len(entry) == 3 else None

"""Content hashes remembered by file identity, so a re-ingest reads only the files that changed (as rclip does).

The id of a row stays the SHA-256 of the file's bytes. This cache only saves reading a file to learn it again: a
path whose size, mtime (ns) and inode are those recorded when it was last read maps to the hash of what was read
then; an object's URL, with the size and ETag its listing gives, likewise (the listing is all a re-ingest reads).
It describes files, not collections, so one cache serves every database. It is best effort: a cache that cannot be
opened or written is reported once and the ingest goes on reading files.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

from imgsearch.storage import FileStamp

log = logging.getLogger(__name__)

LOOKUP_CHUNK = 500  # paths per SELECT (SQLite allows 999 parameters in old builds)


def default_hash_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imgsearch" / "file-hashes.sqlite"


def set_aside(path: Path) -> Path:
    """Move a corrupt cache (and its WAL files) to a free `NAME.corrupt-N` name, kept for a post-mortem: it is only a
    cache, but nothing is deleted that a person might want to look at."""
    number = 1
    while (aside := path.with_name(f"{path.name}.corrupt-{number}")).exists():
        number += 1
    for suffix in ("-wal", "-shm"):
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            companion.replace(aside.with_name(aside.name + suffix))
    path.replace(aside)
    return aside


class HashCache:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.connection: sqlite3.Connection | None = None
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._open(path)
            except sqlite3.DatabaseError as error:  # not a database (truncated or overwritten by a crash)
                if isinstance(error, sqlite3.OperationalError):
                    raise  # locked, read-only, no space: the file may be fine
                self.close()
                aside = set_aside(path)
                log.warning("file hash cache %s was corrupt (%s): moved to %s, starting a fresh one", path, error, aside.name)
                self._open(path)
        except (OSError, sqlite3.Error) as error:
            self._give_up(error)

    def _open(self, path: Path) -> None:
        self.connection = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self.connection.execute("PRAGMA journal_mode=WAL")  # concurrent ingests into other databases
        self.connection.execute(
            "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, inode INTEGER, "
            "sha256 TEXT, tag TEXT NOT NULL DEFAULT '')"
        )
        columns = {row[1] for row in self.connection.execute("PRAGMA table_info(files)")}
        if "tag" not in columns:  # a cache written before objects were stamped by ETag
            self.connection.execute("ALTER TABLE files ADD COLUMN tag TEXT NOT NULL DEFAULT ''")

    def lookup(self, stamped: Sequence[tuple[str, FileStamp]]) -> tuple[dict[str, str], dict[str, str]]:
        """(path -> hash for the paths whose stamp is the one recorded, path -> the hash recorded for paths whose file
        has changed since: what the store may still hold for that path)."""
        if self.connection is None or not stamped:
            return {}, {}
        wanted = dict(stamped)
        found: dict[str, str] = {}
        changed: dict[str, str] = {}
        paths = list(wanted)
        try:
            for start in range(0, len(paths), LOOKUP_CHUNK):
                chunk = paths[start : start + LOOKUP_CHUNK]
                rows = self.connection.execute(
                    f"SELECT path, size, mtime_ns, inode, tag, sha256 FROM files WHERE path IN ({','.join('?' * len(chunk))})", chunk
                )
                for path, size, mtime_ns, inode, tag, digest in rows:
                    (found if wanted[path] == (size, mtime_ns, inode, tag) else changed)[path] = digest
        except sqlite3.Error as error:
            self._give_up(error)
        return found, changed

    def remember(self, rows: Iterable[tuple[str, FileStamp, str]]) -> None:
        if self.connection is None:
            return
        values = [(path, stamp.size, stamp.mtime_ns, stamp.inode, digest, stamp.tag) for path, stamp, digest in rows]
        if not values:
            return
        try:
            self.connection.execute("BEGIN")  # one transaction: one sync for the batch, not one per row
            self.connection.executemany("INSERT OR REPLACE INTO files (path, size, mtime_ns, inode, sha256, tag) VALUES (?, ?, ?, ?, ?, ?)", values)
            self.connection.execute("COMMIT")
        except sqlite3.Error as error:
            self._give_up(error)

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def _give_up(self, error: Exception) -> None:
        log.warning("file hash cache %s unusable (%s); files are read to hash them", self.path, error)
        if self.connection is not None:
            self.connection.close()
        self.connection = None

"""Which stored files the service may read, and how its answers show their paths."""

from __future__ import annotations

import os
import time
from pathlib import Path

from imgsearch import storage


class ServedFiles:
    """Which stored paths the service may read, and how answers show them.

    Only files whose real location (symlinks and `..` resolved) lies under a root are served: the folders that
    were ingested or enrolled, recorded with the collection, and the upload directory. An object's URL is served
    only when it is plain (no `..`, `//`, percent-encoding: storage.normalised_key) and lies under a recorded
    bucket prefix. A path recorded in any other way (an imported Parquet file, say) is data, never a licence to
    read that file."""

    REFRESH_SECONDS = 5.0  # roots recorded by a concurrent `imgsearch ingest` are seen within this

    def __init__(self, store, upload_dir: str | Path, answer_paths: str) -> None:
        self.store = store
        self.upload_dir = str(upload_dir).rstrip("/") if storage.is_url(upload_dir) else os.path.abspath(upload_dir)
        self.absolute = answer_paths == "absolute"
        self.roots: list[str] = []
        self.real_roots: list[Path] = []
        self.loaded_at = -float("inf")
        self.refresh()

    def refresh(self) -> None:
        self.roots = sorted({*self.store.roots(), self.upload_dir}, key=len, reverse=True)  # innermost first
        self.real_roots = [Path(root).resolve() for root in self.roots if not storage.is_url(root)]
        self.loaded_at = time.monotonic()

    def _root_of(self, path: str) -> str | None:
        for attempt in range(2):
            for root in self.roots:  # a folder or bucket prefix, or one file enrolled or ingested by itself
                separator = "/" if storage.is_url(root) else os.sep
                if path == root or path.startswith(root.rstrip(separator) + separator):
                    return root
            if attempt == 0 and time.monotonic() - self.loaded_at > self.REFRESH_SECONDS:
                self.refresh()
            else:
                break
        return None

    def shown(self, path: str) -> str:
        """The path an answer carries: relative to its root (or only the file name outside every root), or as
        stored when answer_paths is absolute."""
        if self.absolute or not path:
            return path
        root = self._root_of(path)
        if storage.is_url(path):
            return path[len(root.rstrip("/")) + 1:] if root and root != path else path.rsplit("/", 1)[-1]
        return os.path.relpath(path, root) if root and root != path else os.path.basename(path)

    def servable(self, path: str) -> Path | str | None:
        """The local file (resolved) or the object's URL the service may read for a row's path; None otherwise.
        An object's existence is found out when it is read."""
        if not path or "\0" in path:
            return None
        if storage.is_url(path):
            if storage.normalised_key(path) != path:
                return None
            root = self._root_of(path)
            return path if root is not None and storage.is_url(root) else None
        if self._root_of(path) is None and time.monotonic() - self.loaded_at > self.REFRESH_SECONDS:
            self.refresh()
        real = Path(path).resolve()
        if any(real.is_relative_to(root) for root in self.real_roots) and real.is_file():
            return real
        return None

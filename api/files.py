"""Which stored files the service may read, and how its answers show their paths."""

from __future__ import annotations

import os
import time
from pathlib import Path


class ServedFiles:
    """Which stored paths the service may read, and how answers show them.

    Only files whose real location (symlinks and `..` resolved) lies under a root are served: the folders that
    were ingested or enrolled, recorded with the collection, and the upload directory. A path recorded in any
    other way (an imported Parquet file, say) is data, never a licence to read that file."""

    REFRESH_SECONDS = 5.0  # roots recorded by a concurrent `imgsearch ingest` are seen within this

    def __init__(self, store, upload_dir: Path, answer_paths: str) -> None:
        self.store = store
        self.upload_dir = os.path.abspath(upload_dir)
        self.absolute = answer_paths == "absolute"
        self.roots: list[str] = []
        self.real_roots: list[Path] = []
        self.loaded_at = -float("inf")
        self.refresh()

    def refresh(self) -> None:
        self.roots = sorted({*self.store.roots(), self.upload_dir}, key=len, reverse=True)  # innermost first
        self.real_roots = [Path(root).resolve() for root in self.roots]
        self.loaded_at = time.monotonic()

    def _root_of(self, path: str) -> str | None:
        for attempt in range(2):
            for root in self.roots:  # a folder, or one file enrolled or ingested by itself
                if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
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
        return os.path.relpath(path, root) if root and root != path else os.path.basename(path)

    def servable(self, path: str) -> Path | None:
        if not path or "\0" in path:
            return None
        if self._root_of(path) is None and time.monotonic() - self.loaded_at > self.REFRESH_SECONDS:
            self.refresh()
        real = Path(path).resolve()
        if any(real.is_relative_to(root) for root in self.real_roots) and real.is_file():
            return real
        return None

"""Walk a catalog folder or read a manifest; hash file contents for content-addressed ids."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgsearch.errors import CatalogError
from imgsearch.images import find_images

HASH_BLOCK = 1 << 20


@dataclass
class CatalogEntry:
    path: Path  # absolute
    label: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: the images whose content hash, read as a number, is `index` modulo `count`.
    Every image falls in exactly one shard, and copies of the same content in the same one, so n processes
    or machines, each ingesting the whole catalog with its own shard, fill one collection with no overlap."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        index, slash, count = text.partition("/")
        try:
            shard = cls(int(index), int(count))
        except ValueError:
            shard = None
        if not slash or shard is None or shard.count < 1 or not 0 <= shard.index < shard.count:
            raise CatalogError(f"--shard must be I/N with 0 <= I < N (e.g. 0/3, 1/3, 2/3), not {text!r}")
        return shard

    def contains(self, digest: str) -> bool:
        return int(digest[:16], 16) % self.count == self.index


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def folder_label(path: Path, root: Path) -> str:
    """The parent folder relative to the catalog root ('' for files directly in it)."""
    parent = path.parent.relative_to(root)
    return "" if parent == Path(".") else parent.as_posix()


def check_catalog(root: Path, manifest: Path | None = None) -> None:
    if not Path(root).exists():
        raise CatalogError(f"catalog path not found: {Path(root).resolve()}")
    if manifest is not None and not Path(manifest).is_file():
        raise CatalogError(f"manifest not found: {manifest}")


def scan_catalog(root: Path, *, use_labels: bool = True, manifest: Path | None = None) -> Iterator[CatalogEntry]:
    check_catalog(root, manifest)
    root = Path(root).resolve()
    if manifest is not None:
        yield from read_manifest(Path(manifest), root if root.is_dir() else root.parent)
        return
    if root.is_file():
        yield CatalogEntry(path=root)
        return
    for path in find_images([root]):
        yield CatalogEntry(path=path.resolve(), label=folder_label(path, root) if use_labels else "")


def read_manifest(manifest: Path, root: Path) -> Iterator[CatalogEntry]:
    """CSV with a header, or JSON lines: `path` (relative to the catalog root or absolute), `label`, extra fields -> metadata."""
    suffix = manifest.suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows(manifest)
    elif suffix in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(manifest)
    else:
        raise CatalogError(f"manifest {manifest} must be .csv or .jsonl")
    for line, row in rows:
        raw_path = row.pop("path", None)
        if not raw_path:
            raise CatalogError(f"{manifest}:{line}: no 'path' value")
        label = row.pop("label", "") or ""
        path = Path(str(raw_path))
        yield CatalogEntry(path=(path if path.is_absolute() else root / path).resolve(), label=str(label), metadata=row)


def _csv_rows(manifest: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(manifest, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise CatalogError(f"{manifest}: the CSV header must name a 'path' column")
        for row in reader:
            yield reader.line_num, {key: value for key, value in row.items() if key is not None}


def _jsonl_rows(manifest: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(manifest, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise CatalogError(f"{manifest}:{line_number}: invalid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise CatalogError(f"{manifest}:{line_number}: each line must be a JSON object")
            yield line_number, row

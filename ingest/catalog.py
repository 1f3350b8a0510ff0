"""Walk a catalog folder or bucket prefix, or read a manifest; hash file contents for content-addressed ids."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from imgsearch import storage
from imgsearch.errors import CatalogError, InvalidInputError
from imgsearch.images import IMAGE_EXTENSIONS, find_images
from imgsearch.storage import FileStamp
from imgsearch.validation import validate_label, validate_metadata, validate_path_text

HASH_BLOCK = 1 << 20


Location = Path | str  # a local path, or an object's URL (imgsearch/storage.py)


@dataclass
class CatalogEntry:
    path: Location  # absolute, as walked (a symlink keeps its own path, so removing the link prunes its row), or a URL
    label: str = ""
    # What a manifest gave; None where nothing does (a folder walk, an enrolment, an upload): a stored row keeps the
    # metadata it has, so a plain re-ingest never wipes what a manifest once gave.
    metadata: dict[str, Any] | None = None
    error: str | None = None  # a manifest row that cannot be used; reported as failed, never written
    upload: bool = False  # the service stored this file (content-named under its upload folder): it may be removed with its row
    stamp: FileStamp | None = None  # an object's size and ETag from the listing that found it: the plan need not ask again

    def validated(self) -> CatalogEntry:
        """This entry with its label normalised, or InvalidInputError saying what is wrong with it."""
        if self.error:
            raise InvalidInputError(self.error)
        validate_path_text(str(self.path))
        metadata = None if self.metadata is None else validate_metadata(self.metadata)
        return CatalogEntry(self.path, validate_label(self.label), metadata, upload=self.upload, stamp=self.stamp)


def as_location(text: str) -> Location:
    """A stored path as the catalog code takes it: a URL stays text, a local path becomes a Path."""
    return text if storage.is_url(text) else Path(text)


def absolute(path: str | os.PathLike[str]) -> Location:
    """The absolute form of a walked path: `..` removed, symlinks kept (unlike Path.resolve); a URL as it is."""
    if storage.is_url(path):
        return str(path).rstrip("/")
    return Path(os.path.abspath(path))


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: the images whose content hash, read as a number, is `index` modulo `count`.
    Every image falls in exactly one shard, and copies of the same content in the same one, so n processes
    or machines, each ingesting the whole catalog with its own shard, fill one collection with no overlap."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
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


def check_catalog(root: Location, manifest: Location | None = None) -> None:
    """A missing folder, bucket or manifest, refused credentials or an unreachable store: one error, before any
    model is loaded or collection created."""
    for location in (root, manifest):
        if location is not None and storage.is_url(location):
            with storage.reaching(str(location)):
                if location is manifest:
                    storage.stat(str(location))
                else:
                    _list_first(str(location))
    if storage.is_url(root):
        if manifest is not None and not storage.is_url(manifest) and not Path(manifest).is_file():
            raise CatalogError(f"manifest not found: {manifest}")
        return
    if not Path(root).exists():
        raise CatalogError(f"catalog path not found: {Path(root).resolve()}")
    if manifest is not None and not storage.is_url(manifest) and not Path(manifest).is_file():
        raise CatalogError(f"manifest not found: {manifest}")


def _list_first(url: str) -> None:
    """Raises the store's error for a bucket or prefix that is missing or refused; an existing empty prefix passes."""
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        raise FileNotFoundError(url)


def scan_catalog(root: Location, *, use_labels: bool = True, manifest: Location | None = None) -> Iterator[CatalogEntry]:
    check_catalog(root, manifest)
    root = absolute(root)
    if manifest is not None:
        yield from read_manifest(manifest, catalog_folder(root))
        return
    if isinstance(root, str):  # an object-store prefix (or one object)
        for url, stamp in storage.list_images(root, IMAGE_EXTENSIONS):
            yield CatalogEntry(path=url, label=storage.label_of(url, root) if use_labels and url != root else "", stamp=stamp)
        return
    if root.is_file():
        yield CatalogEntry(path=root)
        return
    for path in find_images([root]):
        yield CatalogEntry(path=absolute(path), label=folder_label(path, root) if use_labels else "")


def catalog_folder(path: Location) -> Location:
    """The folder a catalog argument stands for: itself, or the folder of a single file (a URL: the prefix itself)."""
    path = absolute(path)
    if isinstance(path, str):
        return path
    return path if path.is_dir() else path.parent


def read_manifest(manifest: Location, root: Location) -> Iterator[CatalogEntry]:
    """CSV with a header, or JSON lines: `path` (relative to the catalog root, absolute, or an object's URL),
    `label`, extra fields -> metadata. The manifest itself may be an object."""
    suffix = PurePosixPath(str(manifest)).suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows(manifest)
    elif suffix in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(manifest)
    else:
        raise CatalogError(f"manifest {manifest} must be .csv or .jsonl")
    for line, row in rows:
        if isinstance(row, str):  # a line that is not a JSON object: a failed row, the others still count
            yield CatalogEntry(path=Path(f"{manifest}:{line}"), error=row)
            continue
        raw_path = row.pop("path", None)
        if not isinstance(raw_path, str) or not raw_path or "\0" in raw_path:
            yield CatalogEntry(path=Path(f"{manifest}:{line}"), error="no usable 'path' value")
            continue
        label = row.pop("label", "")
        label = "" if label is None else label if isinstance(label, str) else json.dumps(label)
        location = manifest_location(root, raw_path)
        if location is None:
            yield CatalogEntry(path=f"{manifest}:{line}", error="an object's path must not hold '..', '//' or percent-encoding")
            continue
        yield CatalogEntry(path=location, label=label, metadata=row)


def manifest_location(root: Location, raw_path: str) -> Location | None:
    """A manifest's `path` value: a URL as given, else relative to the catalog root (a folder or a URL prefix);
    None for an object path with `..`, `//` or percent-encoding, which would name some other object."""
    if storage.is_url(raw_path):
        return storage.normalised_key(raw_path)
    if isinstance(root, str):
        return storage.normalised_key(f"{root}/{raw_path.lstrip('/')}")
    return absolute(root / raw_path)


def _csv_rows(manifest: Location) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, row), or (line number, what is wrong with it) for a record the csv module refuses."""
    # Bytes that are not UTF-8 survive as surrogates, so validation fails that row alone.
    with storage.open_text(str(manifest)) as handle:
        reader = csv.DictReader(handle)
        try:
            fieldnames = reader.fieldnames
        except csv.Error as error:
            raise CatalogError(f"{manifest}: unreadable CSV header ({error})") from None
        if not fieldnames or "path" not in fieldnames:
            raise CatalogError(f"{manifest}: the CSV header must name a 'path' column")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as error:  # e.g. a field over the csv module's 128 KiB limit: that record fails alone
                yield reader.line_num + 1, f"unreadable CSV record ({error})"  # raised before line_num counts it
                continue
            yield reader.line_num, {key: value for key, value in row.items() if key is not None}


def _jsonl_rows(manifest: Location) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, row), or (line number, what is wrong with it) for a line that is not a JSON object."""
    with storage.open_text(str(manifest)) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                yield line_number, f"invalid JSON ({error.msg})"
                continue
            yield line_number, row if isinstance(row, dict) else "each line must be a JSON object"

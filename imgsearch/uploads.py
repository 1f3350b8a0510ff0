"""Files the REST service stores at upload: content-named `<upload dir>/ab/<sha256>.<ext>` and marked as uploads on
their rows. The upload dir is a folder, or an object-store URL that several service replicas share. They are the
only files imgsearch ever removes (with their row, when nothing else refers to them); every other file, a catalog
under the upload folder included, is the user's."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

from imgsearch import storage
from imgsearch.errors import SPACE_ERRNOS, CatalogError, ObjectStoreUnavailableError, StorageFullError
from imgsearch.images import FORMAT_SUFFIXES
from imgsearch.ingest.catalog import Location, bytes_sha256
from imgsearch.validation import is_upload

log = logging.getLogger(__name__)

UNKNOWN_SUFFIX = ".img"
UPLOAD_SUFFIXES = frozenset(FORMAT_SUFFIXES.values()) | {UNKNOWN_SUFFIX}


def upload_path(upload_dir: str | Path, digest: str, image_format: str) -> Location:
    name = f"{digest}{FORMAT_SUFFIXES.get(image_format, UNKNOWN_SUFFIX)}"
    if storage.is_url(upload_dir):
        return f"{str(upload_dir).rstrip('/')}/{digest[:2]}/{name}"
    return Path(upload_dir).resolve() / digest[:2] / name


def save_upload(data: bytes, image_format: str, upload_dir: str | Path) -> tuple[Location, str]:
    """Content-addressed: upload_dir/ab/abcdef….png, whatever the label or the client's file name says."""
    digest = bytes_sha256(data)
    path = upload_path(upload_dir, digest, image_format)
    if isinstance(path, str):  # an object: a PUT is whole or nothing, and the same content has the same name
        try:
            with storage.reaching(str(upload_dir)):
                storage.write_bytes(path, data)
        except CatalogError:  # the service's own upload bucket is missing: its setup, not the request, is wrong
            raise ObjectStoreUnavailableError(f"the upload location {upload_dir} does not exist (IMGSEARCH_UPLOAD_DIR)") from None
        return path, digest
    if not path.exists():
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")  # concurrent uploads of one content
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial.write_bytes(data)
            partial.replace(path)  # a crash never leaves a half-written file under the final name
        except OSError as error:
            partial.unlink(missing_ok=True)  # a failed write leaves nothing behind
            if error.errno in SPACE_ERRNOS:
                raise StorageFullError(f"no space to store the upload in the upload folder (IMGSEARCH_UPLOAD_DIR): {error.strerror}") from None
            raise
    return path, digest


def save_uploads(uploads: Sequence[tuple[bytes, str]], upload_dir: str | Path) -> list[tuple[Location, str]]:
    """save_upload for each (bytes, image format); if one fails, the files this call created are removed again, so a
    refused request leaves nothing behind."""
    saved, created = [], []
    try:
        for data, image_format in uploads:
            existed = _exists(upload_path(upload_dir, bytes_sha256(data), image_format))
            path, digest = save_upload(data, image_format, upload_dir)
            saved.append((path, digest))
            if not existed:
                created.append(path)
    except BaseException:
        for path in created:
            remove_upload(path)
        raise
    return saved


def _exists(path: Location) -> bool:
    return storage.exists(path) if isinstance(path, str) else path.exists()


def removable_upload(row: dict, upload_dir: str | Path) -> Location | None:
    """The row's file if the service stored it: the row is marked as an upload and its path is exactly the
    content-named file for its id under `upload_dir` (no link on the way). None for any other file."""
    if not is_upload(row.get("metadata")) or not row.get("path"):
        return None
    if storage.is_url(upload_dir):
        expected = {upload_path(upload_dir, row["id"], image_format) for image_format in FORMAT_SUFFIXES} | {upload_path(upload_dir, row["id"], "")}
        return row["path"] if row["path"] in expected else None
    path = Path(row["path"])
    expected = Path(upload_dir).resolve() / row["id"][:2]
    if path.parent != expected or path.stem != row["id"] or path.suffix not in UPLOAD_SUFFIXES:
        return None
    if path.is_symlink() or path.resolve() != path or not path.is_file():
        return None
    return path


def remove_upload(path: Location) -> None:
    """Remove a file removable_upload returned; one already gone is fine."""
    try:
        storage.remove(str(path))
    except FileNotFoundError:
        pass


def warn_if_overlapping(catalog: str | os.PathLike[str], upload_dir: str | Path) -> bool:
    """Log a warning when a catalog and the upload folder overlap (either inside the other); True if they do."""
    if storage.is_url(catalog) or storage.is_url(upload_dir):
        catalog_text, uploads_text = str(catalog).rstrip("/") + "/", str(upload_dir).rstrip("/") + "/"
        overlapping = catalog_text.startswith(uploads_text) or uploads_text.startswith(catalog_text)
    else:
        catalog_path, uploads = Path(catalog).resolve(), Path(upload_dir).resolve()
        overlapping = catalog_path.is_relative_to(uploads) or uploads.is_relative_to(catalog_path)
    if not overlapping:
        return False
    log.warning(
        "%s overlaps the service's upload folder %s (IMGSEARCH_UPLOAD_DIR): its files are ingested as catalog files, "
        "which imgsearch never deletes; keep catalogs and uploads apart", catalog, upload_dir,
    )
    return True

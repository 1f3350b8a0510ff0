"""Labeled references and uploads enter the store through the ingest pipeline: enrolment from files (CLI) and
uploads stored content-addressed (API)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from imgsearch.config import Settings
from imgsearch.encoders import Encoder
from imgsearch.images import check_paths_exist, find_images
from imgsearch.ingest.catalog import CatalogEntry, absolute
from imgsearch.ingest.pipeline import IngestReport, ingest_entries, ingest_options
from imgsearch.store import MilvusStore, label_is
from imgsearch.uploads import save_uploads
from imgsearch.validation import recorded_copies, validate_label


def enroll_paths(
    encoder: Encoder, store: MilvusStore, label: str, paths: Iterable[str | Path], settings: Settings
) -> IngestReport:
    """Upsert labeled references. Ids are content hashes, so re-enrolling is a no-op, and content already stored
    (under any path or label) takes this label without re-encoding."""
    label = validate_label(label, required=True)
    paths = check_paths_exist(paths)
    store.add_roots(absolute(path) for path in paths)  # a file given alone is a root by itself, not its folder
    entries = [CatalogEntry(path=absolute(path), label=label) for path in find_images(paths)]
    report = ingest_entries(
        entries, encoder, store, relabel_duplicates=True, **ingest_options(settings)
    )
    enrolled = {str(entry.path) for entry in entries}
    rows = store.iter_rows(("id", "path", "metadata"), filter=label_is(label))
    # stored content that was relabelled keeps its own path and records the enrolled file as a copy
    ids = [row["id"] for row in rows if enrolled.intersection([row["path"], *recorded_copies(row.get("metadata"))])]
    return _checked(store, label, ids, report)


def _checked(store: MilvusStore, label: str, ids: list[str], report: IngestReport) -> IngestReport:
    """The enrolment check (recognition/enrolment_check.py) of the references just enrolled, in the report."""
    from imgsearch.recognition.enrolment_check import check_enrolment

    check = check_enrolment(store, label, ids)
    report.enrolment_check = check.to_dict() if check else None
    return report


def store_uploads(
    uploads: Sequence[tuple[bytes, str]], label: str, encoder: Encoder, store: MilvusStore, settings: Settings,
    *, relabel: bool,
) -> tuple[list[str], IngestReport]:
    """Save (bytes, image format) uploads under settings.upload_dir and ingest them with `label`; returns their ids.
    `relabel` (enrolment): stored content under another label takes this one."""
    saved = save_uploads(uploads, settings.upload_dir)
    entries = [CatalogEntry(path=path, label=label, upload=True) for path, _ in saved]
    ids = [digest for _, digest in saved]
    store.add_roots([absolute(settings.upload_dir)])
    report = ingest_entries(
        entries, encoder, store, relabel_duplicates=relabel, workers=0, batch_size=settings.batch_size,
        max_pixels=settings.max_image_pixels, hash_cache=settings.hash_cache,
        wait_for_index=False,  # Lite indexes in the background meanwhile
        calibrate=False,  # the service recalibrates off the request (api/service.py: Recalibration)
        seal=False,  # a server's write-ahead log keeps the rows; sealing took 2.5-3 s of every upload
    )
    if relabel and label:
        _checked(store, label, ids, report)
    return ids, report

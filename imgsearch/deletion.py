"""Deleting stored images: by id, by filter, or from a JSON file (`duplicates --json` groups, a list of ids). The
CLI's `delete` and the API's `DELETE /images/{id}` call `delete_images`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgsearch.duplicates import EDITED, IDENTICAL
from imgsearch.errors import CatalogError, ImageNotFoundError, InvalidInputError
from imgsearch.validation import validate_id

if TYPE_CHECKING:  # reading --from-json needs no Milvus client
    from imgsearch.store import MilvusStore

MAX_JSON_BYTES = 64 << 20  # a --from-json file is read whole
CONFIRM_SHARE = 0.5  # a --filter or --from-json selection of more than this share of the rows is confirmed first


@dataclass
class DeleteReport:
    deleted: list[dict[str, Any]] = field(default_factory=list)  # id, path, label, file_removed
    missing: list[str] = field(default_factory=list)  # asked for, not stored
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"deleted": self.deleted, "missing": self.missing, "dry_run": self.dry_run}

    def summary_line(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        files = sum(1 for row in self.deleted if row["file_removed"])
        return f"{verb} {len(self.deleted)} images ({files} uploaded files with them); {len(self.missing)} ids not stored"


def stored_image(store: MilvusStore, image_id: str) -> dict:
    try:
        image_id = validate_id(image_id)
    except InvalidInputError:
        raise ImageNotFoundError("no stored image with that id") from None
    row = store.get([image_id]).get(image_id)
    if row is None:
        raise ImageNotFoundError("no stored image with that id")
    return row


def delete_images(
    store: MilvusStore, ids: Iterable[str], upload_dir: str | Path, *, dry_run: bool = False, recalibrate: bool = True,
    review: MilvusStore | None = None, confirm: Callable[[str], None] | None = None,
) -> DeleteReport:
    """Delete the rows, and each row's file when the service stored it at upload (uploads.py: marked on the row and
    content-named under `upload_dir`; every other file is the user's) and no kept review query still uses it.
    Unknown ids are reported. `review`: the review collection if the caller holds it open (the service).
    `confirm`: called with a question before deleting a sweeping selection (sweeping_selection); it raises to refuse.
    `recalibrate`: when labeled rows went, recompute the self-calibrated "unknown" threshold (the service does it
    in the background instead: at 100k references it takes about a minute)."""
    from imgsearch.uploads import removable_upload, remove_upload

    wanted = list(dict.fromkeys(validate_id(image_id) for image_id in ids))
    rows = store.get(wanted)
    report = DeleteReport(missing=[image_id for image_id in wanted if image_id not in rows], dry_run=dry_run)
    found = [rows[image_id] for image_id in wanted if image_id in rows]
    if confirm is not None and not dry_run and (question := sweeping_selection(len(found), store.count())):
        confirm(question)
    files = {row["id"]: removable_upload(row, upload_dir) for row in found}
    in_review = _review_paths(store, review, [row_id for row_id, path in files.items() if path is not None])
    try:
        if found and not dry_run:
            store.delete([row["id"] for row in found])
        for row in found:
            path = files[row["id"]]
            removable = path is not None and str(path) not in in_review.get(row["id"], ())
            if removable and not dry_run:
                remove_upload(path)
            report.deleted.append({"id": row["id"], "path": row["path"], "label": row["label"], "file_removed": removable})
        if recalibrate and not dry_run:  # references went, or an earlier deletion stopped before recalibrating "unknown"
            from imgsearch.recognition.abstention import calibration_is_stale, self_calibrate

            if any(row["label"] for row in found) or calibration_is_stale(store):
                self_calibrate(store)
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM: the CLI's one line says how far it got
        if len(report.deleted) == len(found):  # the rows and files went; "unknown" was being recomputed
            interrupt.done = f'{report.summary_line()}; "unknown" not recomputed yet (the next ingest, enroll or delete does it)'
        else:
            interrupt.done = f"{len(found)} images selected, perhaps partly deleted; the same command again finishes"
        raise
    return report


def _review_paths(store: MilvusStore, review: MilvusStore | None, ids: list[str]) -> dict[str, set[str]]:
    """The files kept review queries of these ids use (an upload kept for review shares the row's content-named file)."""
    if not ids:
        return {}
    from imgsearch.recognition.review import review_store

    opened = review is None
    review = review or review_store(store, create=False)
    if review is None:
        return {}
    try:
        return {row_id: {row["path"]} for row_id, row in review.get(ids, fields=("id", "path")).items()}
    finally:
        if opened:
            review.close()


def sweeping_selection(selected: int, total: int) -> str | None:
    """What to confirm when a selection takes every stored row or more than CONFIRM_SHARE of them (a filter like
    `true`, a duplicates listing at threshold 0); None for one that needs no confirming."""
    if selected and selected >= total:
        return f"this selects all {total} stored images"
    if selected > CONFIRM_SHARE * total:
        return f"this selects {selected} of the {total} stored images"
    return None


def ids_matching(store: MilvusStore, filter: str) -> list[str]:
    """Ids of the rows a Milvus boolean expression selects (an empty filter selects nothing, never everything)."""
    if not filter.strip():
        raise InvalidInputError("--filter is empty; to delete everything, drop the collection instead")
    return [row["id"] for row in store.iter_rows(("id",), filter=filter)]


def ids_from_json(path: Path, include_similar: bool = False) -> tuple[list[str], int, int]:
    """Ids to delete from a JSON file: `duplicates --json` output (every group's members, never its representative),
    a list of ids, or a list of objects with an "id". Identical copies (members with `copy_of`) are files that share
    a stored row's id, not rows: they are skipped, and counted (second value), so deleting them never deletes the
    row they copy. Unverified look-alikes (the `similar` list, or any member graded similar) are different pictures:
    skipped and counted (third value) unless `include_similar`."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CatalogError(f"{path} is larger than {MAX_JSON_BYTES >> 20} MiB")
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise CatalogError(f"cannot read {path}: {error.strerror or error}") from None
    except ValueError as error:
        raise CatalogError(f"{path} is not JSON: {error}") from None
    except RecursionError:
        raise CatalogError(f"{path} is nested too deeply to be a list of ids or `duplicates --json` output") from None
    copies = lookalikes = 0
    if isinstance(data, dict) and isinstance(data.get("groups"), list):
        items = []
        similar = data.get("similar") if isinstance(data.get("similar"), list) else []
        for group in data["groups"] + similar:
            if not isinstance(group, dict):
                continue
            representative = group.get("representative")
            kept = representative.get("id") if isinstance(representative, dict) else None
            for member in group.get("members") or []:
                if isinstance(member, dict) and (member.get("copy_of") or member.get("id") == kept):
                    copies += 1
                elif not include_similar and (not isinstance(member, dict) or member.get("grade") not in (IDENTICAL, EDITED)):
                    lookalikes += 1
                else:
                    items.append(member)
    elif isinstance(data, list):
        items = data
    else:
        raise CatalogError(f"{path}: expected `imgsearch duplicates --json` output or a list of ids")
    ids = [item.get("id") if isinstance(item, dict) else item for item in items]
    bad = [item for item in ids if not isinstance(item, str)]
    if bad:
        raise CatalogError(f"{path}: {len(bad)} entries have no id")
    return ids, copies, lookalikes

"""The review loop: queries that recognition answered "unknown" are kept (`recognize --keep-unknown`, the API's
`keep_unknown`), listed in groups of similar images (`imgsearch review`, `GET /review`), and become references
only when someone names them (`enroll LABEL --from-review`, `POST /review/enroll`).

Kept queries live in a collection of their own, `<collection>_review`, with the same model: never searched as
references, never recognised against. Their vector is kept, so enrolling them encodes nothing.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgsearch.duplicates import find_duplicates
from imgsearch.errors import CollectionNotFoundError, InvalidInputError
from imgsearch.ingest.catalog import CatalogEntry, as_location
from imgsearch.ingest.plan import update_moved
from imgsearch.recognition.abstention import self_calibrate
from imgsearch.recognition.enrolment_check import check_enrolment
from imgsearch.storage import is_url
from imgsearch.store import PRECISION_PROPERTY, UNRECORDED_PRECISION, ImageRecord, MilvusStore
from imgsearch.validation import ID_LENGTH, UPLOAD_KEY, is_upload, validate_label

REVIEW_SUFFIX = "_review"
GROUP_KEY_PREFIX = "g"
GROUP_KEY_HEX = 10
GROUP_SIMILARITY = 0.80  # kept queries at least this similar to a group's first one are listed together
MIN_ID_PREFIX = 8


def review_store(store: MilvusStore, *, create: bool = True) -> MilvusStore | None:
    """The review collection beside `store` (None when it does not exist and `create` is False), made for the
    encoder that recognises against `store`: its precision, else the one `store` records."""
    precision = store.precision or store.properties().get(PRECISION_PROPERTY, UNRECORDED_PRECISION)
    try:
        return MilvusStore(
            store.uri, store.collection + REVIEW_SUFFIX, model=store.model, dim=store.dim,
            preprocess_version=store.preprocess_version, precision=precision, weights=store.weights, token=store.token, create=create,
        )
    except CollectionNotFoundError:
        return None


class OpenedReview:
    """The review collection of a long-lived process (the service), opened once by the first request that needs it.
    Requests run in threads: two first ones would each open it, and one could read the collection while the other is
    still creating and loading it, so the first opens it under a lock and the others wait."""

    def __init__(self, store: MilvusStore) -> None:
        self.store = store
        self._review: MilvusStore | None = None
        self._lock = threading.Lock()

    def get(self, *, create: bool = True) -> MilvusStore | None:
        """The review collection; None while it does not exist and `create` is False."""
        with self._lock:
            if self._review is None:
                self._review = review_store(self.store, create=create)
            return self._review

    def close(self) -> None:
        with self._lock:
            if self._review is not None:
                self._review.close()
                self._review = None


@dataclass
class Kept:
    id: str  # the SHA-256 of the query's bytes
    path: str  # where its file is: as given to the CLI, or the service's content-named upload
    vector: np.ndarray
    confidence: float
    nearest: str  # the label that scored best, though not well enough
    upload: bool = False  # the file is one the service stored (imgsearch/uploads.py)


def admit(review: MilvusStore, ids: list[str], limit: int) -> set[str]:
    """Which of `ids` the review collection takes: the ones it already holds (the same bytes again) and new ones
    while it holds fewer than `limit`. The limit bounds what `GET /review` reads and the uploads the service keeps."""
    ids = list(dict.fromkeys(ids))
    held = set(review.get(ids, fields=("id",)))
    room = max(0, limit - review.count())
    return held | set([row_id for row_id in ids if row_id not in held][:room])


def keep_unknown(review: MilvusStore, kept: list[Kept], limit: int) -> set[str]:
    """Store "unknown" queries for review, up to `limit` in the collection; returns the ids kept."""
    admitted = admit(review, [item.id for item in kept], limit)
    store_admitted(review, [item for item in kept if item.id in admitted])
    return admitted


def store_admitted(review: MilvusStore, kept: list[Kept]) -> None:
    """Upsert kept queries that `admit` let in (the same bytes again: one row)."""
    if not kept:
        return
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    review.upsert([
        ImageRecord(
            id=item.id, vector=item.vector, path=item.path, label="",
            metadata={
                "confidence": round(float(item.confidence), 6), "nearest": item.nearest, "kept_at": now,
                **({UPLOAD_KEY: True} if item.upload else {}),
            },
        )
        for item in kept
    ])


def full_note(not_kept: int, limit: int) -> str:
    return (
        f"{not_kept} unknown images not kept for review: it holds its limit of {limit} (IMGSEARCH_REVIEW_MAX); "
        "enrol some (`imgsearch enroll LABEL --from-review KEY`) to make room"
    )


@dataclass
class ReviewGroup:
    number: int  # 1-based, in the order listed: for reading only, it changes as queries are kept
    key: str  # "g" + 10 hex of its members' ids: what `--from-review` selects; another listing of other members has another key
    members: list[dict[str, Any]] = field(default_factory=list)  # id, path, confidence, nearest, kept_at

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.number, "key": self.key, "members": self.members}


def group_key(ids: list[str]) -> str:
    return GROUP_KEY_PREFIX + hashlib.sha256(",".join(sorted(ids)).encode()).hexdigest()[:GROUP_KEY_HEX]


def review_groups(review: MilvusStore | None) -> list[ReviewGroup]:
    """The kept queries in groups of similar images (largest first), then each one left alone (by path)."""
    if review is None:
        return []
    rows = {row["id"]: row for row in review.iter_rows(("id", "path", "metadata"))}
    if not rows:
        return []
    grouped: list[list[str]] = []
    for group in find_duplicates(review, threshold=GROUP_SIMILARITY, verify=False).groups:
        ids = [group.representative["id"]] + [member.id for member in group.members if member.copy_of is None]
        grouped.append([row_id for row_id in dict.fromkeys(ids) if row_id in rows])
    grouped.sort(key=lambda ids: (-len(ids), rows[ids[0]]["path"]))
    seen = {row_id for ids in grouped for row_id in ids}
    grouped += [[row_id] for row_id in sorted(rows.keys() - seen, key=lambda row_id: rows[row_id]["path"])]
    return [ReviewGroup(number, group_key(ids), [_member(rows[row_id]) for row_id in ids]) for number, ids in enumerate(grouped, 1)]


def _member(row: dict) -> dict[str, Any]:
    metadata = row.get("metadata") or {}
    return {"id": row["id"], "path": row["path"], **{key: metadata.get(key) for key in ("confidence", "nearest", "kept_at")}}


def select(review: MilvusStore | None, selection: list[str], store: MilvusStore | None = None) -> list[str]:
    """Ids of kept queries from group keys (as `review` lists them) and ids (or unique prefixes of 8+ hex).
    Group numbers are refused: queries kept meanwhile renumber the groups, so a number may name other images than
    the ones looked at; a key names its members, and a group that gained or lost members has another key.
    `store`: the main collection, to say so when an id is a stored image's rather than a kept query's."""
    groups = review_groups(review)
    by_key = {group.key: group for group in groups}
    ids: list[str] = []
    for raw in selection:
        token = raw.strip().lower()
        if token.isascii() and token.isdigit():
            raise InvalidInputError(
                f"select a review group by its key, not its number ({shown(raw)}): numbers change as queries are kept; "
                "`imgsearch review` lists each group's key (g + 10 hex)"
            )
        if len(token) == len(GROUP_KEY_PREFIX) + GROUP_KEY_HEX and token.startswith(GROUP_KEY_PREFIX) and is_hex(token[1:]):
            if token not in by_key:
                raise InvalidInputError(f"no review group {token}: its queries changed since it was listed; run `imgsearch review` again")
            ids += [member["id"] for member in by_key[token].members]
            continue
        if not MIN_ID_PREFIX <= len(token) <= ID_LENGTH or not is_hex(token):
            raise InvalidInputError(
                f"{shown(raw)} is neither a review group key (g + {GROUP_KEY_HEX} hex) nor an id (at least {MIN_ID_PREFIX} hex characters)"
            )
        matches = [member["id"] for group in groups for member in group.members if member["id"].startswith(token)]
        if len(matches) > 1:
            raise InvalidInputError(f"{token} matches {len(matches)} kept queries; give more of the id")
        if not matches:
            stored = store is not None and bool(store.ids_starting_with(token))
            raise InvalidInputError(
                f"{token} matches no kept query" + (": it is a stored image's id, not a kept query's" if stored else "")
                + "; `imgsearch review` lists the kept queries"
            )
        ids += matches
    return list(dict.fromkeys(ids))


def is_hex(text: str) -> bool:
    return bool(text) and all(c in "0123456789abcdef" for c in text)


def shown(text: str) -> str:
    """A selection as given, quoted and short: it may be anything the user typed."""
    return repr(text if len(text) <= 40 else text[:40] + "…")


def enroll_from_review(
    store: MilvusStore, label: str, selection: list[str], review: MilvusStore | None = None, *, recalibrate: bool = True
) -> dict[str, Any]:
    """Make the selected kept queries references of `label` (their vectors are reused) and drop them from review;
    then recalibrate "unknown" (unless the caller does: the service) and check the enrolment, as any enrolment does.
    `review`: the review collection if the caller holds it open (the service), else it is opened and closed here."""
    label = validate_label(label, required=True)
    opened_here = review is None
    review = review or review_store(store, create=False)
    try:
        return _enroll(store, review, label, select(review, selection, store), recalibrate)
    finally:
        if opened_here and review is not None:
            review.close()


def _enroll(store: MilvusStore, review: MilvusStore, label: str, ids: list[str], recalibrate: bool) -> dict[str, Any]:
    if not ids:
        raise InvalidInputError("nothing selected: give review group keys or ids (`imgsearch review` lists them)")
    rows = review.get(ids, fields=("id", "vector", "path", "metadata"))
    # Content already stored (a catalog row) takes the label and keeps its path, metadata and copies (update_moved);
    # only new content becomes a row of the kept query's file.
    stored = store.get(list(rows), fields=("id",))
    uploads = {row_id for row_id, row in rows.items() if is_upload(row.get("metadata"))}
    update_moved(store, [(CatalogEntry(as_location(row["path"]), label, upload=row_id in uploads), row_id) for row_id, row in rows.items() if row_id in stored])
    store.upsert([
        ImageRecord(id=row_id, vector=row["vector"], path=row["path"], label=label, metadata={UPLOAD_KEY: True} if row_id in uploads else {})
        for row_id, row in rows.items() if row_id not in stored
    ])
    store.add_roots([row["path"] for row in rows.values() if is_url(row["path"]) or Path(row["path"]).is_absolute()])
    store.flush()
    review.delete(list(rows))
    calibration = self_calibrate(store) if recalibrate else None
    check = check_enrolment(store, label, list(rows))
    return {
        "label": label, "enrolled": len(rows), "ids": sorted(rows),
        "calibration": asdict(calibration) if calibration else None, "check": check.to_dict() if check else None,
    }

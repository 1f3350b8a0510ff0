"""Groups of near-duplicate images in a collection, each pair graded.

Every stored vector is searched against the collection in batches (k nearest, never an all-pairs matrix); pairs
at or above the `similar` threshold are kept. Groups are stars, not chains: the image with the most close
neighbours becomes a representative and takes its unassigned neighbours, so every member is within the threshold
of its representative (single-linkage grouping would chain a catalog of one product line into one group).

Grades: identical content (the same bytes under another path: one row, whose other paths ingest recorded), then,
by cosine similarity to the representative, near-identical (re-encoded, resized, lightly cropped, rotated or flipped
copies) at or above `near`, else similar (the same product in another shot). A copy is a file, not a row: it carries
its row's id and `copy_of` (the row's path), and deleting from this output skips it. The default thresholds were chosen on edited copies of real photos by
benchmarks/duplicates.py; docs/duplicates.md gives its precision and recall.
"""

from __future__ import annotations

import html
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgsearch import storage
from imgsearch.config import NEAR_IDENTICAL, SIMILAR
from imgsearch.validation import recorded_copies

if TYPE_CHECKING:
    from imgsearch.store import MilvusStore

IDENTICAL = "identical content"
NEIGHBOURS = 16  # per image: a group larger than this is found from several of its members
READ_BATCH = 1000  # rows (with vectors) per query-iterator call: 256 cost time per call, 4,000 held ~330-390 MB of lists
SEARCH_BATCH = 500  # query vectors per search call


@dataclass
class Member:
    id: str
    path: str
    label: str
    score: float  # cosine similarity to the representative
    grade: str  # "identical content", "near-identical" or "similar"
    copy_of: str | None = None  # for a file with the same bytes as a stored row: that row's path (the id is its)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "path": self.path, "label": self.label, "score": round(self.score, 6), "grade": self.grade,
            "copy_of": self.copy_of,
        }


@dataclass
class Group:
    representative: dict[str, str]  # id, path, label
    members: list[Member] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"representative": self.representative, "members": [member.to_dict() for member in self.members]}


@dataclass
class DuplicatesReport:
    groups: list[Group]
    rows: int
    seconds: float
    near: float
    similar: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": [group.to_dict() for group in self.groups], "rows": self.rows, "seconds": round(self.seconds, 3),
            "thresholds": {"near-identical": self.near, "similar": self.similar},
        }

    def summary_line(self) -> str:
        members = [member for group in self.groups for member in group.members]
        identical = sum(member.grade == IDENTICAL for member in members)
        near = sum(member.grade == "near-identical" for member in members)
        return (
            f"{len(self.groups)} groups among {self.rows} images: {identical} identical, {near} near-identical and "
            f"{len(members) - near - identical} similar copies ({self.seconds:.1f} s)"
        )


def grade(score: float, near: float = NEAR_IDENTICAL) -> str:
    return "near-identical" if score >= near else "similar"


def find_duplicates(
    store: MilvusStore,
    *,
    prefix: str = "",
    similar: float = SIMILAR,
    near: float = NEAR_IDENTICAL,
    neighbours: int = NEIGHBOURS,
    progress: Callable[[int], None] | None = None,
) -> DuplicatesReport:
    """Near-duplicate groups among the rows whose path starts with `prefix` (all rows when empty)."""
    started = time.perf_counter()
    # Only rows in a close pair or with recorded copies are kept (id, path, label), so memory follows the
    # duplicates found, not the collection.
    rows: dict[str, dict[str, str]] = {}
    pairs: dict[tuple[str, str], float] = {}
    copies: dict[str, list[str]] = {}
    batch: list[dict] = []
    scanned = 0
    for row in store.iter_rows(("id", "path", "label", "vector", "metadata"), batch_size=READ_BATCH):
        if row["path"].startswith(prefix):
            batch.append(row)
            found = [path for path in recorded_copies(row.get("metadata")) if path.startswith(prefix) and storage.exists(path)]
            if found:
                copies[row["id"]] = found
                rows[row["id"]] = _shown(row)
        if len(batch) == SEARCH_BATCH:
            _close_pairs(store, batch, rows, pairs, prefix, similar, neighbours)
            scanned += len(batch)
            batch = []
            if progress:
                progress(scanned)
    _close_pairs(store, batch, rows, pairs, prefix, similar, neighbours)
    scanned += len(batch)
    groups = _with_copies(_stars(rows, pairs, near), rows, copies)
    return DuplicatesReport(groups, scanned, time.perf_counter() - started, near, similar)


def _shown(row) -> dict[str, str]:
    return {"id": row["id"], "path": row["path"], "label": row["label"]}


def _with_copies(groups: list[Group], rows: dict[str, dict[str, str]], copies: dict[str, list[str]]) -> list[Group]:
    """Add each row's identical copies to its group (a group of their own for a row with no near neighbour): a copy of
    the representative is graded identical content; a copy of a member shares that member's score and grade."""
    grouped = set()
    for group in groups:
        representative = group.representative
        grouped.add(representative["id"])
        extra = [
            Member(id=representative["id"], path=path, label=representative["label"], score=1.0, grade=IDENTICAL, copy_of=representative["path"])
            for path in copies.get(representative["id"], [])
        ]
        for member in group.members:
            grouped.add(member.id)
            extra += [
                Member(id=member.id, path=path, label=member.label, score=member.score, grade=member.grade, copy_of=member.path)
                for path in copies.get(member.id, [])
            ]
        group.members = sorted(group.members + extra, key=lambda m: (m.grade != IDENTICAL, -m.score, m.path))
    for row_id, paths in copies.items():
        if row_id not in grouped and row_id in rows:
            row = rows[row_id]
            members = [Member(id=row_id, path=path, label=row["label"], score=1.0, grade=IDENTICAL, copy_of=row["path"]) for path in paths]
            groups.append(Group(row, members))
    groups.sort(key=lambda group: (-max(m.score for m in group.members), group.representative["path"]))
    return groups


def _close_pairs(store, batch, rows, pairs, prefix: str, similar: float, neighbours: int) -> None:
    if not batch:
        return
    vectors = np.array([row["vector"] for row in batch], dtype=np.float32)
    from imgsearch.store.search_params import close_neighbours  # pymilvus: `duplicates` refuses a missing database first

    params = close_neighbours(neighbours + 1)
    for row, hits in zip(batch, store.search(vectors, k=neighbours + 1, fields=("path", "label"), search_params=params)):
        for hit in hits:
            if hit.id != row["id"] and hit.score >= similar and hit.path.startswith(prefix):
                key = (row["id"], hit.id) if row["id"] < hit.id else (hit.id, row["id"])
                pairs[key] = max(pairs.get(key, -1.0), hit.score)
                rows[row["id"]] = _shown(row)
                rows.setdefault(hit.id, {"id": hit.id, "path": hit.path, "label": hit.label})


def _stars(rows: dict[str, dict[str, str]], pairs: dict[tuple[str, str], float], near: float) -> list[Group]:
    linked: dict[str, dict[str, float]] = defaultdict(dict)
    for (a, b), score in pairs.items():
        if a in rows and b in rows:
            linked[a][b] = linked[b][a] = score
    order = sorted(linked, key=lambda i: (-len(linked[i]), -sum(linked[i].values()), rows[i]["path"]))
    assigned: set[str] = set()
    groups = []
    for centre in order:
        if centre in assigned:
            continue
        members = [(other, score) for other, score in linked[centre].items() if other not in assigned]
        if not members:
            continue
        assigned.add(centre)
        assigned.update(other for other, _ in members)
        members.sort(key=lambda pair: (-pair[1], rows[pair[0]]["path"]))
        groups.append(
            Group(rows[centre], [Member(**rows[other], score=score, grade=grade(score, near)) for other, score in members])
        )
    return groups


def write_html(report: DuplicatesReport, out: Path, thumbnail_size: int = 160) -> Path:
    """A page with each group's thumbnails side by side (embedded, so the file can be opened anywhere)."""
    parts = [
        "<!doctype html><meta charset='utf-8'><title>imgsearch duplicates</title>",
        "<style>body{font-family:sans-serif;margin:1rem}figure{display:inline-block;margin:.3rem;"
        f"width:{thumbnail_size}px;vertical-align:top;font-size:.75rem;word-break:break-all}}img{{max-width:100%}}"
        "section{border-bottom:1px solid #ccc;padding:.5rem 0}.rep{outline:3px solid #36c}</style>",
        f"<h1>{html.escape(report.summary_line())}</h1>",
    ]
    for group in report.groups:
        figures = [_figure(group.representative["path"], "representative", thumbnail_size, representative=True)]
        figures += [_figure(m.path, f"{m.grade} {m.score:.3f}", thumbnail_size) for m in group.members]
        parts.append("<section>" + "".join(figures) + "</section>")
    out.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return out


def _figure(path: str, caption: str, size: int, representative: bool = False) -> str:
    import base64

    from imgsearch.errors import ImageDecodeError
    from imgsearch.images import thumbnail_jpeg

    try:
        source = "data:image/jpeg;base64," + base64.b64encode(thumbnail_jpeg(storage.image_source(path), size)).decode()
        image = f"<img src='{source}' alt=''>"
    except (ImageDecodeError, *storage.transport_errors()):
        image = "<div>(file not readable)</div>"
    css = " class='rep'" if representative else ""
    return f"<figure{css}>{image}<figcaption>{html.escape(caption)}<br>{html.escape(path)}</figcaption></figure>"

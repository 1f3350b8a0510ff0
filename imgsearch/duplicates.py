"""Groups of duplicate images in a collection, each copy graded by what the pixels prove.

Two stages. **Candidates**: every stored vector is searched against the collection in batches (k nearest, never an
all-pairs matrix); pairs at or above the loose `candidates` threshold are kept, so that rotated, flipped and cropped
copies (whose embeddings move most) are not missed. **Verification**: both files of each candidate pair are read at
a reduced size and compared (verification.py: flips and rotations by perceptual hash then gradient correlation, crops
by sliding one over the other). An embedding alone says "looks alike": two shirts of one cut score like a copy.

Grades: *identical content* (the same bytes under another path: one row, whose other paths ingest recorded), *same
picture edited* (verified, with the evidence, e.g. "mirrored, resized to 50%"), and, only when asked, *similar*:
unverified pairs at or above `similar`, listed apart from the groups (`delete --from-json` skips them unless told).
Groups are stars, not chains: the image with the most verified copies becomes a representative and takes its
unassigned copies, so every member is verified against its representative. A copy is a file, not a row: it carries
its row's id and `copy_of` (the row's path), and deleting from this output skips it. docs/duplicates.md gives the
precision and recall of each stage (benchmarks/duplicates.py).
"""

from __future__ import annotations

import html
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgsearch import storage
from imgsearch.config import CANDIDATES, SIMILAR
from imgsearch.validation import recorded_copies

if TYPE_CHECKING:
    from imgsearch.store import MilvusStore
    from imgsearch.verification import Match, Signature

IDENTICAL = "identical content"
EDITED = "same picture edited"
LOOKALIKE = "similar"
NEIGHBOURS = 16  # per image: a group larger than this is found from several of its members
READ_BATCH = 1000  # rows (with vectors) per query-iterator call: 256 cost time per call, 4,000 held ~330-390 MB of lists
SEARCH_BATCH = 500  # query vectors per search call
SIGNATURES_KEPT = 1024  # decoded signatures held at once (~36 KB each); pairs are checked row by row, so few are re-read
UNREADABLE_SHOWN = 100


class ScanStopped(Exception):
    """find_duplicates was asked to stop (the service is shutting down): a scan is a read, so nothing is lost."""


@dataclass
class Member:
    id: str
    path: str
    label: str
    score: float  # cosine similarity to the representative
    grade: str  # IDENTICAL, EDITED or LOOKALIKE
    copy_of: str | None = None  # for a file with the same bytes as a stored row: that row's path (the id is its)
    evidence: str | None = None  # for EDITED: how this was made from the representative (or it from this)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "path": self.path, "label": self.label, "score": round(self.score, 6), "grade": self.grade,
            "copy_of": self.copy_of, "evidence": self.evidence,
        }


@dataclass
class Group:
    representative: dict[str, str]  # id, path, label
    members: list[Member] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"representative": self.representative, "members": [member.to_dict() for member in self.members]}


@dataclass
class DuplicatesReport:
    groups: list[Group]  # identical and verified copies
    rows: int
    seconds: float
    candidates: float
    similar: float
    lookalikes: list[Group] | None = None  # unverified look-alikes, when asked for
    candidate_pairs: int = 0
    verified_pairs: int = 0
    lookalike_pairs: int = 0
    unreadable: list[str] = field(default_factory=list)  # the first UNREADABLE_SHOWN files a candidate pair needed and could not read
    unreadable_count: int = 0
    verifying_seconds: float = 0.0  # of `seconds`: reading files and comparing pixels

    def to_dict(self) -> dict[str, Any]:
        report = {
            "groups": [group.to_dict() for group in self.groups], "rows": self.rows, "seconds": round(self.seconds, 3),
            "verifying_seconds": round(self.verifying_seconds, 3), "thresholds": {"candidates": self.candidates, "similar": self.similar},
            "pairs": {"candidates": self.candidate_pairs, "verified": self.verified_pairs, "similar": self.lookalike_pairs},
            "unreadable": self.unreadable, "unreadable_count": self.unreadable_count,
        }
        if self.lookalikes is not None:
            report["similar"] = [group.to_dict() for group in self.lookalikes]
        return report

    def summary_line(self) -> str:
        members = [member for group in self.groups for member in group.members]
        identical = sum(member.grade == IDENTICAL for member in members)
        shown = "listed apart" if self.lookalikes is not None else "not listed (--similar lists them)"
        return (
            f"{len(self.groups)} groups among {self.rows} images: {identical} identical and {len(members) - identical} "
            f"edited copies, verified on their pixels ({self.verified_pairs} of {self.candidate_pairs} candidate pairs); "
            f"{self.lookalike_pairs} similar look-alike pairs {shown}; {self.seconds:.1f} s"
        )


def find_duplicates(
    store: MilvusStore,
    *,
    prefix: str = "",
    threshold: float | None = None,
    include_similar: bool = False,
    verify: bool = True,
    neighbours: int = NEIGHBOURS,
    progress: Callable[[int], None] | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> DuplicatesReport:
    """Duplicate groups among the rows whose path starts with `prefix` (all rows when empty). `threshold`: the least
    similarity of any pair, checked or listed (default: pairs from CANDIDATES are checked on their pixels, look-alikes
    listed from SIMILAR). `verify=False` groups by the embedding alone, every pair at or above `threshold` graded
    similar: the review queue's grouping. ScanStopped once `stop()` is true (checked per batch and per pair)."""
    started = time.perf_counter()
    candidates, similar = (CANDIDATES, SIMILAR) if threshold is None else (threshold, threshold)
    # Only rows in a kept pair or with recorded copies are kept (id, path, label), so memory follows the duplicates
    # found, not the collection; candidate pairs are verified batch by batch and only the verified or similar kept.
    rows: dict[str, dict[str, str]] = {}
    checker = _PairChecker(similar, stop) if verify else None
    pairs: dict[tuple[str, str], float] = {}
    copies: dict[str, list[str]] = {}
    batch: list[dict] = []
    scanned = 0
    least = candidates if verify else similar
    for row in store.iter_rows(("id", "path", "label", "vector", "metadata"), batch_size=READ_BATCH):
        if row["path"].startswith(prefix):
            batch.append(row)
            found = [path for path in recorded_copies(row.get("metadata")) if path.startswith(prefix) and storage.exists(path)]
            if found:
                copies[row["id"]] = found
                rows[row["id"]] = _shown(row)
        if len(batch) == SEARCH_BATCH:
            if stop():
                raise ScanStopped
            _close_pairs(store, batch, rows, checker.pending if checker else pairs, prefix, least, neighbours)
            if checker:
                checker.check(rows)
            scanned += len(batch)
            batch = []
            if progress:
                progress(scanned)
    _close_pairs(store, batch, rows, checker.pending if checker else pairs, prefix, least, neighbours)
    scanned += len(batch)
    if checker is None:
        groups = _with_copies(_stars(rows, pairs, LOOKALIKE), rows, copies)
        return DuplicatesReport(groups, scanned, time.perf_counter() - started, least, similar)
    checker.check(rows)
    groups = _with_copies(_stars(rows, checker.verified, EDITED, checker.matches), rows, copies)
    lookalikes = _stars(rows, checker.lookalikes, LOOKALIKE) if include_similar else None
    return DuplicatesReport(
        groups, scanned, time.perf_counter() - started, candidates, similar, lookalikes, checker.candidate_pairs,
        len(checker.verified), len(checker.lookalikes), checker.unreadable, checker.unreadable_count, checker.seconds,
    )


class _PairChecker:
    """Verifies candidate pairs by their files' pixels, reading each file at a reduced size, at most SIGNATURES_KEPT
    held at once; a pair found again (from its other side) is not checked twice."""

    def __init__(self, similar: float, stop: Callable[[], bool] = lambda: False) -> None:
        self.similar = similar
        self.stop = stop
        self.pending: dict[tuple[str, str], float] = {}
        self.verified: dict[tuple[str, str], float] = {}
        self.matches: dict[tuple[str, str], Match] = {}
        self.lookalikes: dict[tuple[str, str], float] = {}
        self.checked: set[int] = set()  # hash() of each pair checked: a few bytes each, not two 64-character ids
        self.signatures: OrderedDict[str, Signature | None] = OrderedDict()
        self.unreadable: list[str] = []  # the first UNREADABLE_SHOWN: memory stays bounded however many fail
        self.unreadable_count = 0
        self.candidate_pairs = 0
        self.seconds = 0.0

    def check(self, rows: dict[str, dict[str, str]]) -> None:
        from imgsearch.verification import verify

        started = time.perf_counter()
        for key in sorted(self.pending):  # row by row: one side of a run of pairs stays decoded
            score = self.pending[key]
            if hash(key) in self.checked:
                continue
            if self.stop():
                raise ScanStopped
            self.checked.add(hash(key))
            self.candidate_pairs += 1
            first, second = (self._signature(rows[row_id]) for row_id in key)
            match = verify(first, second) if first is not None and second is not None else None
            if match is not None:
                self.verified[key], self.matches[key] = score, match
            elif score >= self.similar:
                self.lookalikes[key] = score
        self.pending.clear()
        self.seconds += time.perf_counter() - started

    def _signature(self, row: dict[str, str]) -> Signature | None:
        from imgsearch.errors import ImageDecodeError
        from imgsearch.images import file_pixels, load_image
        from imgsearch.verification import THUMB_SIDE, signature

        if row["id"] in self.signatures:
            self.signatures.move_to_end(row["id"])
            return self.signatures[row["id"]]
        try:
            source = storage.image_source(row["path"])
            image = load_image(source, min_side=2 * THUMB_SIDE, name=row["path"])  # a JPEG decodes at a reduced size
            found = signature(image, file_pixels(source))
        except (ImageDecodeError, *storage.transport_errors()):
            found = None
            self.unreadable_count += 1
            if len(self.unreadable) < UNREADABLE_SHOWN:
                self.unreadable.append(row["path"])
        self.signatures[row["id"]] = found
        if len(self.signatures) > SIGNATURES_KEPT:
            self.signatures.popitem(last=False)
        return found


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


def _close_pairs(store, batch, rows, pairs, prefix: str, threshold: float, neighbours: int) -> None:
    if not batch:
        return
    vectors = np.array([row["vector"] for row in batch], dtype=np.float32)
    from imgsearch.store.search_params import close_neighbours  # pymilvus: `duplicates` refuses a missing database first

    params = close_neighbours(neighbours + 1)
    for row, hits in zip(batch, store.search(vectors, k=neighbours + 1, fields=("path", "label"), search_params=params)):
        for hit in hits:
            if hit.id != row["id"] and hit.score >= threshold and hit.path.startswith(prefix):
                key = (row["id"], hit.id) if row["id"] < hit.id else (hit.id, row["id"])
                pairs[key] = max(pairs.get(key, -1.0), hit.score)
                rows[row["id"]] = _shown(row)
                rows.setdefault(hit.id, {"id": hit.id, "path": hit.path, "label": hit.label})


def _stars(
    rows: dict[str, dict[str, str]], pairs: dict[tuple[str, str], float], grade: str, matches: dict[tuple[str, str], Match] | None = None
) -> list[Group]:
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
        shown = [Member(**rows[other], score=score, grade=grade, evidence=_evidence(matches, centre, other)) for other, score in members]
        groups.append(Group(rows[centre], shown))
    return groups


def _evidence(matches: dict[tuple[str, str], Match] | None, representative: str, member: str) -> str | None:
    """How the member was made from the representative (pairs are stored in id order)."""
    if matches is None:
        return None
    if (representative, member) in matches:
        return matches[representative, member].describe()
    return matches[member, representative].describe(reverse=True)


def write_html(report: DuplicatesReport, out: Path, thumbnail_size: int = 160) -> Path:
    """A page with each group's thumbnails side by side (embedded, so the file can be opened anywhere)."""
    parts = [
        "<!doctype html><meta charset='utf-8'><title>imgsearch duplicates</title>",
        "<style>body{font-family:sans-serif;margin:1rem}figure{display:inline-block;margin:.3rem;"
        f"width:{thumbnail_size}px;vertical-align:top;font-size:.75rem;word-break:break-all}}img{{max-width:100%}}"
        "section{border-bottom:1px solid #ccc;padding:.5rem 0}.rep{outline:3px solid #36c}</style>",
        f"<h1>{html.escape(report.summary_line())}</h1>",
    ]
    for title, groups in (("", report.groups), ("Similar look-alikes (not verified: different pictures, maybe of one product)", report.lookalikes or [])):
        if title and groups:
            parts.append(f"<h2>{html.escape(title)}</h2>")
        for group in groups:
            figures = [_figure(group.representative["path"], "representative", thumbnail_size, representative=True)]
            figures += [_figure(m.path, _caption(m), thumbnail_size) for m in group.members]
            parts.append("<section>" + "".join(figures) + "</section>")
    out.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return out


def _caption(member: Member) -> str:
    return f"{member.grade} {member.score:.3f}" + (f": {member.evidence}" if member.evidence else "")


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

"""When recognition answers "unknown": the threshold that applies, and the one the references calibrate themselves.

Three sources, the first present wins: a threshold given to the command or request (`--threshold`), the one
`imgsearch eval` measured on labeled data, and the self-calibrated one, which every ingest or enrolment that changes
the labeled references recomputes from the references alone, with no held-out data:

- Leave one out: a sample of references (up to SAMPLE_PER_LABEL per label, SAMPLE_MAX in all) is recognised
  against all the others, its own row excluded, with the scoring `recognize` uses. This gives the confidences of
  known-class answers, right and wrong, and their margin over the second label.
- Leave its class out: the same references are recognised with their whole label excluded, as a photo of a class
  never enrolled would be. This gives the confidences an unknown query reaches.
- The threshold maximises (right known answers accepted) - FAR_WEIGHT x (class-left-out answers accepted), and the
  least margin is the smallest that brings the accuracy of the accepted leave-one-out answers to
  ACCEPTED_ACCURACY (never rejecting more than 1 - MARGIN_KEEPS of them): an answer whose two best labels are
  that close is "unknown" too.

The rule and its constants were chosen on Fashion-MNIST with Lite0 (benchmarks/recognition.py, docs/recognition.md),
where a per-label threshold measured no better than one global threshold.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from imgsearch.recognition.scoring import (
    DEFAULT_K,
    least_for_accuracy,
    score_label_left_out,
    score_left_out,
    scored_neighbours,
    scoring_power,
    without_labels,
    without_own_rows,
)
from imgsearch.store import (
    LABELED,
    RECOGNITION_PROPERTY,
    REFERENCE_COUNTS_PROPERTY,
    SELF_CALIBRATION_PROPERTY,
    Hit,
    MilvusStore,
    labeled_except,
)
from imgsearch.store.search_params import filtered

SAMPLE_PER_LABEL = 50
SAMPLE_MAX = 1000
FAR_WEIGHT = 0.3
SEARCH_BATCH = 64  # references scored per search call
WIDE_SEARCH = 200  # a label with at most this many references is left out by searching past all of them
SEED = 0
IN_MEMORY_REFERENCES = 20_000  # up to 100 MB of 1,280-d vectors: scored in numpy; more are searched in Milvus
log = logging.getLogger(__name__)

# Each label's reference count is stored with the calibration for collections of up to this many labels, so
# recognising reads them with the collection's properties: a filtered count on Milvus Lite costs ~50 MB of peak
# memory per process (docs/benchmarks.md). Larger label sets are counted per query, as are labels newer than it.
COUNTS_MAX_LABELS = 5000


@dataclass
class Abstention:
    """What makes an answer "unknown": a confidence below `threshold`, or (self-calibrated only) a lead over the
    second label below `margin`; `source` says where they came from."""

    threshold: float | None
    margin: float | None
    source: str
    reference_counts: dict[str, int] | None = field(default=None, repr=False)  # stored with the self-calibration

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": _round(self.threshold), "margin": _round(self.margin), "threshold_source": self.source}


@dataclass
class Calibration:
    """The abstention threshold `imgsearch eval` measured on labeled data."""

    threshold: float
    false_accept_rate: float
    dataset: str
    k: int = DEFAULT_K

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class SelfCalibration:
    threshold: float
    margin: float
    references: int  # labeled rows when it was computed
    labels: int
    sample: int  # references scored
    leave_one_out_accuracy: float
    seconds: float
    k: int = DEFAULT_K

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def describe(self) -> str:
        return f"self-calibrated on {self.references} references (leave-one-out over {self.sample})"


def resolve_abstention(store: MilvusStore, threshold: float | None) -> Abstention:
    """The given threshold, else the one `eval` calibrated, else the self-calibrated one, else none; with the
    reference counts stored at the last self-calibration."""
    properties = store.properties()
    counts = _reference_counts(properties)
    if threshold is not None:
        return Abstention(threshold, None, "given", counts)
    calibration = _calibration(properties)
    if calibration is not None:
        source = f"eval on {calibration.dataset} at false-accept rate {calibration.false_accept_rate}"
        return Abstention(calibration.threshold, None, source, counts)
    own = _self_calibration(properties)
    if own is not None:
        return Abstention(own.threshold, own.margin, own.describe(), counts)
    return Abstention(None, None, "none", counts)


# --- the stored thresholds, read and written here only ---------------------------------------------
def save_calibration(store: MilvusStore, calibration: Calibration) -> None:
    if not math.isfinite(calibration.threshold):
        raise ValueError(f"threshold must be finite, got {calibration.threshold}")
    store.set_properties({RECOGNITION_PROPERTY: calibration.to_json()})


def load_calibration(store: MilvusStore) -> Calibration | None:
    return _calibration(store.properties())


def _calibration(properties: dict[str, str]) -> Calibration | None:
    raw = properties.get(RECOGNITION_PROPERTY)
    try:
        return Calibration(**json.loads(raw)) if raw else None
    except (ValueError, TypeError):
        return None  # written by another version; recalibrate with `imgsearch eval`


def _self_calibration(properties: dict[str, str]) -> SelfCalibration | None:
    raw = properties.get(SELF_CALIBRATION_PROPERTY)
    try:
        return SelfCalibration(**json.loads(raw)) if raw else None
    except (ValueError, TypeError):
        return None  # written by another version: the next ingest or enrolment recomputes it


def _reference_counts(properties: dict[str, str]) -> dict[str, int] | None:
    try:
        counts = json.loads(properties.get(REFERENCE_COUNTS_PROPERTY) or "null")
    except ValueError:
        return None
    if not isinstance(counts, dict) or not all(isinstance(n, int) for n in counts.values()):
        return None
    return counts


def _store_calibration(store: MilvusStore, calibration: SelfCalibration | None, counts: dict[str, int]) -> None:
    stored_counts = json.dumps(counts, ensure_ascii=False) if len(counts) <= COUNTS_MAX_LABELS else ""
    store.set_properties({SELF_CALIBRATION_PROPERTY: calibration.to_json() if calibration else "", REFERENCE_COUNTS_PROPERTY: stored_counts})


def calibration_is_stale(store: MilvusStore) -> bool:
    """Whether references changed after the last self-calibration without it being recomputed: a run stopped (Ctrl-C,
    a Milvus outage) between its writes and the recalibration. Its rerun writes nothing new, so it asks this: the
    reference counts stored with the threshold no longer add up to the labeled rows, or labeled rows exist and no
    self-calibration was ever stored. Collections with more labels than COUNTS_MAX_LABELS store no counts; they are
    taken as current."""
    properties = store.properties()
    counts = _reference_counts(properties)
    if counts is None and properties.get(SELF_CALIBRATION_PROPERTY) is not None:
        return False
    return sum((counts or {}).values()) != store.count(LABELED)


def self_calibrate(store: MilvusStore, *, k: int = DEFAULT_K) -> SelfCalibration | None:
    """Recompute and store the collection's own threshold; None (and none stored) with fewer than two labels, or
    no label with two references or more."""
    started = time.perf_counter()
    ids_by_label: dict[str, list[str]] = defaultdict(list)
    for row in store.iter_rows(("id", "label"), batch_size=4000, filter=LABELED):
        ids_by_label[row["label"]].append(row["id"])
    counts = {label: len(ids) for label, ids in ids_by_label.items()}
    log.info('recomputing the "unknown" threshold from %d references of %d labels', sum(counts.values()), len(counts))
    if len(ids_by_label) < 2:
        _store_calibration(store, None, counts)
        return None
    sample = _sample(ids_by_label)
    if sum(counts.values()) <= IN_MEMORY_REFERENCES:
        known, unknown = _left_out_in_memory(ReferenceVectors(store), sample, counts, k, scoring_power(store.weights))
    else:
        known, unknown = _left_out_by_search(store, sample, counts, k, scoring_power(store.weights))
    if not known or not unknown:  # e.g. one reference per label: nothing to learn a known answer's score from
        _store_calibration(store, None, counts)
        return None
    threshold, margin = choose_abstention(known, unknown)
    calibration = SelfCalibration(
        threshold=round(threshold, 6), margin=round(margin, 6), references=sum(counts.values()), labels=len(counts),
        sample=len(known), leave_one_out_accuracy=round(float(np.mean([right for right, _, _ in known])), 4),
        seconds=round(time.perf_counter() - started, 2), k=k,
    )
    _store_calibration(store, calibration, counts)
    return calibration


class ReferenceVectors:
    """Every labeled row's vector, read once, and exact cosine neighbours among them in numpy: on Milvus Lite a
    search costs about 0.1 ms per hit returned (0.65 s for 64 queries of k = 101 among 5,000 rows), and the
    calibration asks for 2 × 101 hits per sampled reference."""

    def __init__(self, store: MilvusStore) -> None:
        rows = list(store.iter_rows(("id", "label", "vector"), batch_size=4000, filter=LABELED))
        self.ids = [row["id"] for row in rows]
        self.labels = np.array([row["label"] for row in rows], dtype=object)
        self.vectors = np.stack([np.asarray(row["vector"], dtype=np.float32) for row in rows]) if rows else np.zeros((0, 0))
        self.row_of = {row_id: row for row, row_id in enumerate(self.ids)}
        self.norms = np.maximum(np.linalg.norm(self.vectors, axis=1), 1e-12)  # Milvus's COSINE, without a second copy

    def nearest(self, queries: np.ndarray, k: int, except_label: str | None = None) -> list[list[Hit]]:
        """Each query's k nearest labeled rows, best first, with their vectors; `except_label`'s rows left out."""
        scores = (queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)) @ self.vectors.T / self.norms
        if except_label is not None:
            scores[:, self.labels == except_label] = -np.inf
        k = min(k, scores.shape[1])
        results = []
        for row_scores in scores:
            top = np.argpartition(-row_scores, k - 1)[:k] if k else np.zeros(0, dtype=int)
            top = top[np.argsort(-row_scores[top], kind="stable")]
            results.append([
                Hit(id=self.ids[j], score=float(row_scores[j]), path="", label=self.labels[j], metadata={}, vector=self.vectors[j])
                for j in top if row_scores[j] > -np.inf
            ])
        return results


def _left_out_in_memory(references: ReferenceVectors, sample: dict[str, list[str]], counts: dict[str, int], k: int, power: float):
    """The same scorings as _left_out_by_search, from exact neighbours in memory."""
    known: list[tuple[bool, float, float]] = []
    unknown: list[float] = []
    for label, ids in sample.items():
        ids = [row_id for row_id in ids if row_id in references.row_of]
        if not ids:
            continue
        queries = references.vectors[[references.row_of[row_id] for row_id in ids]]
        own_left_out = without_own_rows(references.nearest(queries, k + 1), ids, k)
        label_left_out = references.nearest(queries, k, except_label=label)
        for query, hits, other_hits in zip(queries, own_left_out, label_left_out):
            if counts[label] > 1:  # a reference alone in its label cannot be left out of it and still be known
                known += score_left_out(query, scored_neighbours(hits), label, counts, power)
            unknown += score_label_left_out(query, scored_neighbours(other_hits), counts, power)
    return known, unknown


def _left_out_by_search(store: MilvusStore, sample: dict[str, list[str]], counts: dict[str, int], k: int, power: float):
    """Each sampled reference recognised with its own row left out (known) and with its whole label left out
    (unknown), from Milvus searches: for collections too large to hold in memory."""
    vectors: dict[str, np.ndarray] = {}  # every vector read, by id: neighbours of one label's references overlap
    fetch_vectors(store, [row_id for ids in sample.values() for row_id in ids], vectors)
    known: list[tuple[bool, float, float]] = []  # (right, confidence, margin)
    unknown: list[float] = []
    # A label with few references: one search wide enough to pass all of them serves both scorings, and references
    # of many labels share a call. A label with many: its own calls, one of them filtered to the other labels.
    narrow = sorted(
        ((label, row_id) for label, ids in sample.items() if counts[label] <= WIDE_SEARCH for row_id in ids if row_id in vectors),
        key=lambda pair: counts[pair[0]],
    )
    for start in range(0, len(narrow), SEARCH_BATCH):
        chunk = narrow[start : start + SEARCH_BATCH]
        width = k + max(counts[label] for label, _ in chunk)
        queries = np.stack([vectors[row_id] for _, row_id in chunk])
        results = store.search(queries, k=width, filter=LABELED, search_params=filtered(width), fields=("label",))
        labels, ids = [label for label, _ in chunk], [row_id for _, row_id in chunk]
        own_left_out = with_vectors(store, without_own_rows(results, ids, k), vectors)
        label_left_out = with_vectors(store, without_labels(results, labels, k), vectors)
        for label, query, hits, other_hits in zip(labels, queries, own_left_out, label_left_out):
            if counts[label] > 1:  # a reference alone in its label cannot be left out of it and still be known
                known += score_left_out(query, hits, label, counts, power)
            unknown += score_label_left_out(query, other_hits, counts, power)
    for label, ids in sample.items():
        if counts[label] <= WIDE_SEARCH:
            continue
        for start in range(0, len(ids), SEARCH_BATCH):
            chunk = [row_id for row_id in ids[start : start + SEARCH_BATCH] if row_id in vectors]
            queries = np.stack([vectors[row_id] for row_id in chunk])
            results = store.search(queries, k=k + 1, filter=LABELED, search_params=filtered(k + 1), fields=("label",))
            excluded = store.search(queries, k=k, filter=labeled_except(label), search_params=filtered(k), fields=("label",))
            own_left_out = with_vectors(store, without_own_rows(results, chunk, k), vectors)
            for query, hits, other_hits in zip(queries, own_left_out, with_vectors(store, excluded, vectors)):
                known += score_left_out(query, hits, label, counts, power)
                unknown += score_label_left_out(query, other_hits, counts, power)
    return known, unknown


def _sample(ids_by_label: dict[str, list[str]]) -> dict[str, list[str]]:
    """Up to SAMPLE_PER_LABEL references per label, SAMPLE_MAX in all (labels drawn at random when there are more
    labels than that allows); fixed by SEED, so an unchanged collection calibrates the same."""
    rng = np.random.default_rng(SEED)
    labels = sorted(ids_by_label)
    per_label = max(1, min(SAMPLE_PER_LABEL, SAMPLE_MAX // len(labels)))
    if len(labels) * per_label > SAMPLE_MAX:
        labels = sorted(rng.choice(labels, SAMPLE_MAX // per_label, replace=False).tolist())
    sample = {}
    for label in labels:
        ids = sorted(ids_by_label[label])
        sample[label] = ids if len(ids) <= per_label else sorted(rng.choice(ids, per_label, replace=False).tolist())
    return sample


def with_vectors(store, results, vectors: dict[str, np.ndarray]):
    """For each list of hits, the ones scoring reads (each label's first DEFAULT_PER_CLASS) with their vectors,
    fetched in one read and cached in `vectors` by id: searches that return every neighbour's vector cost ~0.8 s
    per call on Milvus Lite."""
    trimmed = [scored_neighbours(hits) for hits in results]
    fetch_vectors(store, list({hit.id for hits in trimmed for hit in hits} - vectors.keys()), vectors)
    return [[replace(hit, vector=vectors[hit.id]) for hit in hits if hit.id in vectors] for hits in trimmed]


def fetch_vectors(store, ids: list[str], vectors: dict[str, np.ndarray]) -> None:
    for row_id, row in store.get(ids, fields=("id", "vector")).items():
        vectors[row_id] = np.asarray(row["vector"], dtype=np.float32)


def choose_abstention(known: list[tuple[bool, float, float]], unknown: list[float]) -> tuple[float, float]:
    """(threshold, margin) from leave-one-out answers (right, confidence, margin) and class-left-out confidences."""
    right = np.array([confidence for ok, confidence, _ in known if ok])
    negatives = np.asarray(unknown)
    if len(right) == 0:
        return float(np.max(negatives)), 0.0
    candidates = np.unique(np.concatenate([right, negatives]))
    gain = [(right >= t).mean() - FAR_WEIGHT * (negatives >= t).mean() for t in candidates]
    threshold = float(candidates[int(np.argmax(gain))])
    accepted = [(ok, margin) for ok, confidence, margin in known if confidence >= threshold]
    margins = np.array([min(margin, 1e9) for _, margin in accepted])
    return threshold, least_for_accuracy(margins, np.array([ok for ok, _ in accepted], dtype=bool))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)

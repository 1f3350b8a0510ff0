"""Recognition by the labeled neighbours in Milvus (scoring.py says how they are scored): the one implementation
behind CLI, API and `eval`, for vectors and for image files."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgsearch.config import DEFAULT_MAX_PIXELS, DEFAULT_REVIEW_MAX
from imgsearch.errors import ImgsearchError
from imgsearch.images import decode_in_batches
from imgsearch.ingest.catalog import absolute, file_sha256
from imgsearch.recognition.abstention import Abstention
from imgsearch.recognition.review import Kept, keep_unknown
from imgsearch.recognition.scoring import DEFAULT_DENSITY, DEFAULT_K, DEFAULT_PER_CLASS, decide, score_labels, scoring_power
from imgsearch.store import LABELED, MilvusStore
from imgsearch.store.search_params import filtered

if TYPE_CHECKING:  # torch is imported only when a model is loaded
    from imgsearch.encoders import Encoder


class NoReferencesError(ImgsearchError):
    """The collection holds no labeled vectors to recognise against."""


@dataclass
class Neighbour:
    id: str
    label: str
    score: float
    path: str


@dataclass
class Recognition:
    path: str
    label: str | None  # None: abstained ("unknown")
    confidence: float
    neighbours: list[Neighbour] = field(default_factory=list)
    abstention: dict[str, Any] = field(default_factory=dict)  # threshold, margin, threshold_source
    kept_for_review: bool | None = None  # an unknown answer, asked to keep it: was it kept (False: the review is full)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "label": self.label,
            "confidence": round(self.confidence, 6),
            **self.abstention,
            "kept_for_review": self.kept_for_review,
            "neighbours": [asdict(neighbour) for neighbour in self.neighbours],
        }

    def nearest_text(self) -> str:
        return f"{self.neighbours[0].label} {self.neighbours[0].score:.3f}" if self.neighbours else "-"


def recognize_vectors(
    store: MilvusStore,
    vectors: np.ndarray,
    *,
    k: int = DEFAULT_K,
    threshold: float | None = None,
    margin: float | None = None,
    per_class: int = DEFAULT_PER_CLASS,
    power: float | None = None,
    density: float = DEFAULT_DENSITY,
    reference_counts: dict[str, int] | None = None,
) -> list[tuple[str | None, float, list[Neighbour]]]:
    """Each query's label (None: unknown), confidence and neighbours. `reference_counts`: labels' reference counts
    already known (stored with the self-calibration); the others are counted in Milvus. `power`: the collection's
    own (scoring_power) unless given."""
    power = scoring_power(store.weights) if power is None else power
    results = store.search(vectors, k=k, filter=LABELED, search_params=filtered(k), with_vectors=True)
    if results and not any(results):
        raise NoReferencesError(
            f"collection {store.collection} has no labeled images to recognise against; "
            "`imgsearch enroll LABEL IMAGES...` or ingest a folder of class sub-folders"
        )
    labels = {hit.label for hits in results for hit in hits}
    known = {label: reference_counts[label] for label in labels if label in (reference_counts or {})}
    counts = known | store.label_counts(labels - known.keys())
    decided = []
    for query, hits in zip(vectors, results):
        neighbours = [Neighbour(id=hit.id, label=hit.label, score=hit.score, path=hit.path) for hit in hits]
        if hits:
            scores = score_labels(
                query, np.stack([hit.vector for hit in hits]), [hit.label for hit in hits], counts,
                per_class=per_class, power=power, density=density,
            )
        else:
            scores = {}
        label, confidence = decide(scores, threshold, margin)
        decided.append((label, confidence, neighbours))
    return decided


def recognize_paths(
    encoder: Encoder,
    store: MilvusStore,
    paths: Iterable[str | Path],
    *,
    k: int = DEFAULT_K,
    abstention: Abstention | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    review: MilvusStore | None = None,
    review_max: int = DEFAULT_REVIEW_MAX,
) -> tuple[list[Recognition], list[dict[str, str]]]:
    """Recognise every image under `paths`; unreadable ones are reported, not fatal. With `review` (the review
    collection), the images answered "unknown" are kept there while it holds fewer than `review_max`."""
    abstention = abstention or Abstention(None, None, "none")
    recognitions: list[Recognition] = []
    failed: list[dict[str, str]] = []
    for names, images in decode_in_batches(paths, min_side=encoder.input_size, max_pixels=max_pixels, failed=failed):
        vectors = encoder.encode_images(images)
        kept, asked = [], []
        for name, vector, (label, confidence, neighbours) in zip(
            names, vectors, recognize_vectors(
                store, vectors, k=k, threshold=abstention.threshold, margin=abstention.margin, reference_counts=abstention.reference_counts,
            )
        ):
            recognitions.append(
                Recognition(path=name, label=label, confidence=confidence, neighbours=neighbours, abstention=abstention.to_dict())
            )
            if review is not None and label is None and neighbours:
                nearest = recognitions[-1].neighbours[0].label
                kept.append(Kept(file_sha256(Path(name)), str(absolute(name)), vector, confidence, nearest))
                asked.append(recognitions[-1])
        if kept:
            admitted = keep_unknown(review, kept, review_max)
            for recognition, item in zip(asked, kept):
                recognition.kept_for_review = item.id in admitted
    return recognitions, failed

"""Recognition by the nearest labeled references: the one implementation behind CLI, API and `eval`.

For each query the k nearest labeled vectors are fetched. Each label among them gets a local prototype:
the mean of its (up to `per_class`) nearest references, after a power transform of the vectors. Its score
is the query's cosine with that prototype, less `density * log(references of that label)`: a label with
600 references always has some close to the query, one enrolled with 5 does not, and without this prior
a newly enrolled class is rarely chosen. The best label wins and its score is the confidence; below the
threshold the answer is "unknown" (label None).

Why not plain softmax(sim/T) voting: on Fashion-MNIST with Lite0 (benchmarks/recognition.py) the local
prototypes were more accurate with 600 references per class and with 5, and their score separates
never-enrolled classes better (AUROC) than a vote share does. Enrolling is an upsert of labeled vectors,
so a new class counts from the next query on, with nothing retrained.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgsearch.config import DEFAULT_REVIEW_MAX, RecognitionMethod
from imgsearch.errors import ImgsearchError
from imgsearch.images import DEFAULT_MAX_PIXELS, decode_in_batches
from imgsearch.store import RECOGNITION_PROPERTY, MilvusStore

if TYPE_CHECKING:  # torch is imported only when a model is loaded
    from imgsearch.abstention import Abstention
    from imgsearch.encoders import Encoder

LABELED = 'label != ""'

# Chosen on Fashion-MNIST with Lite0 (benchmarks/recognition.py): k 100 lets a class enrolled with 5 shots among
# classes of 600 reach the candidates; 10 per class kept the 600-reference accuracy; the prior's weight was picked
# on validation images (`--tune`): the best late-enrolment accuracy whose drop for the other classes stayed within
# 2 points. A larger weight favours newly enrolled classes more and costs the established ones more.
DEFAULT_K = 100
DEFAULT_PER_CLASS = 10
DEFAULT_POWER = 0.5  # sign(x)|x|^0.5 then unit length: evens out a few dominant feature channels
DEFAULT_DENSITY = 0.0275


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


@dataclass
class Calibration:
    """The abstention threshold `eval` measured, stored in the collection's properties."""

    threshold: float
    false_accept_rate: float
    dataset: str
    k: int = DEFAULT_K

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def power_normalize(vectors: np.ndarray, power: float = DEFAULT_POWER) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if power != 1.0:
        vectors = np.sign(vectors) * np.abs(vectors) ** power
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def score_labels(
    query: np.ndarray,
    neighbour_vectors: np.ndarray,
    neighbour_labels: Sequence,
    label_counts: dict | None = None,
    *,
    per_class: int = DEFAULT_PER_CLASS,
    power: float = DEFAULT_POWER,
    density: float = DEFAULT_DENSITY,
) -> dict:
    """Each label's score: cosine of the query with its local prototype, less density * log(its reference count).
    Neighbours come nearest first; `label_counts` holds every label's total references (None: the counts seen)."""
    query = power_normalize(query[None], power)[0]
    vectors = power_normalize(neighbour_vectors, power)
    labels = np.asarray(neighbour_labels)
    scores = {}
    for label in dict.fromkeys(neighbour_labels):  # first-seen order: nearest label first on ties
        members = vectors[labels == label][:per_class]
        prototype = members.mean(axis=0)
        count = label_counts.get(label, len(members)) if label_counts else int((labels == label).sum())
        cosine = float(query @ prototype / max(float(np.linalg.norm(prototype)), 1e-12))
        scores[label] = cosine - density * math.log(max(count, 1))
    return scores


def decide(scores: dict[str, float], threshold: float | None, margin: float | None = None) -> tuple[str | None, float]:
    """The best label and its confidence; None when it does not clear the threshold, or leads the second label
    by less than `margin` (too close to call)."""
    if not scores:
        return None, 0.0
    ranked = sorted(scores.values(), reverse=True)
    label = max(scores, key=scores.__getitem__)
    confidence = scores[label]
    if threshold is not None and confidence < threshold:
        return None, confidence
    if margin is not None and len(ranked) > 1 and ranked[0] - ranked[1] < margin:
        return None, confidence
    return label, confidence


def search_params(k: int) -> dict[str, Any]:
    # Filtered HNSW search loses recall at a low ef (0.55 at ef 64, 0.87 at ef 256 on structured 100k vectors,
    # measured on Lite); references are searched with a generous one.
    return {"params": {"ef": max(256, 4 * k)}}


def recognize_vectors(
    store: MilvusStore,
    vectors: np.ndarray,
    *,
    k: int = DEFAULT_K,
    threshold: float | None = None,
    margin: float | None = None,
    per_class: int = DEFAULT_PER_CLASS,
    power: float = DEFAULT_POWER,
    density: float = DEFAULT_DENSITY,
    reference_counts: dict[str, int] | None = None,
) -> list[tuple[str | None, float, list[Neighbour]]]:
    """Each query's label (None: unknown), confidence and neighbours. `reference_counts`: labels' reference counts
    already known (stored with the self-calibration); the others are counted in Milvus."""
    results = store.search(vectors, k=k, filter=LABELED, search_params=search_params(k), with_vectors=True)
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
    from imgsearch.abstention import Abstention
    from imgsearch.ingest.catalog import absolute, file_sha256
    from imgsearch.review import Kept, keep_unknown

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


def load_calibration(store: MilvusStore) -> Calibration | None:
    raw = store.properties().get(RECOGNITION_PROPERTY)
    if not raw:
        return None
    try:
        values = json.loads(raw)
        return Calibration(**values)
    except (ValueError, TypeError):
        return None  # written by another version; recalibrate with `imgsearch eval`


def save_calibration(store: MilvusStore, calibration: Calibration) -> None:
    if not math.isfinite(calibration.threshold):
        raise ValueError(f"threshold must be finite, got {calibration.threshold}")
    store.set_properties({RECOGNITION_PROPERTY: calibration.to_json()})


def labeled_rows(store: MilvusStore, fields: Sequence[str]) -> list[dict]:
    rows = list(store.iter_rows(fields=fields, filter=LABELED))
    if not rows:
        raise NoReferencesError(f"collection {store.collection} has no labeled images to train on")
    return rows


def train_head_on_store(
    store: MilvusStore,
    mode: str,
    *,
    epochs: int | None = None,
    stages: int = 3,
    weights: Path | None = None,
    device: str = "auto",
    workers: int = 0,
    progress=None,
):
    """linear: the stored labeled vectors, nothing re-encoded; finetune: the labeled image files."""
    from imgsearch.datasets import FileImage
    from imgsearch.head import HeadInfo, TrainedHead, train_finetune, train_linear

    if mode == "linear":
        rows = labeled_rows(store, ("vector", "label"))
        vectors = np.array([row["vector"] for row in rows], dtype=np.float32)
        state, labels, metrics = train_linear(vectors, [row["label"] for row in rows], epochs=epochs or 300)
    else:
        rows = [row for row in labeled_rows(store, ("path", "label")) if Path(row["path"]).is_file()]
        if not rows:
            raise NoReferencesError(f"none of the labeled images of {store.collection} exist on disk any more")
        sources = [FileImage(Path(row["path"])) for row in rows]
        state, labels, metrics = train_finetune(
            store.model, sources, [row["label"] for row in rows], weights=weights, device=device,
            epochs=epochs or 10, stages=stages, workers=workers, progress=progress,
        )
    return TrainedHead(HeadInfo(labels, store.model, store.dim, mode, store.collection, metrics), state)


def recognize_paths_with_head(
    encoder: Encoder,
    store: MilvusStore,
    head_path: Path,
    paths: Iterable[str | Path],
    *,
    threshold: float | None = None,
    weights: Path | None = None,
    device: str = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[list[Recognition], list[dict[str, str]], Abstention]:
    """Classify with a trained head; confidence is the softmax probability, so the threshold is the head's own
    (calibrated on its validation split when it was trained) unless one is given. Refuses a head made for another
    encoder or collection."""
    from imgsearch.abstention import Abstention
    from imgsearch.head import FinetunedClassifier, linear_probabilities, load_head

    head = load_head(head_path, encoder_name=encoder.name, collection=store.collection)
    own = head.info.metrics.get("threshold")
    if threshold is not None:
        abstention = Abstention(threshold, None, "given")
    elif isinstance(own, (int, float)):
        abstention = Abstention(float(own), None, f"the head's, calibrated on its validation split ({head_path.name})")
    else:
        abstention = Abstention(None, None, "none (a head trained before heads had thresholds: train it again)")
    classifier = FinetunedClassifier(head, weights=weights, device=device) if head.info.mode == "finetune" else None
    recognitions: list[Recognition] = []
    failed: list[dict[str, str]] = []
    for names, images in decode_in_batches(paths, min_side=encoder.input_size, max_pixels=max_pixels, failed=failed):
        if classifier is not None:
            probabilities = classifier.probabilities(images)
        else:
            probabilities = linear_probabilities(head.state, encoder.encode_images(images))
        for name, row in zip(names, probabilities):
            best = int(row.argmax())
            confidence = float(row[best])
            label = head.info.labels[best] if abstention.threshold is None or confidence >= abstention.threshold else None
            recognitions.append(Recognition(path=name, label=label, confidence=confidence, abstention=abstention.to_dict()))
    return recognitions, failed, abstention


def recognize_images(
    encoder: Encoder,
    store: MilvusStore,
    paths: Iterable[str | Path],
    settings,
    *,
    method: RecognitionMethod | str = RecognitionMethod.knn,
    k: int = DEFAULT_K,
    head: Path | None = None,
    keep_unknown: bool = False,
) -> tuple[list[Recognition], list[dict[str, str]], Abstention]:
    """Recognise every image under `paths` by k-NN over the labeled references or with a trained head (default
    file: heads/<collection>-linear). Returns the recognitions, the unreadable files, and the abstention rule that
    applied (threshold, margin and where they came from). `keep_unknown` (k-NN only): the images answered "unknown"
    are kept for review (review.py)."""
    from imgsearch.abstention import resolve_abstention

    if RecognitionMethod(method) is RecognitionMethod.head:
        from imgsearch.head import default_head_path  # torch: only heads need it

        return recognize_paths_with_head(
            encoder, store, head or default_head_path(store.collection, "linear"), paths, threshold=settings.threshold,
            weights=settings.weights, device=settings.device, max_pixels=settings.max_image_pixels,
        )
    abstention = resolve_abstention(store, settings.threshold)
    review = None
    if keep_unknown:
        from imgsearch.review import review_store

        review = review_store(store)
    try:
        recognitions, failed = recognize_paths(
            encoder, store, paths, k=k, abstention=abstention, max_pixels=settings.max_image_pixels, review=review,
            review_max=settings.review_max,
        )
    finally:
        if review is not None:
            review.close()
    return recognitions, failed, abstention


def train_head_for(settings, mode: str, *, epochs: int | None = None, stages: int = 3, out: Path | None = None, progress=None):
    """Train a head on the settings' collection and save it (default: heads/<collection>-<mode>); a model given
    in the settings must be the collection's. Returns the head and its two files."""
    from imgsearch.encoders import canonical_model_name
    from imgsearch.errors import UsageError
    from imgsearch.head import MODES, default_head_path

    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    from imgsearch.session import open_existing_store

    with open_existing_store(settings) as store:
        if "model" in settings.model_fields_set and store.model != canonical_model_name(settings.model):
            raise UsageError(f"collection {settings.collection_name} holds model {store.model}, not {settings.model}")
        head = train_head_on_store(
            store, mode, epochs=epochs, stages=stages, weights=settings.weights, device=settings.device,
            workers=settings.workers or 0, progress=progress,
        )
    weights_path, info_path = head.save(out or default_head_path(settings.collection_name, mode))
    return head, weights_path, info_path

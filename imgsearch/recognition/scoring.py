"""Recognition's arithmetic, numpy only: local prototypes with a count prior, the decision, and the leave-one-out
scoring that self-calibration and the enrolment check share.

For each query the k nearest labeled vectors are fetched. Each label among them gets a local prototype: the mean of
its (up to `per_class`) nearest references, after a power transform of the vectors. Its score is the query's cosine
with that prototype, less `density * log(references of that label)`: a label with 600 references always has some
close to the query, one enrolled with 5 does not, and without this prior a newly enrolled class is rarely chosen. The
best label wins and its score is the confidence; below the threshold the answer is "unknown" (label None).

Why not plain softmax(sim/T) voting: on Fashion-MNIST with Lite0 (benchmarks/recognition.py) the local prototypes were
more accurate with 600 references per class and with 5, and their score separates never-enrolled classes better
(AUROC) than a vote share does. Enrolling is an upsert of labeled vectors, so a new class counts from the next query
on, with nothing retrained.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from imgsearch.config import RECOGNITION_K

# Chosen on Fashion-MNIST with Lite0 (benchmarks/recognition.py): k 100 lets a class enrolled with 5 shots among
# classes of 600 reach the candidates; 10 per class kept the 600-reference accuracy; the prior's weight was picked
# on validation images (`--tune`): the best late-enrolment accuracy whose drop for the other classes stayed within
# 2 points. A larger weight favours newly enrolled classes more and costs the established ones more.
DEFAULT_K = RECOGNITION_K
DEFAULT_PER_CLASS = 10
DEFAULT_POWER = 0.5  # sign(x)|x|^0.5 then unit length: evens out a few dominant feature channels
# An adapted embedding (`imgsearch adapt`) is trained on plain cosines and has signed components: the transform,
# chosen for the frozen features, cost it k-NN and 5-shot accuracy (docs/recognition.md), so it is scored without.
ADAPTED_POWER = 1.0
DEFAULT_DENSITY = 0.0275
# The accuracy the accepted answers should reach, when a margin or a head's threshold is chosen for it; neither turns
# more than a quarter of the answers into "unknown".
ACCEPTED_ACCURACY = 0.93
MARGIN_KEEPS = 0.75


def scoring_power(weights_id: str | None) -> float:
    """The power transform for a collection's vectors, from the embedding it records ("" or None: the model's own)."""
    return ADAPTED_POWER if weights_id else DEFAULT_POWER


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


def least_for_accuracy(values: np.ndarray, right: np.ndarray, target: float = ACCEPTED_ACCURACY, keeps: float = MARGIN_KEEPS) -> float:
    """The smallest cut-off at which the answers with `values` at or above it are right `target` of the time,
    never cutting more than 1 - `keeps` of them (answers this confusable cannot reach the target: the cut stops
    there); 0 when there are none."""
    if len(values) == 0:
        return 0.0
    order = np.argsort(values)
    values, right = values[order], right[order]
    cut = 0.0
    for index in range(len(values)):
        if len(values) - index < keeps * len(values):
            break
        cut = float(values[index])
        if right[index:].mean() >= target:
            break
    return cut


# --- leave one out: a reference recognised among the others --------------------------------------
def without_own_rows(results: Sequence[Sequence], ids: Sequence[str], k: int) -> list[list]:
    """Each reference's hits (searched for k + 1) with its own row left out, k at most."""
    return [[hit for hit in hits if hit.id != row_id][:k] for row_id, hits in zip(ids, results)]


def without_labels(results: Sequence[Sequence], labels: Sequence[str], k: int) -> list[list]:
    """Each reference's hits with its whole label left out, k at most: what a class never enrolled would meet."""
    return [[hit for hit in hits if hit.label != label][:k] for label, hits in zip(labels, results)]


def scored_neighbours(hits: Sequence, per_class: int = DEFAULT_PER_CLASS) -> list:
    """The hits score_labels reads: each label's first `per_class`, so trimmed hits score the same."""
    seen: Counter = Counter()
    kept = []
    for hit in hits:
        seen[hit.label] += 1
        if seen[hit.label] <= per_class:
            kept.append(hit)
    return kept


def score_left_out(query, hits, label, counts, power: float = DEFAULT_POWER) -> list[tuple[bool, float, float]]:
    """A reference of `label` recognised from `hits` (with vectors), its own row already left out, so its label
    counts one less: [(right, confidence, margin)], or [] with no neighbour."""
    if not hits:
        return []
    best, confidence, margin = _best(_scores(query, hits, {**counts, label: counts[label] - 1}, power))
    return [(best == label, confidence, margin)]


def score_label_left_out(query, hits, counts, power: float = DEFAULT_POWER) -> list[float]:
    """A reference recognised with its whole label left out, as a never-enrolled class would be: [confidence]."""
    return [_best(_scores(query, hits, counts, power))[1]] if hits else []


def _scores(query: np.ndarray, hits, counts: dict[str, int], power: float) -> dict[str, float]:
    return score_labels(query, np.stack([hit.vector for hit in hits]), [hit.label for hit in hits], counts, power=power)


def _best(scores: dict[str, float]) -> tuple[str, float, float]:
    ranked = sorted(scores.items(), key=lambda item: -item[1])
    margin = ranked[0][1] - ranked[1][1] if len(ranked) > 1 else math.inf
    return ranked[0][0], ranked[0][1], margin

"""The measures: the scoring `recognize` uses applied to in-memory neighbours, AUROC, and threshold calibration."""

from __future__ import annotations

import math

import numpy as np

from imgsearch.recognize import power_normalize, score_labels


def predict(
    references: np.ndarray,
    reference_targets: np.ndarray,
    queries: np.ndarray,
    *,
    k: int,
    per_class: int,
    power: float,
    density: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted target and confidence per query, scoring the k nearest references as `recognize` does."""
    predictions = np.empty(len(queries), dtype=np.int64)
    confidences = np.empty(len(queries), dtype=np.float64)
    k = min(k, len(references))
    counts = dict(zip(*np.unique(reference_targets, return_counts=True)))
    # Transform once here; score_labels with power 1 only re-normalises. Neighbours are found on the raw
    # vectors, as Milvus finds them.
    transformed_references, transformed_queries = power_normalize(references, power), power_normalize(queries, power)
    for start in range(0, len(queries), 1024):
        block = queries[start : start + 1024]
        similarity = block @ references.T
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(similarity, nearest, 1).argsort(axis=1)[:, ::-1]
        nearest = np.take_along_axis(nearest, order, 1)
        for row in range(len(block)):
            labels = reference_targets[nearest[row]]
            scores = score_labels(
                transformed_queries[start + row], transformed_references[nearest[row]], labels.tolist(), counts,
                per_class=per_class, power=1.0, density=density,
            )
            best = max(scores, key=scores.__getitem__)
            predictions[start + row] = best
            confidences[start + row] = scores[best]
    return predictions, confidences


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half): Mann-Whitney U / (n_p n_n)."""
    scores = np.concatenate([positive, negative])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    unique, first_index, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first_index + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    u = ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2.0
    return float(u / (len(positive) * len(negative)))


def threshold_at_false_accept_rate(unknown_scores: np.ndarray, rate: float) -> float:
    """The lowest threshold that accepts at most `rate` of the unknown queries (accept when score >= threshold)."""
    ordered = np.sort(unknown_scores)
    allowed = int(math.floor(rate * len(ordered)))
    if allowed >= len(ordered):
        return float(ordered[0])
    return float(np.nextafter(ordered[len(ordered) - allowed - 1], np.inf))


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    return matrix

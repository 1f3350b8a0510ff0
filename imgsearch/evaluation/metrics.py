"""The measures: the scoring `recognize` uses applied to in-memory neighbours, AUROC, and threshold calibration."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from imgsearch.recognition.scoring import power_normalize, score_labels


def predict(*args: Any, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Predicted target and confidence per query: `predict_with_margins` without the margins."""
    predictions, confidences, _ = predict_with_margins(*args, **kwargs)
    return predictions, confidences


def predict_with_margins(
    references: np.ndarray,
    reference_targets: np.ndarray,
    queries: np.ndarray,
    *,
    k: int,
    per_class: int,
    power: float,
    density: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predicted target, confidence and lead over the second label (inf with one label among the neighbours) per
    query, scoring the k nearest references as `recognize` does; the lead is what the self-calibrated margin is
    compared with."""
    predictions = np.empty(len(queries), dtype=np.int64)
    confidences = np.empty(len(queries), dtype=np.float64)
    margins = np.empty(len(queries), dtype=np.float64)
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
            ranked = sorted(scores.items(), key=lambda item: -item[1])
            predictions[start + row], confidences[start + row] = ranked[0]
            margins[start + row] = ranked[0][1] - ranked[1][1] if len(ranked) > 1 else math.inf
    return predictions, confidences, margins


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


def best_threshold_and_margin(
    right: np.ndarray,
    confidences: np.ndarray,
    margins: np.ndarray,
    unknown_confidences: np.ndarray,
    unknown_margins: np.ndarray,
    *,
    min_ratio: float,
    steps: int = 101,
) -> dict[str, float] | None:
    """The most any (threshold, margin) rule can do on labeled queries, chosen with their answers in hand: the
    highest accuracy among accepted known-class answers while never-enrolled queries are answered "unknown" at least
    `min_ratio` times as often as known ones. Known queries: `right`, `confidences`, `margins`; never-enrolled:
    `unknown_confidences`, `unknown_margins`. Pairs are searched on a grid of `steps` quantiles of each; None when
    no pair reaches the ratio."""
    right = np.asarray(right, dtype=bool)
    margins, unknown_margins = np.minimum(margins, np.finfo(np.float64).max), np.minimum(unknown_margins, np.finfo(np.float64).max)
    grid = np.linspace(0.0, 1.0, steps)
    thresholds = np.unique(np.quantile(np.concatenate([confidences, unknown_confidences]), grid))
    least_margins = np.unique(np.concatenate([[0.0], np.quantile(np.concatenate([margins, unknown_margins]), grid)]))
    best = None
    for threshold in thresholds:
        known_over, unknown_over = confidences >= threshold, unknown_confidences >= threshold
        for margin in least_margins:
            accepted = known_over & (margins >= margin)
            if not accepted.any():
                continue
            known_unknown = 1.0 - accepted.mean()
            never_unknown = 1.0 - (unknown_over & (unknown_margins >= margin)).mean()
            if never_unknown < min_ratio * known_unknown or never_unknown == 0.0:
                continue
            accuracy = float(right[accepted].mean())
            if best is None or accuracy > best["accuracy"]:
                best = {
                    "accuracy": accuracy, "threshold": float(threshold), "margin": float(margin),
                    "known_unknown_rate": float(known_unknown), "never_enrolled_unknown_rate": float(never_unknown),
                }
    return best

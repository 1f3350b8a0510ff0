"""The metric recognition scores with, learned from the labeled references themselves.

Within one class, the vectors vary most along a few directions (pose, shade, framing) that say little about which
class an image is of; they blur the line between close classes (shirt, T-shirt, coat) and lift an unknown photo's
score as much as a known one's. So the directions of greatest within-class variance are shrunk: after recognition's
power transform the vectors are centred on the references' mean, and along each of the RANK directions of greatest
within-class variance λ the component is scaled by sqrt(a / (λ + a)), a = SHRINK x the mean variance over all
directions. That is a low-rank form of whitening the within-class covariance (with shrinkage, so directions seen
in few references are not blown up); the other directions keep their scale.

It is fitted at each self-calibration (abstention.py) on a sample of references, stored in the collection's
properties beside it, and applied to the query and the neighbours Milvus found on the vectors as stored, which are
re-ranked under it. Too few references to estimate it (MIN_WITHIN_CLASS), and there is none: scoring is as before.
Measured in benchmarks/recognition.py and docs/recognition.md (Fashion-MNIST, Lite0).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from imgsearch.recognize import power_normalize

RANK = 64  # directions shrunk: 64 kept all but 0.3 points of the full whitening's gain, and fit in the properties
SHRINK = 0.3
# references less labels (the within-class degrees of freedom) below which no metric is learned: with 8 labels of 5
# references (32) it cost 0.2 points of accuracy, with 10 (72) it gained 1
MIN_WITHIN_CLASS = 64
FIT_PER_LABEL = 300  # references read per label to fit it
FIT_MAX = 20000


@dataclass(frozen=True)
class LearnedMetric:
    mean: np.ndarray  # (dim,) of the power-transformed references
    directions: np.ndarray  # (rank, dim), orthonormal
    scale: np.ndarray  # (rank,), each direction's factor, in (0, 1]
    references: int  # fitted on this many

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """Unit vectors under the metric, for raw vectors (rows); scored with power 1 from here on."""
        centred = power_normalize(vectors) - self.mean
        centred = centred - ((centred @ self.directions.T) * (1.0 - self.scale)) @ self.directions
        return centred / np.maximum(np.linalg.norm(centred, axis=-1, keepdims=True), 1e-12)

    def to_property(self) -> str:
        return json.dumps({
            "references": self.references,
            "mean": _encode(self.mean),
            "directions": _encode(self.directions),
            "scale": [round(float(value), 6) for value in self.scale],
        })

    @classmethod
    def from_property(cls, text: str | None, dim: int | None) -> LearnedMetric | None:
        """None when absent, malformed or not of the collection's dimension (the next calibration refits it)."""
        if not text:
            return None
        try:
            values = json.loads(text)
            scale = np.asarray(values["scale"], dtype=np.float32)
            mean = _decode(values["mean"])
            directions = _decode(values["directions"]).reshape(len(scale), -1)
            references = int(values["references"])
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        if mean.shape != (directions.shape[1],) or (dim is not None and len(mean) != dim):
            return None
        return cls(mean, directions, scale, references)


def fit_selection(labels: Sequence) -> np.ndarray:
    """Which references to fit on (indices into `labels`): up to FIT_PER_LABEL per label, fewer per label when
    there are more labels than FIT_MAX allows; fixed by a seed."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) == 0:
        return np.zeros(0, dtype=np.int64)
    per_label = max(1, min(FIT_PER_LABEL, FIT_MAX // len(classes)))
    rng = np.random.default_rng(0)
    chosen = []
    for label in classes:
        members = np.flatnonzero(labels == label)
        chosen.append(members if len(members) <= per_label else np.sort(rng.choice(members, per_label, replace=False)))
    return np.concatenate(chosen)


def learn_metric(vectors: np.ndarray, labels: Sequence) -> LearnedMetric | None:
    """The metric for references `vectors` (raw, rows) with `labels`, fitted on `fit_selection` of them; None with
    fewer than two labels or too few references per label to estimate the within-class variance
    (MIN_WITHIN_CLASS)."""
    chosen = fit_selection(labels)
    vectors, labels = np.asarray(vectors)[chosen], np.asarray(labels)[chosen]
    classes = np.unique(labels)
    if len(classes) < 2 or len(labels) - len(classes) < MIN_WITHIN_CLASS:
        return None
    transformed = power_normalize(vectors).astype(np.float64)
    within = np.concatenate([transformed[labels == c] - transformed[labels == c].mean(axis=0) for c in classes])
    count, dim = within.shape
    rank = min(RANK, dim, count)
    if count < dim:  # fewer references than dimensions: the same directions from the smaller Gram matrix
        variances, gram_axes = np.linalg.eigh(within @ within.T / count)  # ascending
        variances, gram_axes = np.maximum(variances[-rank:], 1e-12), gram_axes[:, -rank:]
        directions = (within.T @ gram_axes / np.sqrt(variances * count)).T
    else:
        variances, axes = np.linalg.eigh(within.T @ within / count)
        variances, directions = np.maximum(variances[-rank:], 0.0), axes[:, -rank:].T
    floor = SHRINK * float(np.einsum("ij,ij->", within, within)) / count / dim  # SHRINK x the mean variance
    return LearnedMetric(
        mean=transformed.mean(axis=0).astype(np.float32),
        directions=directions.astype(np.float32),
        scale=np.sqrt(floor / (variances + floor)).astype(np.float32),
        references=len(labels),
    )


def _encode(array: np.ndarray) -> str:
    # float16: the property holds 64 x 1,280 directions in ~220 KB; its rounding moves scores by ~1e-4
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f2").tobytes()).decode("ascii")


def _decode(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text, validate=True), dtype="<f2").astype(np.float32)

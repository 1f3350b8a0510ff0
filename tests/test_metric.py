"""The learned metric (imgsearch/metric.py), in memory: it tells apart classes that differ along a direction the
within-class spread swamps, is not learned from too few references, and survives the collection's properties."""

from __future__ import annotations

import numpy as np

from imgsearch.evaluation.metrics import predict
from imgsearch.metric import MIN_WITHIN_CLASS, RANK, LearnedMetric, learn_metric
from imgsearch.recognize import score_labels


def two_close_classes(rng, per_class: int, dim: int = 96):
    """Two classes a step apart along axis 0, both spread widely (the same way) along axes 1-30: a nuisance such
    as pose or shade, on top of a shared offset that keeps the vectors in one cone."""
    vectors, targets = [], []
    for target, step in ((0, -0.15), (1, 0.15)):
        x = rng.normal(0.0, 0.04, (per_class, dim))
        x[:, 0] += step
        x[:, 1:31] += rng.normal(0.0, 0.5, (per_class, 30))
        x[:, -1] += 3.0
        vectors.append(x)
        targets += [target] * per_class
    return np.concatenate(vectors).astype(np.float32), np.array(targets)


def test_the_metric_tells_apart_classes_the_within_class_spread_swamps():
    rng = np.random.default_rng(3)
    references, targets = two_close_classes(rng, 200)
    queries, truth = two_close_classes(rng, 150)
    score = {"k": 50, "per_class": 10, "power": 0.5, "density": 0.0}
    plain = (predict(references, targets, queries, learned=False, **score)[0] == truth).mean()
    learned = (predict(references, targets, queries, **score)[0] == truth).mean()
    assert learned >= 0.9 and learned > plain + 0.15, (plain, learned)
    # score_labels with the metric is what recognize applies to Milvus's neighbours: the same answer
    metric = learn_metric(references, targets)
    nearest = np.argsort(-(references @ queries[0]))[:50]
    scores = score_labels(queries[0], references[nearest], targets[nearest].tolist(), metric=metric, density=0.0)
    assert max(scores, key=scores.get) == predict(references, targets, queries[:1], **score)[0][0]


def test_no_metric_from_too_few_references_or_one_label():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(400, 32)).astype(np.float32)
    assert learn_metric(vectors, [0] * 400) is None  # one label: no within-class spread to tell from the classes
    labels_of_five = np.repeat(np.arange(8), 5)  # 8 labels of 5 references: 32 within-class degrees of freedom
    assert 40 - 8 < MIN_WITHIN_CLASS and learn_metric(vectors[:40], labels_of_five) is None
    labels_of_ten = np.repeat(np.arange(8), 10)
    metric = learn_metric(vectors[:80], labels_of_ten)
    assert metric is not None and metric.references == 80
    assert np.all((metric.scale > 0) & (metric.scale <= 1))
    # fewer references than dimensions or more: the same directions (from the Gram matrix or the covariance)
    wide = rng.normal(size=(80, 200)).astype(np.float32)
    narrow = learn_metric(wide, labels_of_ten)
    queries = rng.normal(size=(5, 200)).astype(np.float32)
    assert narrow.directions.shape == (min(RANK, 80), 200)
    assert np.allclose(narrow.directions @ narrow.directions.T, np.eye(len(narrow.scale)), atol=1e-3)
    padded = learn_metric(np.concatenate([wide] * 3), np.concatenate([labels_of_ten] * 3))  # same spread, count > dim
    assert np.allclose(narrow.apply(queries), padded.apply(queries), atol=0.05)


def test_the_metric_survives_the_properties_and_a_damaged_one_is_ignored():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(600, 1280)).astype(np.float32)
    metric = learn_metric(vectors, np.repeat(np.arange(6), 100))
    text = metric.to_property()
    assert len(text) < 300_000  # Milvus Lite and the 2.3.5 server took 1 MB properties
    loaded = LearnedMetric.from_property(text, 1280)
    queries = rng.normal(size=(4, 1280)).astype(np.float32)
    assert np.allclose(loaded.apply(queries), metric.apply(queries), atol=2e-3)
    assert LearnedMetric.from_property(text, 512) is None  # another model's dimension
    assert LearnedMetric.from_property(text[:-100], 1280) is None
    assert LearnedMetric.from_property('{"scale": [1.0]}', 1280) is None
    assert LearnedMetric.from_property("", 1280) is None

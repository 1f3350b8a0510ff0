"""Recognition's scoring and evaluation pieces without a model or Milvus: label scores, the decision and
abstention, recognize_vectors over an in-memory neighbour source, AUROC, and the evaluation splits."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import FASHION_DIR
from imgsearch.evaluation import EvalOptions, auroc, load_splits, load_validation, threshold_at_false_accept_rate
from imgsearch.evaluation.metrics import best_threshold_and_margin
from imgsearch.recognition.knn import NoReferencesError, recognize_vectors
from imgsearch.recognition.scoring import ADAPTED_POWER, DEFAULT_POWER, score_labels, scoring_power
from imgsearch.store import Hit


class InMemoryNeighbours:
    """What recognize_vectors needs of a store (search with vectors, label counts), by exact search in numpy."""

    collection = "in-memory"

    def __init__(self, vectors: np.ndarray, labels: list[str], weights: str = "") -> None:
        self.weights = weights  # the embedding the collection records: "" the model's own
        self.vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        self.labels = labels
        self.filters: list[str] = []

    def search(self, queries, k=10, filter="", search_params=None, with_vectors=False):
        self.filters.append(filter)
        labeled = [i for i, label in enumerate(self.labels) if label]
        results = []
        for query in np.asarray(queries, dtype=np.float32):
            scores = self.vectors[labeled] @ (query / np.linalg.norm(query))
            order = np.argsort(-scores)[:k]
            results.append(
                [
                    Hit(id=str(labeled[i]), score=float(scores[i]), path=f"{labeled[i]}.png", label=self.labels[labeled[i]],
                        metadata={}, vector=self.vectors[labeled[i]] if with_vectors else None)
                    for i in order
                ]
            )
        return results

    def label_counts(self, labels):
        return {label: self.labels.count(label) for label in labels}


def clusters(rng, centres: dict[str, np.ndarray], per_class: int, spread: float = 0.1):
    vectors, labels = [], []
    for label, centre in centres.items():
        vectors.append(centre + spread * rng.normal(size=(per_class, centre.size)))
        labels += [label] * per_class
    return np.concatenate(vectors).astype(np.float32), labels


def test_score_labels_prefers_the_closer_prototype_and_corrects_for_density():
    query = np.array([1.0, 0.0])
    near, far = np.array([[0.9, 0.1]]), np.array([[0.6, 0.4]])
    scores = score_labels(query, np.concatenate([near, far]), ["a", "b"], power=1.0, density=0.0)
    assert scores["a"] > scores["b"]
    # equal geometry, but "a" has 1000 references and "b" 5: the prior favours the sparse class
    same = np.array([[0.8, 0.2], [0.8, 0.2]])
    prior = score_labels(query, same, ["a", "b"], {"a": 1000, "b": 5}, power=1.0, density=0.025)
    assert prior["b"] > prior["a"]
    assert prior["b"] - prior["a"] == pytest.approx(0.025 * (np.log(1000) - np.log(5)))


def test_auroc_and_threshold():
    assert auroc(np.array([0.9, 0.8]), np.array([0.1, 0.2])) == 1.0
    assert auroc(np.array([0.1, 0.2]), np.array([0.9, 0.8])) == 0.0
    assert auroc(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0.5
    unknown = np.linspace(0, 1, 101)
    threshold = threshold_at_false_accept_rate(unknown, 0.05)
    assert np.mean(unknown >= threshold) <= 0.05 and np.mean(unknown >= threshold - 0.011) > 0.05


def test_the_ceiling_of_threshold_and_margin_rules_rejects_small_leads_and_respects_the_ratio():
    # 80 right answers (some alone among the neighbours: infinite margin), 20 wrong ones with a small lead over the
    # second label, 50 never-enrolled queries with low confidence: a margin between the leads and a threshold above
    # the never-enrolled confidences accept only right answers.
    right = np.array([True] * 80 + [False] * 20)
    confidences = np.full(100, 0.9)
    margins = np.array([0.1] * 70 + [np.inf] * 10 + [0.01] * 20)
    unknown_confidences, unknown_margins = np.full(50, 0.5), np.full(50, 0.05)
    best = best_threshold_and_margin(right, confidences, margins, unknown_confidences, unknown_margins, min_ratio=4)
    assert best["accuracy"] == 1.0
    accepted = (confidences >= best["threshold"]) & (margins >= best["margin"])
    assert accepted.tolist() == right.tolist()  # the pair it reports does what it says
    assert not ((unknown_confidences >= best["threshold"]) & (unknown_margins >= best["margin"])).any()
    assert best["known_unknown_rate"] == pytest.approx(0.2) and best["never_enrolled_unknown_rate"] == 1.0
    # Never-enrolled queries that look exactly like the right answers: turning them away turns as many known ones
    # away, so no rule reaches the ratio.
    assert best_threshold_and_margin(right, confidences, margins, np.full(50, 0.9), np.full(50, 0.1), min_ratio=4) is None
    # The ratio bounds what can be bought: with half the never-enrolled queries confident and leading by as much as
    # the right answers, cutting the wrong answers (known 0.2 unknown) turns away only half of them (ratio 2.5), so
    # at ratio 4 only the threshold can act, and the wrong answers stay.
    mixed_confidences = np.array([0.5] * 25 + [0.9] * 25)
    capped = best_threshold_and_margin(right, confidences, margins, mixed_confidences, np.full(50, 0.1), min_ratio=4)
    assert capped["accuracy"] == pytest.approx(0.8) and capped["known_unknown_rate"] == 0.0
    assert best_threshold_and_margin(right, confidences, margins, mixed_confidences, np.full(50, 0.1), min_ratio=2)["accuracy"] == 1.0


def test_validation_queries_are_neither_references_nor_test_queries():
    options = EvalOptions(references_per_class=10, queries_per_class=3)
    references, queries = load_splits(str(FASHION_DIR), options)
    validation = load_validation(str(FASHION_DIR), options, per_class=5)
    assert not set(validation.names) & set(references.names)
    assert not set(validation.names) & set(queries.names)
    assert np.bincount(validation.targets).tolist() == [5] * len(validation.classes)
    # the same draw every time, so a tuning run can be repeated
    assert load_validation(str(FASHION_DIR), options, per_class=5).names == validation.names


def test_recognize_vectors_names_the_nearest_class_and_abstains_below_the_threshold():
    rng = np.random.default_rng(0)
    centres = {name: rng.normal(size=32) for name in ("boot", "bag", "shirt")}
    vectors, labels = clusters(rng, centres, 20)
    vectors = np.concatenate([vectors, rng.normal(size=(5, 32)).astype(np.float32)])
    labels += [""] * 5  # unlabeled rows are never neighbours
    store = InMemoryNeighbours(vectors, labels)
    queries = np.stack([centres["bag"], centres["shirt"], rng.normal(size=32)]).astype(np.float32)
    decided = recognize_vectors(store, queries, k=30, threshold=None)
    assert [label for label, _, _ in decided[:2]] == ["bag", "shirt"]
    assert all(n.label for _, _, neighbours in decided for n in neighbours)
    assert store.filters == ['label != ""']
    confidences = [confidence for _, confidence, _ in decided]
    threshold = (confidences[0] + confidences[2]) / 2  # between a class centre and a random direction
    strict = recognize_vectors(store, queries, k=30, threshold=threshold)
    assert strict[0][0] == "bag" and strict[2][0] is None and strict[2][1] == pytest.approx(confidences[2])


def test_recognize_vectors_without_labeled_rows_says_what_to_do():
    store = InMemoryNeighbours(np.eye(4, dtype=np.float32), ["", "", "", ""])
    with pytest.raises(NoReferencesError, match="imgsearch enroll"):
        recognize_vectors(store, np.eye(4, dtype=np.float32)[:1])


def test_an_adapted_collection_is_scored_without_the_power_transform_and_the_model_own_with_it():
    assert scoring_power("") == scoring_power(None) == DEFAULT_POWER != ADAPTED_POWER == scoring_power("adapted:0123456789abcdef")
    rng = np.random.default_rng(3)
    centres = {name: rng.normal(size=16) for name in ("boot", "bag")}
    vectors, labels = clusters(rng, centres, 8, spread=0.5)  # signed components: the transform changes the cosines
    query = (centres["bag"] + 0.5 * rng.normal(size=16)).astype(np.float32)
    for weights, power in (("", DEFAULT_POWER), ("adapted:0123456789abcdef", ADAPTED_POWER)):
        store = InMemoryNeighbours(vectors, labels, weights)
        (label, confidence, neighbours), = recognize_vectors(store, query[None], k=16, threshold=None)
        expected = score_labels(query, np.stack([store.vectors[int(n.id)] for n in neighbours]), [n.label for n in neighbours],
                                store.label_counts({"boot", "bag"}), power=power)
        assert label == max(expected, key=expected.get) and confidence == pytest.approx(max(expected.values()), abs=1e-6)
    frozen = recognize_vectors(InMemoryNeighbours(vectors, labels), query[None], k=16)[0][1]
    adapted = recognize_vectors(InMemoryNeighbours(vectors, labels, "adapted:0123456789abcdef"), query[None], k=16)[0][1]
    assert abs(frozen - adapted) > 1e-3  # the two scorings differ on these vectors, so the check above can fail

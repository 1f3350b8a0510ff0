"""The protocols `imgsearch eval` runs: splits, k-NN and n-shot accuracy, open-set AUROC with a calibrated
threshold, late enrolment and the heads; every one scores with `metrics.predict`, the same scoring as `recognize`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from imgsearch.config import HEAD_EPOCHS, HEAD_STAGES, HeadMode
from imgsearch.datasets import FASHION_MNIST_PREFIX, LabeledSet, class_folders, fashion_mnist, parse_dataset
from imgsearch.encoders import Encoder
from imgsearch.errors import CatalogError
from imgsearch.evaluation.metrics import auroc, confusion_matrix, predict, threshold_at_false_accept_rate
from imgsearch.recognition.head import linear_probabilities, stratified_split, train_linear
from imgsearch.recognition.scoring import DEFAULT_DENSITY, DEFAULT_K, DEFAULT_PER_CLASS, DEFAULT_POWER, scoring_power

Progress = Callable[[str], None]
ENCODE_BATCH = 64


@dataclass
class EvalOptions:
    references_per_class: int = 600
    queries_per_class: int | None = None  # None: every test image (Fashion-MNIST) or the held-out fifth (folders)
    k_values: tuple[int, ...] = (1, 5, 20, DEFAULT_K)
    shots: tuple[int, ...] = (1, 2, 5, 10, 20)
    episodes: int = 50
    episode_queries: int = 1000  # queries scored per episode (a random sample)
    unknown_classes: int = 2
    false_accept_rate: float = 0.05
    late_enrolment_shots: int = 5
    late_enrolment_episodes: int = 10  # per class; with 3 the mean moved by ~3 points between samples
    k: int = DEFAULT_K
    per_class: int = DEFAULT_PER_CLASS
    power: float = DEFAULT_POWER
    density: float = DEFAULT_DENSITY
    finetune: bool = False
    finetune_epochs: int = HEAD_EPOCHS[HeadMode.finetune]
    finetune_stages: int = HEAD_STAGES
    workers: int = 0
    seed: int = 0


@dataclass
class EncodedSplit:
    vectors: np.ndarray
    targets: np.ndarray
    data: LabeledSet


def load_splits(spec: str, options: EvalOptions, min_side: int = 224) -> tuple[LabeledSet, LabeledSet]:
    """(references, queries): Fashion-MNIST's train and test splits, or a per-class split of a folder."""
    rng = np.random.default_rng(options.seed)
    pool, chosen, test = _reference_pool(spec, options, min_side, rng)
    queries = test.subset(_per_class(test.targets, options.queries_per_class, rng))
    return pool.subset(chosen), queries


def load_validation(spec: str, options: EvalOptions, per_class: int, min_side: int = 224) -> LabeledSet:
    """Up to `per_class` images per class from the reference side that `load_splits` did not pick as references:
    queries for choosing scoring parameters without looking at the test queries."""
    pool, chosen, _ = _reference_pool(spec, options, min_side, np.random.default_rng(options.seed))
    rest = np.setdiff1d(np.arange(len(pool.targets)), chosen)
    picked = _per_class(pool.targets[rest], per_class, np.random.default_rng(options.seed + 1))
    return pool.subset(rest[picked])


def _reference_pool(spec: str, options: EvalOptions, min_side: int, rng) -> tuple[LabeledSet, np.ndarray, LabeledSet]:
    """(the set references come from, the indices chosen as references, the set queries come from)."""
    kind, path = parse_dataset(spec)
    if kind == FASHION_MNIST_PREFIX:
        train = fashion_mnist("train", path)
        return train, _per_class(train.targets, options.references_per_class, rng), fashion_mnist("test", path)
    data = class_folders(path, min_side=min_side)
    reference_index, query_index = stratified_split(data.targets, 0.2, options.seed)
    pool = data.subset(reference_index)
    return pool, _per_class(pool.targets, options.references_per_class, rng), data.subset(query_index)


def _per_class(targets: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    chosen = []
    for target in np.unique(targets):
        members = np.flatnonzero(targets == target)
        chosen.extend(members if limit is None or len(members) <= limit else rng.choice(members, limit, replace=False))
    return np.array(sorted(chosen), dtype=np.int64)


def encode_set(encoder: Encoder, data: LabeledSet, progress: Progress | None = None, what: str = "images") -> EncodedSplit:
    chunks = []
    for start in range(0, len(data.sources), ENCODE_BATCH):
        images = [source() for source in data.sources[start : start + ENCODE_BATCH]]
        chunks.append(encoder.encode_images(images))
        if progress and (start // ENCODE_BATCH) % 20 == 0:
            progress(f"encoding {what}: {start + len(images)}/{len(data.sources)}")
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)
    return EncodedSplit(vectors, data.targets, data)


def evaluate(
    encoder: Encoder,
    spec: str,
    options: EvalOptions | None = None,
    *,
    progress: Progress | None = None,
    weights: Path | None = None,
) -> dict[str, Any]:
    """Encode `spec`'s references and queries, then measure everything `imgsearch eval` reports, scored as
    `recognize` scores the encoder's collections (an adapted embedding without the power transform)."""
    options = replace(options or EvalOptions(), power=scoring_power(encoder.weights_id))
    started = time.perf_counter()
    reference_set, query_set = load_splits(spec, options, encoder.input_size)
    references = encode_set(encoder, reference_set, progress, "references")
    queries = encode_set(encoder, query_set, progress, "queries")
    encode_seconds = time.perf_counter() - started
    report = evaluate_encoded(references, queries, options, progress=progress)
    report = {"dataset": spec, "encoder": encoder.name, **report}
    if options.finetune:
        report["head"]["finetune"] = finetune_accuracy(encoder, reference_set, query_set, options, weights, progress)
    report["seconds"] = {"encode": round(encode_seconds, 1), "total": round(time.perf_counter() - started, 1)}
    return report


def evaluate_encoded(
    references: EncodedSplit, queries: EncodedSplit, options: EvalOptions, *, progress: Progress | None = None
) -> dict[str, Any]:
    rng = np.random.default_rng(options.seed)
    classes = references.data.classes
    score = {"per_class": options.per_class, "power": options.power, "density": options.density}
    report: dict[str, Any] = {
        "classes": classes,
        "references": len(references.targets),
        "queries": len(queries.targets),
        "settings": {"k": options.k, **score, "episodes": options.episodes, "seed": options.seed},
    }
    knn = {}
    for k in options.k_values:
        predicted, _ = predict(references.vectors, references.targets, queries.vectors, k=k, **score)
        knn[str(k)] = round(float((predicted == queries.targets).mean()), 4)
    report["knn_accuracy"] = knn
    predicted, _ = predict(references.vectors, references.targets, queries.vectors, k=options.k, **score)
    report["accuracy"] = round(float((predicted == queries.targets).mean()), 4)
    report["confusion"] = confusion_matrix(queries.targets, predicted, len(classes)).tolist()
    if progress:
        progress(f"k-NN accuracy {knn}")
    report["n_shot"] = n_shot_curve(references, queries, options, rng, score)
    if progress:
        progress("n-shot " + ", ".join(f"{n}: {v['mean']:.3f}" for n, v in report["n_shot"].items()))
    report["open_set"] = open_set(references, queries, classes, options, score)
    report["late_enrolment"] = late_enrolment(references, queries, options, rng, score)
    labels = [classes[t] for t in references.targets]
    state, head_classes, metrics = train_linear(references.vectors, labels, seed=options.seed)
    probabilities = linear_probabilities(state, queries.vectors)
    head_targets = np.array([classes.index(head_classes[i]) for i in probabilities.argmax(1)])
    report["head"] = {"linear": {"accuracy": round(float((head_targets == queries.targets).mean()), 4), **metrics}}
    return report


def n_shot_curve(references: EncodedSplit, queries: EncodedSplit, options: EvalOptions, rng, score) -> dict[str, Any]:
    curve = {}
    for shots in options.shots:
        accuracies = []
        for _ in range(options.episodes):
            chosen = _sample_shots(references.targets, shots, rng)
            if chosen is None:
                break
            sample = rng.choice(len(queries.targets), min(options.episode_queries, len(queries.targets)), replace=False)
            predicted, _ = predict(
                references.vectors[chosen], references.targets[chosen], queries.vectors[sample], k=options.k, **score
            )
            accuracies.append(float((predicted == queries.targets[sample]).mean()))
        if accuracies:
            curve[str(shots)] = {
                "mean": round(float(np.mean(accuracies)), 4),
                "std": round(float(np.std(accuracies)), 4),
                "episodes": len(accuracies),
            }
    return curve


def _sample_shots(targets: np.ndarray, shots: int, rng) -> np.ndarray | None:
    chosen = []
    for target in np.unique(targets):
        members = np.flatnonzero(targets == target)
        if len(members) < shots:
            return None
        chosen.extend(rng.choice(members, shots, replace=False))
    return np.array(chosen, dtype=np.int64)


def open_set(references: EncodedSplit, queries: EncodedSplit, classes: list[str], options: EvalOptions, score) -> dict[str, Any]:
    """Enroll all but the last `unknown_classes` classes; queries of those must score below the known ones."""
    if len(classes) - options.unknown_classes < 2 or options.unknown_classes < 1:
        return {"skipped": f"needs at least {options.unknown_classes + 2} classes"}
    unknown = list(range(len(classes) - options.unknown_classes, len(classes)))
    known_references = ~np.isin(references.targets, unknown)
    known_queries = ~np.isin(queries.targets, unknown)
    predicted, confidence = predict(
        references.vectors[known_references], references.targets[known_references], queries.vectors, k=options.k, **score
    )
    positive, negative = confidence[known_queries], confidence[~known_queries]
    threshold = threshold_at_false_accept_rate(negative, options.false_accept_rate)
    accepted = positive >= threshold
    correct = predicted[known_queries] == queries.targets[known_queries]
    return {
        "unknown_classes": [classes[i] for i in unknown],
        "auroc": round(auroc(positive, negative), 4),
        "threshold": round(threshold, 6),
        "target_false_accept_rate": options.false_accept_rate,
        "false_accept_rate": round(float((negative >= threshold).mean()), 4),
        "known_accept_rate": round(float(accepted.mean()), 4),
        "accuracy_of_accepted": round(float(correct[accepted].mean()), 4) if accepted.any() else None,
    }


def late_enrolment(references: EncodedSplit, queries: EncodedSplit, options: EvalOptions, rng, score) -> dict[str, Any]:
    """Each class in turn is enrolled last with a few shots next to the others' full references: its accuracy,
    and how much the earlier classes lose against recognition without it."""
    shots = options.late_enrolment_shots
    sample = rng.choice(len(queries.targets), min(2000, len(queries.targets)), replace=False)
    query_vectors, query_targets = queries.vectors[sample], queries.targets[sample]
    new_accuracy, drops = [], []
    for late in np.unique(references.targets):
        earlier = references.targets != late
        earlier_queries = query_targets != late
        if earlier_queries.all():
            continue
        before, _ = predict(
            references.vectors[earlier], references.targets[earlier], query_vectors[earlier_queries], k=options.k, **score
        )
        before_accuracy = float((before == query_targets[earlier_queries]).mean())
        members = np.flatnonzero(~earlier)
        for _ in range(options.late_enrolment_episodes):
            enrolled = np.concatenate([np.flatnonzero(earlier), rng.choice(members, min(shots, len(members)), replace=False)])
            predicted, _ = predict(
                references.vectors[enrolled], references.targets[enrolled], query_vectors, k=options.k, **score
            )
            new_accuracy.append(float((predicted[~earlier_queries] == late).mean()))
            drops.append(before_accuracy - float((predicted[earlier_queries] == query_targets[earlier_queries]).mean()))
    if not new_accuracy:
        return {"skipped": "no queries"}
    return {
        "shots": shots,
        "new_class_accuracy": round(float(np.mean(new_accuracy)), 4),
        "new_class_accuracy_std": round(float(np.std(new_accuracy)), 4),
        "earlier_classes_drop": round(float(np.mean(drops)), 4),
        "earlier_classes_drop_max": round(float(np.max(drops)), 4),
        "runs": len(new_accuracy),
    }


def finetune_accuracy(
    encoder: Encoder, reference_set: LabeledSet, query_set: LabeledSet, options: EvalOptions, weights, progress
) -> dict[str, Any]:
    from imgsearch.recognition.head import FinetunedClassifier, HeadInfo, TrainedHead, train_finetune

    labels = [reference_set.classes[t] for t in reference_set.targets]
    state, head_classes, metrics = train_finetune(
        encoder.name, reference_set.sources, labels, weights=weights, device=str(encoder.device) if encoder.device_type == "cuda" else "auto",
        epochs=options.finetune_epochs, stages=options.finetune_stages, workers=options.workers, seed=options.seed,
        progress=progress,
    )
    head = TrainedHead(HeadInfo(head_classes, encoder.name, encoder.dim, "finetune", ""), state)
    classifier = FinetunedClassifier(head, weights=weights, device=metrics["device"])
    correct = 0
    for start in range(0, len(query_set.sources), 256):
        images = [source() for source in query_set.sources[start : start + 256]]
        predicted = classifier.probabilities(images).argmax(1)
        truth = query_set.targets[start : start + 256]
        correct += int(sum(head_classes[p] == query_set.classes[t] for p, t in zip(predicted, truth)))
    metrics.pop("history", None)
    return {"accuracy": round(correct / max(len(query_set.sources), 1), 4), "test_images": len(query_set.sources), **metrics}


def check_options(options: EvalOptions) -> None:
    if not 0 < options.false_accept_rate < 1:
        raise CatalogError(f"false-accept rate must be between 0 and 1, got {options.false_accept_rate}")


def parse_int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise CatalogError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise CatalogError(f"expected positive integers, got {text!r}")
    return values

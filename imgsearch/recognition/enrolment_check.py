"""What an enrolment did to recognition, told before anyone is surprised by it (it warns, never refuses).

For the references just enrolled under a label:
- how tightly they cluster (mean and least pairwise cosine);
- which other labels they lie nearer to than to the other photos of their label ("3 of 5 photos are nearer to
  'shirt' than to the other photos of 'blouse'": a wrong label, or a class the catalog holds under another name);
- the expected effect on those labels: their references recognised leave-one-out (own row excluded, the scoring
  `recognize` uses) without the new label and with it, the accuracy before and after.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from imgsearch.recognition.abstention import fetch_vectors, with_vectors
from imgsearch.recognition.scoring import DEFAULT_K, score_left_out, scoring_power, without_own_rows
from imgsearch.store import LABELED, MilvusStore, label_is, labeled_except
from imgsearch.store.search_params import filtered
from imgsearch.terminal import visible

CHECKED = 200  # new references looked at (a sample beyond that)
AFFECTED_SAMPLE = 30  # references per affected label scored before and after
AFFECTED_LABELS = 3
LOOSE = 0.5  # mean pairwise cosine under this: photos of several things under one label


@dataclass
class EnrolmentCheck:
    label: str
    references: int  # new references checked
    mean_similarity: float | None  # mean pairwise cosine of the new references (None with one)
    least_similarity: float | None
    nearer_elsewhere: dict[str, int] = field(default_factory=dict)  # other label -> photos nearer to it than to each other
    effect: list[dict[str, Any]] = field(default_factory=list)  # label, references scored, accuracy before / after
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_enrolment(store: MilvusStore, label: str, ids: list[str], *, k: int = DEFAULT_K) -> EnrolmentCheck | None:
    """The check for `ids` just enrolled as `label`; None when none of them is stored."""
    ids = sorted(set(ids))
    if len(ids) > CHECKED:
        ids = sorted(np.random.default_rng(0).choice(ids, CHECKED, replace=False).tolist())
    rows = store.get(ids, fields=("id", "vector"))
    if not rows:
        return None
    order = sorted(rows)
    vectors = np.array([rows[i]["vector"] for i in order], dtype=np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    similarity = vectors @ vectors.T
    check = EnrolmentCheck(label=label, references=len(order), mean_similarity=None, least_similarity=None)
    if len(order) > 1:
        pairs = similarity[np.triu_indices(len(order), 1)]
        check.mean_similarity, check.least_similarity = round(float(pairs.mean()), 4), round(float(pairs.min()), 4)
        if check.mean_similarity < LOOSE:
            check.warnings.append(
                f"the {len(order)} photos of {visible(label)!r} are not alike (mean similarity {check.mean_similarity:.2f}): "
                "several different things under one label?"
            )
    # Each new photo's nearest other reference of its own label (new or enrolled before) against its nearest of
    # any other label; a photo alone in its label has nothing to be compared with.
    own_hits = store.search(vectors, k=2, filter=label_is(label), fields=("label",))
    other_hits = store.search(vectors, k=1, filter=labeled_except(label), fields=("label",))
    nearer: Counter = Counter()
    for row_id, own, other in zip(order, own_hits, other_hits):
        fellows = [hit.score for hit in own if hit.id != row_id]
        if fellows and other and other[0].score > fellows[0]:
            nearer[other[0].label] += 1
    check.nearer_elsewhere = dict(nearer.most_common())
    for other, count in nearer.most_common(AFFECTED_LABELS):
        check.effect.append(_effect(store, other, label, k))
        share = "1 photo is" if count == 1 else f"{count} of {len(order)} photos are"
        check.warnings.append(f"{share} nearer to {visible(other)!r} than to the other photos of {visible(label)!r}")
    for effect in check.effect:
        if effect["accuracy_before"] is not None and effect["accuracy_after"] < effect["accuracy_before"] - 0.05:
            check.warnings.append(
                f"{visible(effect['label'])!r} references recognised leave-one-out: {effect['accuracy_before']:.2f} "
                f"before, {effect['accuracy_after']:.2f} with {visible(label)!r}"
            )
    return check


def _effect(store: MilvusStore, affected: str, new_label: str, k: int) -> dict[str, Any]:
    """Leave-one-out accuracy of `affected`'s references without the new label's rows and with them."""
    ids = sorted(row["id"] for row in store.iter_rows(("id",), filter=label_is(affected)))
    if len(ids) > AFFECTED_SAMPLE:
        ids = sorted(np.random.default_rng(0).choice(ids, AFFECTED_SAMPLE, replace=False).tolist())
    vectors: dict[str, np.ndarray] = {}
    fetch_vectors(store, ids, vectors)
    ids = [row_id for row_id in ids if row_id in vectors]
    effect: dict[str, Any] = {"label": affected, "references": len(ids), "accuracy_before": None, "accuracy_after": None}
    if not ids:
        return effect
    queries = np.stack([vectors[row_id] for row_id in ids])
    for when, where in (("before", labeled_except(new_label)), ("after", LABELED)):
        results = store.search(queries, k=k + 1, filter=where, search_params=filtered(k + 1), fields=("label",))
        neighbours = without_own_rows(results, ids, k)
        counts = store.label_counts({hit.label for hits in neighbours for hit in hits} | {affected})
        neighbours = with_vectors(store, neighbours, vectors)
        answers = [answer for query, hits in zip(queries, neighbours) for answer in score_left_out(query, hits, affected, counts, scoring_power(store.weights))]
        effect[f"accuracy_{when}"] = round(float(np.mean([right for right, _, _ in answers])), 4) if answers else None
    return effect

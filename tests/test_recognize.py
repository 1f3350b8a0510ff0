"""Recognition with real Lite0 vectors in real Milvus Lite: enrolment is live at once, unknowns abstain,
heads round-trip and refuse the wrong collection, and the scoring pieces behave as documented."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import FASHION_DIR
from imgsearch.config import load_settings
from imgsearch.evaluation import threshold_at_false_accept_rate
from imgsearch.ingest.catalog import CatalogEntry, file_sha256
from imgsearch.ingest.enroll import enroll_paths
from imgsearch.ingest.plan import update_moved
from imgsearch.recognition.abstention import Calibration, load_calibration, save_calibration
from imgsearch.recognition.head import HeadError, head_paths, linear_probabilities, load_head, train_finetune, train_head_on_store
from imgsearch.recognition.knn import recognize_paths, recognize_vectors
from imgsearch.store import ImageRecord

pytestmark = pytest.mark.slow  # real weights and Milvus Lite


KNOWN = ["tshirt", "trouser", "pullover", "dress", "sandal"]


def class_files(name: str) -> list:
    return sorted((FASHION_DIR / name).glob("*.png"))


@pytest.fixture(scope="module")
def vectors_by_class(onnx_encoder):
    """Lite0 vectors of the sample catalog's Fashion-MNIST images, per class (30 each)."""
    encoded = {}
    for folder in sorted(p for p in FASHION_DIR.iterdir() if p.is_dir()):
        files = class_files(folder.name)
        encoded[folder.name] = (files, onnx_encoder.encode_images([Image.open(f).convert("RGB") for f in files]))
    return encoded


def store_references(store, vectors_by_class, classes, per_class):
    records = []
    for name in classes:
        files, vectors = vectors_by_class[name]
        records += [
            ImageRecord(id=file_sha256(f), vector=v, path=str(f), label=name) for f, v in zip(files[:per_class], vectors[:per_class])
        ]
    store.upsert(records)
    return len(records)


def test_a_class_enrolled_later_is_recognised_at_once(make_store, onnx_encoder, vectors_by_class):
    store = make_store()
    stored = store_references(store, vectors_by_class, KNOWN, 20)
    bag_files, bag_vectors = vectors_by_class["bag"]
    queries = bag_vectors[20:]
    before = [label for label, _, _ in recognize_vectors(store, queries)]
    assert "bag" not in before
    ids_before = {row["id"] for row in store.iter_rows(("id",))}

    report = enroll_paths(onnx_encoder, store, "bag", bag_files[:5], load_settings(workers=0))

    assert report.indexed == 5 and not report.failed
    assert store.count() == stored + 5  # only the new references were added ...
    assert ids_before <= {row["id"] for row in store.iter_rows(("id",))}  # ... and nothing else was touched
    after = [label for label, _, _ in recognize_vectors(store, queries)]
    assert after.count("bag") >= 8, after  # of 10 held-out bags, with no retraining


def test_enrolling_stored_content_relabels_it_without_reencoding_and_keeps_its_row(make_store, onnx_encoder, vectors_by_class, tmp_path):
    """Enrolling a copy of stored content changes the label only: the row keeps its own path (the copy may be a
    temporary download), its manifest metadata and its recorded copies; the enrolled file becomes a copy."""
    store = make_store()
    store_references(store, vectors_by_class, ["sneaker"], 3)
    original = class_files("sneaker")[0]
    digest = file_sha256(original)
    earlier_copy = str(tmp_path / "earlier.png")
    [row] = store.get([digest], fields=("id", "vector", "path", "label")).values()
    store.upsert([ImageRecord(digest, row["vector"], row["path"], "sneaker", {"sku": 7, "imgsearch.copies": [earlier_copy]})])
    copy = tmp_path / "copy.png"
    copy.write_bytes(original.read_bytes())
    report = enroll_paths(onnx_encoder, store, "trainer", [copy], load_settings(workers=0))
    assert (report.indexed, report.updated) == (0, 1)
    assert report.enrolment_check is not None and report.enrolment_check["references"] == 1  # the relabelled row counts
    row = store.get([digest])[digest]
    assert (row["label"], row["path"]) == ("trainer", str(original))
    assert row["metadata"] == {"sku": 7, "imgsearch.copies": [earlier_copy, str(copy.resolve())]}
    update_moved(store, [(CatalogEntry(tmp_path / "gone.png", "sneaker"), digest)])  # a file already gone is no copy
    row = store.get([digest])[digest]
    assert (row["label"], row["path"]) == ("sneaker", str(original)) and str(tmp_path / "gone.png") not in row["metadata"]["imgsearch.copies"]


def test_unseen_classes_abstain_more_often_than_known_ones(make_store, vectors_by_class):
    store = make_store()
    store_references(store, vectors_by_class, KNOWN, 20)
    # Calibrate on one never-enrolled class, then test on two others.
    calibration = vectors_by_class["coat"][1]
    confidences = np.array([c for _, c, _ in recognize_vectors(store, calibration)])
    threshold = threshold_at_false_accept_rate(confidences, 0.1)
    known = np.concatenate([vectors_by_class[name][1][20:] for name in KNOWN])
    unseen = np.concatenate([vectors_by_class[name][1] for name in ("bag", "ankle_boot")])
    known_null = np.mean([label is None for label, _, _ in recognize_vectors(store, known, threshold=threshold)])
    unseen_null = np.mean([label is None for label, _, _ in recognize_vectors(store, unseen, threshold=threshold)])
    assert unseen_null > known_null + 0.2, (known_null, unseen_null)


def test_recognize_paths_reports_neighbours_and_bad_files(make_store, onnx_encoder, vectors_by_class, tmp_path):
    store = make_store()
    store_references(store, vectors_by_class, KNOWN, 10)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    query = class_files("trouser")[25]
    results, failed = recognize_paths(onnx_encoder, store, [query, broken], k=7)
    assert failed == [{"path": str(broken), "error": "not a recognised image format"}]
    [result] = results
    assert result.label == "trouser" and result.path == str(query)
    scores = [n.score for n in result.neighbours]
    assert len(scores) == 7 and scores == sorted(scores, reverse=True)
    assert {n.label for n in result.neighbours} <= set(KNOWN)


def test_calibration_is_stored_with_the_collection(make_store):
    store = make_store()
    assert load_calibration(store) is None
    save_calibration(store, Calibration(threshold=0.73, false_accept_rate=0.05, dataset="fashion-mnist"))
    assert load_calibration(store) == Calibration(threshold=0.73, false_accept_rate=0.05, dataset="fashion-mnist")


def test_the_references_calibrate_unknown_themselves_and_the_sources_take_turns(make_store, vectors_by_class):
    from imgsearch.recognition.abstention import resolve_abstention, self_calibrate

    singles = make_store(collection="one_photo_each")
    store_references(singles, vectors_by_class, KNOWN, 1)
    assert self_calibrate(singles) is None  # no label has a second reference to leave one out of
    store = make_store()
    assert resolve_abstention(store, None).source == "none"
    store_references(store, vectors_by_class, ["bag"], 20)
    assert self_calibrate(store) is None and resolve_abstention(store, None).threshold is None  # one label: nothing to tell apart
    stored = store_references(store, vectors_by_class, KNOWN, 20)
    own = self_calibrate(store)
    assert own.references == stored + 20 and own.labels == 6 and own.sample == stored + 20  # all of them: under 50 each
    assert 0 < own.threshold < 1 and 0 <= own.margin < 0.2 and 0.5 < own.leave_one_out_accuracy <= 1
    again = self_calibrate(store)
    assert replace(again, seconds=0) == replace(own, seconds=0)  # a fixed sample: the same references, the same rule
    rule = resolve_abstention(store, None)
    assert (rule.threshold, rule.margin) == (own.threshold, own.margin) and rule.source.startswith(f"self-calibrated on {stored + 20} references")
    known = np.concatenate([vectors_by_class[name][1][20:] for name in KNOWN])
    unseen = np.concatenate([vectors_by_class[name][1] for name in ("coat", "ankle_boot")])
    known_null = np.mean([label is None for label, _, _ in recognize_vectors(store, known, threshold=rule.threshold, margin=rule.margin)])
    unseen_null = np.mean([label is None for label, _, _ in recognize_vectors(store, unseen, threshold=rule.threshold, margin=rule.margin)])
    assert unseen_null > 2 * known_null and known_null < 0.4, (known_null, unseen_null)
    save_calibration(store, Calibration(threshold=0.73, false_accept_rate=0.05, dataset="fashion-mnist"))
    assert resolve_abstention(store, None).to_dict() == {
        "threshold": 0.73, "margin": None, "threshold_source": "eval on fashion-mnist at false-accept rate 0.05",
    }
    assert resolve_abstention(store, 0.5).to_dict() == {"threshold": 0.5, "margin": None, "threshold_source": "given"}


def test_the_calibration_from_vectors_in_memory_equals_the_one_from_milvus_searches(make_store, vectors_by_class, monkeypatch):
    """Collections of up to IN_MEMORY_REFERENCES are calibrated from exact neighbours in numpy (3.6 times faster on
    5,000 Lite rows); larger ones by searches, both of whose branches (labels searched past whole, and labels left
    out by a filter) must reach the same rule."""
    from imgsearch.recognition import abstention

    store = make_store()
    store_references(store, vectors_by_class, KNOWN, 20)
    store_references(store, vectors_by_class, ["bag"], 7)
    in_memory = abstention.self_calibrate(store)
    assert in_memory is not None and in_memory.labels == len(KNOWN) + 1
    monkeypatch.setattr(abstention, "IN_MEMORY_REFERENCES", 0)
    for wide_search in (abstention.WIDE_SEARCH, 10):  # 10: every label but bag goes through the filtered branch
        monkeypatch.setattr(abstention, "WIDE_SEARCH", wide_search)
        searched = abstention.self_calibrate(store)
        assert replace(searched, seconds=0) == replace(in_memory, seconds=0), wide_search


def test_reference_counts_stored_with_the_calibration_spare_count_queries_until_a_label_is_new(make_store, vectors_by_class, monkeypatch):
    from imgsearch.recognition.abstention import resolve_abstention, self_calibrate

    store = make_store()
    store_references(store, vectors_by_class, KNOWN, 12)
    store_references(store, vectors_by_class, ["bag"], 4)
    self_calibrate(store)
    rule = resolve_abstention(store, None)
    assert rule.reference_counts == {**dict.fromkeys(KNOWN, 12), "bag": 4}
    assert resolve_abstention(store, 0.5).reference_counts == rule.reference_counts  # whichever threshold applies
    counted: list[set] = []
    count_in_milvus = store.label_counts
    monkeypatch.setattr(store, "label_counts", lambda labels: counted.append(set(labels)) or count_in_milvus(labels))
    queries = np.concatenate([vectors_by_class[name][1][20:23] for name in [*KNOWN, "bag", "coat"]])
    stored = recognize_vectors(store, queries, threshold=rule.threshold, margin=rule.margin, reference_counts=rule.reference_counts)
    queried = recognize_vectors(store, queries, threshold=rule.threshold, margin=rule.margin)
    assert counted[0] == set() and counted[1] >= {"bag", "tshirt"}  # the census, then Milvus: the same answers
    assert [(label, round(confidence, 6)) for label, confidence, _ in stored] == [(label, round(confidence, 6)) for label, confidence, _ in queried]
    store_references(store, vectors_by_class, ["coat"], 5)  # enrolled after the calibration: counted in Milvus
    counted.clear()
    answers = recognize_vectors(store, vectors_by_class["coat"][1][25:], reference_counts=rule.reference_counts)
    assert counted == [{"coat"}] and [label for label, _, _ in answers].count("coat") >= 3


def test_a_margin_turns_a_close_call_into_unknown():
    from imgsearch.recognition.scoring import decide

    assert decide({"shirt": 0.80, "tshirt": 0.79}, 0.7) == ("shirt", 0.80)
    assert decide({"shirt": 0.80, "tshirt": 0.79}, 0.7, margin=0.02) == (None, 0.80)
    assert decide({"shirt": 0.80, "tshirt": 0.70}, 0.7, margin=0.02) == ("shirt", 0.80)
    assert decide({"shirt": 0.80}, 0.7, margin=0.02) == ("shirt", 0.80)  # no second label to be close to


def test_linear_head_round_trip_and_refusals(make_store, vectors_by_class, tmp_path):
    store = make_store(collection="shop")
    store_references(store, vectors_by_class, KNOWN, 20)
    head = train_head_on_store(store, "linear", epochs=100)
    assert head.info.labels == sorted(KNOWN) and head.info.encoder == store.model and head.info.dim == store.dim
    weights_path, info_path = head.save(tmp_path / "heads" / "shop-linear")
    assert (weights_path, info_path) == head_paths(tmp_path / "heads" / "shop-linear")

    loaded = load_head(tmp_path / "heads" / "shop-linear", encoder_name=store.model, collection=store.collection)
    queries = np.concatenate([vectors_by_class[name][1][20:] for name in KNOWN])
    assert np.allclose(linear_probabilities(loaded.state, queries), linear_probabilities(head.state, queries))
    predicted = [loaded.info.labels[i] for i in linear_probabilities(loaded.state, queries).argmax(1)]
    truth = [name for name in KNOWN for _ in range(10)]
    assert np.mean([p == t for p, t in zip(predicted, truth)]) >= 0.8
    # Its own threshold is a softmax probability from its validation split, not the k-NN scale.
    threshold = loaded.info.metrics["threshold"]
    top = linear_probabilities(loaded.state, queries).max(1)
    assert 1 / len(KNOWN) < threshold < 1 and top.min() < threshold <= np.median(top)

    with pytest.raises(HeadError, match="trained for encoder efficientnet_lite0, not timm:resnet18"):
        load_head(tmp_path / "heads" / "shop-linear", encoder_name="timm:resnet18", collection=store.collection)
    with pytest.raises(HeadError, match=f"trained on collection {store.collection}, not other"):
        load_head(tmp_path / "heads" / "shop-linear", encoder_name=store.model, collection="other")
    with pytest.raises(HeadError, match="no head at"):
        load_head(tmp_path / "missing", encoder_name=store.model, collection=store.collection)


def test_finetune_trains_only_the_last_stages(tmp_path):
    from imgsearch.datasets import FileImage
    from imgsearch.encoders import load_torch_encoder

    files = class_files("bag")[:4] + class_files("trouser")[:4]
    labels = ["bag"] * 4 + ["trouser"] * 4
    state, classes, metrics = train_finetune(
        "efficientnet_lite0", [FileImage(f) for f in files], labels, device="cpu", epochs=1, stages=1, batch_size=4,
        validation_fraction=0.25,
    )
    original = load_torch_encoder("efficientnet_lite0", device="cpu").module.state_dict()
    assert classes == ["bag", "trouser"] and metrics["epochs_run"] == 1 and metrics["validation_images"] == 2
    assert state["classifier.weight"].shape == (2, 1280)
    stem = state["backbone.conv_stem.weight"]
    assert torch.equal(stem, original["conv_stem.weight"])  # frozen
    assert not torch.equal(state["backbone.conv_head.weight"], original["conv_head.weight"])  # the last stage trained

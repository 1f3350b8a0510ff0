"""The catalog pipeline on real Milvus Lite with the real Lite0 encoder."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import bad_catalog, copy_fashion_catalog, cosine, run_cli
from imgsearch.ingest.catalog import file_sha256
from imgsearch.ingest.pipeline import ingest_catalog
from imgsearch.ingest.reader import MAX_LANES

pytestmark = pytest.mark.slow  # real weights and Milvus Lite



def _catalog(root: Path, per_class: int = 1) -> list[Path]:
    return copy_fashion_catalog(root, per_class)


class EncodeSpy:
    """Counts images that really went through the encoder (the real encode still runs), from any thread."""

    def __init__(self, encoder, monkeypatch):
        self.batches: list[int] = []
        original = encoder.encode

        def counting(batch):
            self.batches.append(len(batch))  # atomic: lanes encode side by side
            return original(batch)

        monkeypatch.setattr(encoder, "encode", counting)

    @property
    def images(self) -> int:
        return sum(self.batches)


def _rows(store) -> dict[str, dict]:
    return {row["id"]: row for row in store.iter_rows(("id", "path", "label", "metadata", "vector"))}


def test_labels_come_from_folders_and_root_images_get_none(tmp_path, encoder, make_store, photos):
    files = _catalog(tmp_path / "catalog")
    photos["coffee"].save(tmp_path / "catalog" / "coffee.jpg")
    store = make_store()
    report = ingest_catalog(tmp_path / "catalog", encoder, store, workers=0)
    assert report.indexed == len(files) + 1 and not report.failed
    by_path = {row["path"]: row for row in _rows(store).values()}
    assert by_path[str((tmp_path / "catalog" / "coffee.jpg").resolve())]["label"] == ""
    for path in files:
        row = by_path[str(path.resolve())]
        assert row["label"] == path.parent.name
        assert row["id"] == file_sha256(path)


def test_no_labels(tmp_path, encoder, make_store):
    _catalog(tmp_path / "catalog")
    store = make_store()
    ingest_catalog(tmp_path / "catalog", encoder, store, use_labels=False, workers=0)
    assert {row["label"] for row in _rows(store).values()} == {""}


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_manifest_gives_labels_and_metadata(tmp_path, encoder, make_store, kind):
    files = _catalog(tmp_path / "catalog")[:3]
    manifest = tmp_path / f"manifest.{kind}"
    relative = [path.relative_to(tmp_path / "catalog").as_posix() for path in files]
    if kind == "csv":
        manifest.write_text("path,label,sku\n" + "".join(f"{p},item{i},{100 + i}\n" for i, p in enumerate(relative)))
    else:
        manifest.write_text("".join(json.dumps({"path": p, "label": f"item{i}", "sku": str(100 + i)}) + "\n" for i, p in enumerate(relative)))
    store = make_store()
    report = ingest_catalog(tmp_path / "catalog", encoder, store, manifest=manifest, workers=0)
    assert report.indexed == 3
    rows = sorted(_rows(store).values(), key=lambda row: row["label"])
    assert [(row["label"], row["metadata"]) for row in rows] == [(f"item{i}", {"sku": str(100 + i)}) for i in range(3)]


def test_a_plain_reingest_keeps_what_the_manifest_gave(tmp_path):
    """`ingest mcat --manifest m.csv` then `ingest mcat`: the walk gives no metadata, so the rows keep the manifest's,
    nothing counts as moved, and alternating the two changes nothing; a manifest with new values does update them."""
    catalog = tmp_path / "mcat"
    files, others = (copied := copy_fashion_catalog(catalog, 1))[:2], copied[2:]
    for other in others:
        shutil.rmtree(other.parent)
    manifest = tmp_path / "m.csv"
    rows = "".join(f"{path.relative_to(catalog).as_posix()},{path.parent.name},{100 + i}\n" for i, path in enumerate(files))
    manifest.write_text("path,label,sku\n" + rows)
    uri = str(tmp_path / "m.db")

    def ingest(*extra: str) -> dict:
        return json.loads(run_cli(["ingest", str(catalog), "--uri", uri, "--json", *extra], check=True).stdout)

    assert ingest("--manifest", str(manifest))["indexed"] == 2
    for extra in ((), ("--manifest", str(manifest)), ()):
        report = ingest(*extra)
        assert (report["indexed"], report["updated"], report["skipped"]) == (0, 0, 2), extra
    hits = json.loads(run_cli(["search", *map(str, files), "--uri", uri, "-k", "1", "--json"], check=True).stdout)
    assert [result["results"][0]["metadata"] for result in hits] == [{"sku": "100"}, {"sku": "101"}]
    manifest.write_text("path,label,sku\n" + rows.replace(",100", ",200"))
    assert ingest("--manifest", str(manifest))["updated"] == 1  # the manifest is what changes metadata
    hits = json.loads(run_cli(["search", str(files[0]), "--uri", uri, "-k", "1", "--json"], check=True).stdout)
    assert hits[0]["results"][0]["metadata"] == {"sku": "200"}


def test_reingest_is_idempotent_and_encodes_nothing(tmp_path, encoder, make_store, monkeypatch):
    _catalog(tmp_path / "catalog", per_class=2)
    store = make_store()
    first = ingest_catalog(tmp_path / "catalog", encoder, store, workers=0)
    before = _rows(store)
    spy = EncodeSpy(encoder, monkeypatch)
    second = ingest_catalog(tmp_path / "catalog", encoder, store, workers=0)
    assert first.indexed == 20
    assert (second.indexed, second.skipped, second.failed) == (0, 20, [])
    assert spy.images == 0
    assert store.count() == 20 and _rows(store).keys() == before.keys()


def test_each_file_is_read_once_and_a_reingest_reads_only_what_changed(tmp_path, onnx_encoder, make_store, monkeypatch):
    from imgsearch.ingest.reader import PlannedImages

    files = _catalog(tmp_path / "catalog", per_class=2)
    long_ago = time.time() - 60  # older than the window in which a file's mtime cannot be trusted
    for path in files:
        os.utime(path, (long_ago, long_ago))
    reads: list[str] = []
    original = PlannedImages.read
    monkeypatch.setattr(PlannedImages, "read", lambda self, item, *fetched: reads.append(item["path"]) or original(self, item, *fetched))
    store, cache = make_store(), tmp_path / "hashes.sqlite"
    first = ingest_catalog(tmp_path / "catalog", onnx_encoder, store, workers=0, hash_cache=cache)
    assert first.indexed == 20 and sorted(reads) == sorted(map(str, files))  # the plan read none of them
    reads.clear()
    changed = files[0]
    old_id = file_sha256(changed)
    Image.open(changed).transpose(Image.Transpose.ROTATE_90).save(changed)
    os.utime(changed, (long_ago + 1, long_ago + 1))
    second = ingest_catalog(tmp_path / "catalog", onnx_encoder, store, workers=0, hash_cache=cache)
    assert reads == [str(changed)] and (second.indexed, second.skipped, second.replaced) == (1, 19, 1)
    assert file_sha256(changed) in store.get([file_sha256(changed)])
    assert store.get([old_id]) == {} and store.count() == 20  # the old content's row went with it


def test_rename_updates_path_without_reencoding_and_prune_deletes_gone_files(tmp_path, encoder, make_store, monkeypatch):
    files = _catalog(tmp_path / "catalog")
    store = make_store()
    ingest_catalog(tmp_path / "catalog", encoder, store, workers=0)
    renamed_from, deleted = files[0], files[1]
    renamed_to = tmp_path / "catalog" / "renamed" / "moved.png"
    renamed_to.parent.mkdir()
    renamed_from.rename(renamed_to)
    deleted.unlink()
    spy = EncodeSpy(encoder, monkeypatch)
    report = ingest_catalog(tmp_path / "catalog", encoder, store, workers=0)
    assert spy.images == 0 and report.updated == 1
    row = store.get([file_sha256(renamed_to)])[file_sha256(renamed_to)]
    assert row["path"] == str(renamed_to.resolve()) and row["label"] == "renamed"
    assert store.count() == 10  # the deleted file's row stays until --prune
    report = ingest_catalog(tmp_path / "catalog", encoder, store, prune=True, workers=0)
    assert report.pruned == 1 and store.count() == 9
    assert not any(row["path"] == str(deleted.resolve()) for row in _rows(store).values())


def test_duplicate_content_is_stored_once(tmp_path, encoder, make_store):
    files = _catalog(tmp_path / "catalog")
    copy = tmp_path / "catalog" / "copy.png"
    shutil.copy(files[0], copy)
    store = make_store()
    report = ingest_catalog(tmp_path / "catalog", encoder, store, workers=0)
    assert report.indexed == 10 and report.skipped == 1 and store.count() == 10
    assert report.copies == 1 and "recorded 1 identical copies" in report.summary_line()
    digest = file_sha256(copy)
    row = store.get([digest])[digest]
    assert row["path"] == str(copy.resolve())  # found first: a catalog's top-level files come before its folders
    assert row["metadata"] == {"imgsearch.copies": [str(files[0].resolve())]}
    hit = store.search(np.asarray([row_vector(store, digest)]), k=1)[0][0]
    assert hit.id == digest and hit.metadata == {}  # the bookkeeping is not the user's metadata


@pytest.mark.skipif(not 2 <= (os.cpu_count() or 1) <= MAX_LANES, reason="lanes run on 2 to MAX_LANES cores")
def test_lanes_encode_each_content_once_and_store_what_one_thread_stores(tmp_path, onnx_encoder, make_store, monkeypatch):
    files = _catalog(tmp_path / "catalog", per_class=3)
    for path in files[:20]:  # copies in the same folders: lanes meet both copies of a content, settled under one lock
        shutil.copy(path, path.with_name(f"copy-{path.name}"))
    single, laned = make_store(collection="single"), make_store(collection="laned")
    ingest_catalog(tmp_path / "catalog", onnx_encoder, single, workers=0, batch_size=4, hash_cache=tmp_path / "single.sqlite")
    threads, spy = onnx_encoder.threads, EncodeSpy(onnx_encoder, monkeypatch)
    report = ingest_catalog(tmp_path / "catalog", onnx_encoder, laned, batch_size=4, hash_cache=tmp_path / "laned.sqlite")
    assert (report.lanes, report.encoder_threads, report.workers) == (os.cpu_count(), 1, 0)
    assert onnx_encoder.threads == threads  # given back
    assert spy.images == report.indexed == 30 and report.skipped == 20 and report.copies == 20
    assert report.measured_ms["decode"] > 0 and report.measured_ms["encode"] > 0
    rows_single, rows_laned = _rows(single), _rows(laned)
    assert rows_single.keys() == rows_laned.keys()
    for key, row in rows_single.items():
        other = rows_laned[key]
        # which copy a run meets first decides the row's path; the paths a content is known by are the same
        assert {row["path"], *row["metadata"].get("imgsearch.copies", [])} == {other["path"], *other["metadata"].get("imgsearch.copies", [])}
        assert row["label"] == other["label"] and np.allclose(row["vector"], other["vector"], atol=1e-5)


@pytest.mark.skipif(not 2 <= (os.cpu_count() or 1) <= MAX_LANES, reason="lanes run on 2 to MAX_LANES cores")
def test_a_lanes_error_reaches_the_caller_and_every_lane_ends(tmp_path, onnx_encoder, make_store, monkeypatch):
    _catalog(tmp_path / "catalog", per_class=3)
    store, threads = make_store(), onnx_encoder.threads
    original, calls = onnx_encoder.encode, []

    def failing(batch):
        calls.append(len(batch))
        if len(calls) == 3:
            raise MemoryError("the third batch")
        return original(batch)

    monkeypatch.setattr(onnx_encoder, "encode", failing)
    with pytest.raises(MemoryError, match="the third batch"):
        ingest_catalog(tmp_path / "catalog", onnx_encoder, store, batch_size=4, hash_cache=tmp_path / "hashes.sqlite")
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("imgsearch-lane")]
    assert onnx_encoder.threads == threads  # given back even so


def row_vector(store, digest: str) -> np.ndarray:
    return np.asarray(store.get([digest], fields=("id", "vector"))[digest]["vector"], dtype=np.float32)


def test_a_row_whose_file_changed_or_went_moves_to_an_identical_copy(tmp_path, encoder, make_store, monkeypatch):
    files = _catalog(tmp_path / "catalog")
    copies = {path: tmp_path / "catalog" / "copies" / path.name for path in files[:2]}
    copies[files[0]].parent.mkdir()
    for original, copy in copies.items():
        shutil.copy(original, copy)
    long_ago = time.time() - 60  # the hash cache trusts only mtimes older than a few seconds
    for path in tmp_path.glob("catalog/**/*.png"):
        os.utime(path, (long_ago, long_ago))
    store, cache = make_store(), tmp_path / "hashes.sqlite"
    ingest_catalog(tmp_path / "catalog", encoder, store, workers=0, hash_cache=cache)
    gone, edited = files[0], files[1]
    gone_id, edited_id = file_sha256(gone), file_sha256(edited)
    vector = row_vector(store, gone_id)
    gone.unlink()
    Image.open(edited).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(edited)  # new bytes, same path
    os.utime(edited, (long_ago + 1, long_ago + 1))
    spy = EncodeSpy(encoder, monkeypatch)
    report = ingest_catalog(tmp_path / "catalog", encoder, store, prune=True, workers=0, hash_cache=cache)
    assert spy.images == 1 and report.pruned == 0  # only the edited file's new content was encoded; nothing lost
    rows = _rows(store)
    assert rows[gone_id]["path"] == str(copies[gone].resolve()) and rows[gone_id]["metadata"] == {}
    assert np.allclose(rows[gone_id]["vector"], vector)  # moved, not re-encoded
    assert rows[edited_id]["path"] == str(copies[edited].resolve())  # the old content lives on in its copy
    assert rows[file_sha256(edited)]["path"] == str(edited.resolve())


def test_bad_inputs_are_stored_correctly_or_reported_and_the_run_goes_on(tmp_path, encoder, make_store, photos):
    expected = bad_catalog(tmp_path / "catalog", photos)
    store = make_store()
    report = ingest_catalog(tmp_path / "catalog", encoder, store, workers=0, max_pixels=50_000_000)
    failed = {Path(item["path"]).name: item["error"] for item in report.failed}
    assert set(failed) == {name for name, outcome in expected.items() if outcome == "failed"}
    assert "empty" in failed["empty.jpg"] and "exceeds" in failed["bomb.png"]
    assert "truncated" in failed["truncated.jpg"] and "not a recognised" in failed["notes.png"]
    stored = {Path(row["path"]).name: np.asarray(row["vector"]) for row in _rows(store).values()}
    assert set(stored) == {name for name, outcome in expected.items() if outcome == "stored"}
    # Stored ones were decoded right: their vectors match the clean image's vector.
    reference_cat, reference_coffee = encoder.encode_images([photos["chelsea"], photos["coffee"]])
    assert cosine(stored["exif_rotated.jpg"], reference_cat) > 0.97  # upright, not sideways
    assert cosine(stored["cmyk.jpg"], reference_cat) > 0.95
    assert cosine(stored["animated.gif"], reference_cat) > 0.9  # first frame, not the coffee
    assert cosine(stored["png_named.jpg"], reference_coffee) > 0.999
    assert cosine(stored["deep16.png"], encoder.encode_images([photos["chelsea"].convert("L").convert("RGB")])[0]) > 0.99
    assert cosine(stored["palette_alpha.png"], reference_cat) > 0.85


# torch's DataLoader, and the torch-free worker processes; the readers do not depend on the backend, so the server
# runs one of them (the other cost 19 s of CI)
@pytest.mark.parametrize(("backend", "runtime"), [("lite", "torch"), ("lite", "onnx"), ("server", "onnx")])
def test_worker_processes_store_exactly_the_rows_of_a_single_process_run(tmp_path, backend, runtime, make_store, request):
    encoder = request.getfixturevalue("encoder" if runtime == "torch" else "onnx_encoder")
    _catalog(tmp_path / "catalog", per_class=3)
    (tmp_path / "catalog" / "broken.png").write_bytes(b"nope")
    single = make_store(collection="single")
    parallel = make_store(collection="parallel")
    report_single = ingest_catalog(tmp_path / "catalog", encoder, single, workers=0, batch_size=4)
    report_parallel = ingest_catalog(tmp_path / "catalog", encoder, parallel, workers=2, batch_size=4)
    assert report_single.indexed == report_parallel.indexed == 30
    assert report_single.failed == report_parallel.failed
    others = [parallel]
    if runtime == "onnx" and (os.cpu_count() or 1) > 1:  # workers None: the cores split by the measured stage costs
        balanced, threads = make_store(collection="balanced"), encoder.threads
        report = ingest_catalog(tmp_path / "catalog", encoder, balanced, batch_size=4)
        assert report.indexed == 30 and report.failed == report_single.failed
        assert report.measured_ms["decode"] > 0 and report.measured_ms["encode"] > 0
        assert report.workers + report.lanes * report.encoder_threads == os.cpu_count()  # one busy thread per core
        if os.cpu_count() <= MAX_LANES:  # each core a lane: reading, decoding and encoding its own batches
            assert (report.lanes, report.encoder_threads, report.workers) == (os.cpu_count(), 1, 0)
        assert encoder.threads == threads  # given back: a service's encoder answers queries on its own threads
        others.append(balanced)
    rows_single = _rows(single)
    for other in others:
        rows = _rows(other)
        assert rows_single.keys() == rows.keys()
        for key, row in rows_single.items():
            assert row["path"] == rows[key]["path"] and row["label"] == rows[key]["label"]
            assert np.allclose(row["vector"], rows[key]["vector"], atol=1e-5)


def test_a_decode_worker_that_dies_is_one_error_not_a_hang(tmp_path):
    from imgsearch.ingest.reader import DecodeWorkerError, PlannedImages, batches

    paths = _catalog(tmp_path / "catalog")
    plan = tmp_path / "plan.jsonl"
    plan.write_text("".join(json.dumps({"path": str(path), "id": "", "label": "", "metadata": {}}) + "\n" for path in paths))
    dataset = PlannedImages(plan, _exit_at_once, 64_000_000, 224)
    with pytest.raises(DecodeWorkerError, match=r"died \(exit code 3\)"):  # killed in the preprocess, as _exit_at_once does
        list(batches(dataset, 4, 2))


def test_workers_read_the_plan_from_its_start_line_each_line_once(tmp_path):
    """After the first batch measured the stages in the main process, the workers read the rest of the plan."""
    from imgsearch.ingest.reader import PlannedImages, batches

    paths = _catalog(tmp_path / "catalog")
    plan = tmp_path / "plan.jsonl"
    plan.write_text("".join(json.dumps({"path": str(path), "id": "", "label": "", "metadata": {}}) + "\n" for path in paths))
    dataset = PlannedImages(plan, _tiny, 64_000_000, 224)
    for workers in (0, 2):
        read = [item["path"] for batch in batches(dataset, 4, workers, start=5) for item in batch["items"]]
        assert sorted(read) == sorted(str(path) for path in paths[5:]), workers


def test_workers_carry_batches_in_shared_memory_that_each_slot_reuses_only_once_its_batch_is_done(tmp_path):
    """More batches than slots (5 per worker): a slot written again before the parent was done with its batch would
    show as a batch equal to a later one."""
    from imgsearch.ingest.reader import PREFETCH_BATCHES, PlannedImages, batches

    paths = _catalog(tmp_path / "catalog", per_class=3)  # 30 images, every other line to each of 2 workers
    plan = tmp_path / "plan.jsonl"
    plan.write_text("".join(json.dumps({"path": str(path), "id": "", "label": "", "metadata": {}}) + "\n" for path in paths))
    dataset = PlannedImages(plan, _small_pixels, 64_000_000, 28)
    inline = {item["path"]: row for batch in batches(dataset, 2, 0) for item, row in zip(batch["items"], batch["batch"])}
    shared, carried = {}, 0
    for batch in batches(dataset, 2, 2):
        carried += _in_shared_memory(batch["batch"])
        shared.update({item["path"]: row.copy() for item, row in zip(batch["items"], batch["batch"])})
    assert carried == 16 > 2 * (PREFETCH_BATCHES + 1)  # each worker reads 15 lines: 8 batches
    assert shared.keys() == inline.keys() and len(shared) == 30
    for path, row in inline.items():
        assert np.array_equal(row, shared[path]), path


def _in_shared_memory(array) -> bool:
    import mmap

    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


def _small_pixels(image):
    return np.asarray(image.convert("RGB").resize((6, 6)), np.float32).transpose(2, 0, 1) / 255


def _tiny(image):
    return np.zeros((3, 2, 2), np.float32)


def _exit_at_once(image):
    import multiprocessing
    import os

    if multiprocessing.parent_process() is not None:  # in a decode worker; the parent preprocesses a blank image once
        os._exit(3)  # as if killed: no exception, no batch, no end marker
    return _tiny(image)


def test_after_an_ingest_milvus_lite_searches_every_row_through_its_index(tmp_path, onnx_encoder, make_store, backend):
    store = make_store()
    _catalog(tmp_path / "catalog", per_class=2)
    report = ingest_catalog(tmp_path / "catalog", onnx_encoder, store)
    assert report.indexed == 20
    assert store.index_coverage() == ((20, 20) if backend == "lite" else None)  # a server indexes by itself
    assert "index_seconds" in report.to_dict()["stages"]

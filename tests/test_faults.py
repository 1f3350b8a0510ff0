"""Faults a long-running deployment meets, each against the real thing: a Milvus server SIGKILLed and started again on
its data, and (fast tier) broken local state. docs/security.md lists them under "faults survived"."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from helpers import ROOT, RestartableMilvus, fashion_images, serve
from imgsearch.config import load_settings
from imgsearch.ingest.reader import MAX_LANES

SERVER_BINARY = ROOT / ".mv" / "bin" / "milvus-server"


def fashion_catalog(folder, count: int) -> set[str]:
    """`count` Fashion-MNIST test products as PNG files in class folders; returns their content hashes."""
    from imgsearch.datasets import fashion_mnist

    products = fashion_mnist("test")
    digests = set()
    for index in range(count):
        target = folder / products.classes[products.targets[index]] / f"{index:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(products.sources[index].pixels).save(buffer, format="PNG")
        target.write_bytes(buffer.getvalue())
        digests.add(hashlib.sha256(buffer.getvalue()).hexdigest())
    return digests


def stored_ids(uri: str, collection: str) -> list[str]:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri, timeout=10)
    try:
        iterator = client.query_iterator(collection, batch_size=1000, filter="", output_fields=["id"])
        ids = []
        while batch := iterator.next():
            ids += [row["id"] for row in batch]
        iterator.close()
        return ids
    finally:
        client.close()


def ingest_process(catalog, uri: str, collection: str, retry_seconds: float) -> subprocess.Popen:
    env = {
        "IMGSEARCH_MILVUS_URI": uri, "IMGSEARCH_COLLECTION": collection, "IMGSEARCH_DEVICE": "cpu",
        "IMGSEARCH_STORE_RETRY_SECONDS": str(retry_seconds), "IMGSEARCH_UPSERT_CHUNK": "32", "COLUMNS": "400",
    }
    import os

    env.update({key: value for key, value in os.environ.items() if not key.startswith("IMGSEARCH_") and key not in env})
    return subprocess.Popen(
        [sys.executable, "-m", "imgsearch.cli", "ingest", str(catalog), "--batch-size", "16", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


class Poller:
    """Searches and health checks against the service every 0.2 s, from a thread, recording (time, path, status,
    Retry-After)."""

    def __init__(self, client) -> None:
        self.client = client
        self.seen: list[tuple[float, str, int, str | None]] = []
        self.unexpected: list[str] = []
        self.running = True
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40), (90, 20, 200)).save(buffer, format="PNG")
        self.query = buffer.getvalue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            for path in ("/search", "/health"):
                if path == "/search":
                    response = self.client.post(path, files={"image": ("q.png", self.query, "image/png")})
                else:
                    response = self.client.get(path)
                self.seen.append((time.monotonic(), path, response.status_code, response.headers.get("retry-after")))
                if response.status_code not in (200, 503):
                    self.unexpected.append(f"{path} {response.status_code} {response.text[:300]}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.running = False
        self.thread.join(timeout=30)


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.long  # its own Milvus server: a second 2.3.5 standalone beside the session's did not start in CI
def test_milvus_killed_and_restarted_under_ingest_and_search(tmp_path):
    """Milvus is SIGKILLed during an ingest while the service answers searches, and started again on its data.
    - The ingest whose retry window (IMGSEARCH_STORE_RETRY_SECONDS) runs out ends with one line and exit 2.
    - An ingest started while Milvus is down waits for it, then stores exactly what is missing.
    - The service answers 503 with Retry-After while Milvus is down or still loading (never 500, never a wrong
      4xx), /health says the same, and it answers again by itself within 10 s of the collection being loaded."""
    if not SERVER_BINARY.exists():
        pytest.fail(f"{SERVER_BINARY} not found (the README's test command installs it)")
    catalog = tmp_path / "catalog"
    expected = fashion_catalog(catalog, 400)
    data = tmp_path / "milvus"
    data.mkdir()
    milvus = RestartableMilvus(SERVER_BINARY, data)
    collection = f"faults_{uuid.uuid4().hex[:8]}"
    settings = load_settings(
        milvus_uri=milvus.uri, collection=collection, device="cpu", upload_dir=tmp_path / "uploads",
        calibration_wait_seconds=0,  # enrolments answer before the threshold is recomputed: the outage can cut it
    )
    try:
        with serve(settings) as client:
            poller = Poller(client)
            first = ingest_process(catalog, milvus.uri, collection, retry_seconds=3)
            from pymilvus import MilvusClient

            watcher = MilvusClient(uri=milvus.uri, timeout=5)
            deadline = time.monotonic() + 120
            while watcher.query(collection, filter="", output_fields=["count(*)"])[0]["count(*)"] == 0:
                assert first.poll() is None, first.stderr.read()
                assert time.monotonic() < deadline, "the ingest stored nothing in 120 s"
                time.sleep(0.05)
            watcher.close()
            milvus.kill()
            killed_at = time.monotonic()
            _, error = first.communicate(timeout=120)
            gave_up_after = time.monotonic() - killed_at
            assert first.returncode == 2, error
            lines = [line for line in error.splitlines() if line.startswith("error:")]
            assert len(lines) == 1 and "Milvus is unreachable" in lines[0], error
            assert "Traceback" not in error

            second = ingest_process(catalog, milvus.uri, collection, retry_seconds=180)  # waits for Milvus
            time.sleep(2)
            assert second.poll() is None, second.communicate()
            milvus.restart()
            milvus.wait_until_answering()
            milvus.wait_until_loaded(collection)
            loaded_at = time.monotonic()
            output, error = second.communicate(timeout=300)
            assert second.returncode == 0, error
            report = json.loads(output)
            while not any(path == "/search" and status == 200 and at > loaded_at for at, path, status, _ in poller.seen):
                assert time.monotonic() - loaded_at < 30, poller.seen[-6:]
                time.sleep(0.1)
            poller.stop()
            enrolment = enrolment_cut_by_an_outage(client, milvus, collection)
        reindexed = interrupted_reindex(milvus.uri, collection)
    finally:
        milvus_up = milvus.process.poll() is None
        ids = stored_ids(milvus.uri, collection) if milvus_up else []
        milvus.stop()
    ids = [row_id for row_id in ids if row_id not in enrolment["ids"]]
    assert len(ids) == len(set(ids)) == len(expected) and set(ids) == expected  # every image once
    assert report["indexed"] + report["skipped"] == len(expected) and report["skipped"] > 0  # the first run's rows were kept
    seen = poller.seen
    assert {status for _, _, status, _ in seen} <= {200, 503}, poller.unexpected
    assert all(retry == "5" for _, _, status, retry in seen if status == 503)
    down = [at for at, path, status, _ in seen if status == 503 and killed_at < at]
    assert any(path == "/health" and status == 503 for _, path, status, _ in seen), "/health never said Milvus was down"
    assert down, "no request was answered while Milvus was down"
    recovered = min(at for at, path, status, _ in seen if path == "/search" and status == 200 and at > loaded_at)
    assert recovered - loaded_at <= 10
    healthy_again = [at for at, path, status, _ in seen if path == "/health" and status == 200 and at > loaded_at]
    assert healthy_again and healthy_again[0] - loaded_at <= 10
    assert reindexed == set(ids) | enrolment["ids"]  # the interrupted reindex's rerun re-encoded every stored image once
    print(f"gave up after {gave_up_after:.1f} s; service answered {recovered - loaded_at:.1f} s after the collection was loaded; "
          f"an enrolment's recalibration was {enrolment['cut']} by the outage; the threshold counted it "
          f"{enrolment['repaired_after']:.1f} s after the collection was loaded again")


def interrupted_reindex(uri: str, collection: str) -> set[str]:
    """Ctrl-C during a `reindex` of the collection (behind an alias) once rows are being written: within 5 s one line
    and exit 130, the alias still on the old collection; the same command again finishes and moves the alias.
    Returns the ids of the new collection."""
    import os

    from pymilvus import MilvusClient

    alias, target = f"{collection}_live", f"{collection}_again"
    client = MilvusClient(uri=uri, timeout=10)
    client.create_alias(collection, alias)
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMGSEARCH_")}
    env.update(COLUMNS="400", IMGSEARCH_UPSERT_CHUNK="32", IMGSEARCH_DEVICE="cpu")
    command = [sys.executable, "-m", "imgsearch.cli", "-v", "reindex", "--model", "efficientnet_lite0", "--alias", alias,
               "--target", target, "--uri", uri, "--batch-size", "16"]
    interrupt_when(command, env, "upserted", "SIGINT", "images encoded")
    assert client.describe_alias(alias)["collection_name"] == collection  # not moved by a run that did not finish
    rerun = subprocess.run([*command[:3], *command[4:], "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0 and json.loads(rerun.stdout)["skipped"] > 0, rerun.stderr
    assert client.describe_alias(alias)["collection_name"] == target
    client.close()
    return set(stored_ids(uri, target))


def reference_counts(uri: str, collection: str) -> tuple[dict[str, int], dict[str, int] | None]:
    """(each label's stored reference count, the counts recorded with the self-calibrated threshold)."""
    from collections import Counter

    from pymilvus import MilvusClient

    from imgsearch.recognition.abstention import REFERENCE_COUNTS_PROPERTY
    from imgsearch.session import collection_properties

    client = MilvusClient(uri=uri, timeout=10)
    try:
        rows = client.query(collection, filter='label != ""', output_fields=["label"], limit=16384)
    finally:
        client.close()
    recorded = collection_properties(uri, collection).get(REFERENCE_COUNTS_PROPERTY)
    return dict(Counter(row["label"] for row in rows)), (json.loads(recorded) if recorded else None)


def enrolment_cut_by_an_outage(client, milvus: RestartableMilvus, collection: str) -> dict:
    """An enrolment stored, Milvus SIGKILLed before (or while) its threshold is recomputed, another enrolment sent
    while Milvus is down, Milvus started again: the second is answered 503 with Retry-After, and once Milvus is back
    the threshold counts the first one's references, with no further request."""
    late = []
    for shade in range(3):
        buffer = io.BytesIO()
        Image.new("RGB", (48, 48), (250 - 40 * shade, 30 * shade, 120)).save(buffer, format="PNG")
        late.append(("image", (f"late{shade}.png", buffer.getvalue(), "image/png")))
    stored = client.post("/enroll", data={"label": "late arrival"}, files=late)
    assert stored.status_code == 200, stored.text
    milvus.kill()
    cut = "cut" if stored.json()["calibration_pending"] else "not cut (it had finished)"
    refused = client.post("/enroll", data={"label": "during the outage"}, files=late[:1])
    assert refused.status_code == 503 and refused.headers.get("retry-after") == "5", refused.text
    milvus.restart()
    milvus.wait_until_answering()
    milvus.wait_until_loaded(collection)
    loaded_at = time.monotonic()
    while True:
        actual, recorded = reference_counts(milvus.uri, collection)
        if recorded == actual:
            break
        assert time.monotonic() - loaded_at < 60, f"the threshold still counts {recorded}, the collection holds {actual}"
        time.sleep(0.5)
    assert actual["late arrival"] == 3 and "during the outage" not in actual
    return {"ids": set(stored.json()["ids"]), "cut": cut, "repaired_after": time.monotonic() - loaded_at}


# --- broken local state (fast tier) --------------------------------------------------------------------------
def _stamped(tmp_path, count: int):
    from imgsearch.storage import FileStamp

    return [(str(tmp_path / f"{index}.png"), FileStamp(size=index, mtime_ns=index, inode=index, tag="")) for index in range(count)]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_hash_cache_is_set_aside_and_a_fresh_one_started(tmp_path, caplog, damage):
    """A crash can leave the SQLite file of the hash cache broken: the ingest warns, keeps the broken file under
    another name, and goes on with a fresh, working cache (it is only a cache)."""
    from imgsearch.ingest.hashes import HashCache

    path = tmp_path / "file-hashes.sqlite"
    stamped = _stamped(tmp_path, 2000)
    if damage == "garbage":
        path.write_bytes(b"this is not SQLite\n" * 100)
    else:
        cache = HashCache(path)
        cache.remember([(name, stamp, "ab" * 32) for name, stamp in stamped])
        cache.close()
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    broken = path.read_bytes()
    with caplog.at_level("WARNING", logger="imgsearch.ingest.hashes"):
        cache = HashCache(path)
        found, _ = cache.lookup(stamped)
        cache.remember([(name, stamp, "cd" * 32) for name, stamp in stamped[:3]])
        again, _ = cache.lookup(stamped[:3])
        cache.close()
    assert "corrupt" in caplog.text and "fresh" in caplog.text, caplog.text
    assert (tmp_path / "file-hashes.sqlite.corrupt-1").read_bytes() == broken  # kept, not deleted
    assert found == {} and again == {name: "cd" * 32 for name, _ in stamped[:3]}
    reopened = HashCache(path)
    assert reopened.lookup(stamped[:3])[0] == again and reopened.connection is not None
    reopened.close()


def test_a_hash_cache_that_cannot_be_made_is_skipped_with_a_warning(tmp_path, caplog):
    """A cache folder that cannot exist (HOME is a file): the ingest reads every file instead, and says so once."""
    from imgsearch.ingest.hashes import HashCache

    home = tmp_path / "home"
    home.write_text("a file, not a folder")
    with caplog.at_level("WARNING", logger="imgsearch.ingest.hashes"):
        cache = HashCache(home / ".cache" / "imgsearch" / "file-hashes.sqlite")
        assert cache.lookup(_stamped(tmp_path, 2)) == ({}, {})
        cache.remember([(name, stamp, "ab" * 32) for name, stamp in _stamped(tmp_path, 2)])
    assert caplog.text.count("unusable") == 1 and home.read_text() == "a file, not a folder"


# --- interrupts ----------------------------------------------------------------------------------------------
def interrupt_when(command: list[str], env: dict, logged: str, stop: str, said: str) -> tuple[float, list[str]]:
    """Run `command`, send it `stop` once a line of its stderr contains `logged`; it must exit within 5 s with 130
    (SIGINT) or 143 (SIGTERM), print one summary line containing `said`, and no traceback. Returns when it was
    signalled and its child processes at that moment."""
    import signal

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = []
    for line in process.stderr:  # wait until rows are being written
        log.append(line)
        if logged in line:
            break
    assert process.poll() is None, "".join(log)
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    process.send_signal(getattr(signal, stop))
    signalled = time.monotonic()
    _, rest = process.communicate(timeout=30)
    assert time.monotonic() - signalled <= 5 and process.returncode == {"SIGINT": 130, "SIGTERM": 143}[stop], rest
    summary = [line for line in rest.splitlines() if line.startswith(("interrupted:", "terminated:"))]
    assert len(summary) == 1 and summary[0].startswith({"SIGINT": "interrupted:", "SIGTERM": "terminated:"}[stop]), rest
    assert said in summary[0] and "Traceback" not in rest, rest
    return signalled, children


@pytest.mark.slow
@pytest.mark.parametrize(("stop", "what", "workers"), [("SIGINT", "enroll", []), ("SIGTERM", "ingest", ["--workers", "1"])])
def test_an_interrupted_ingest_stops_within_5_s_says_what_it_did_and_the_rerun_finishes(tmp_path, stop, what, workers):
    """Ctrl-C during an `enroll` (its cores shared as ingest decides: lanes on a small machine), SIGTERM during an
    `ingest` with a decode worker, once rows are being written: within 5 s the command prints one summary line and
    exits 130 or 143, and its decode workers and writer process are gone; the same command again stores every image
    once."""
    import os

    expected = fashion_catalog(tmp_path / "catalog", 500)
    database = tmp_path / "interrupted.db"
    arguments = [str(tmp_path / "catalog")] if what == "ingest" else ["late arrivals", str(tmp_path / "catalog")]
    command = [sys.executable, "-m", "imgsearch.cli", "-v", what, *arguments, "--uri", str(database), "--batch-size", "16", *workers]
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMGSEARCH_")}
    env.update(COLUMNS="400", IMGSEARCH_UPSERT_CHUNK="32", IMGSEARCH_DEVICE="cpu", IMGSEARCH_WRITER="process")  # the child to reap
    signalled, children = interrupt_when(command, env, "upserted", stop, "images encoded")
    assert len(children) >= 1 + len(workers) // 2  # the writer process, and the decode worker asked for
    while any(Path(f"/proc/{child}").exists() and b"Z" not in Path(f"/proc/{child}/stat").read_bytes().split(b")")[-1][:3]
              for child in children):
        assert time.monotonic() - signalled <= 5, "a child outlived the interrupted ingest by more than 5 s"
        time.sleep(0.1)
    rerun = subprocess.run([*command[:3], *command[4:], "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["skipped"] > 0 and report["indexed"] + report["skipped"] == len(expected)
    if not workers and 2 <= (os.cpu_count() or 1) <= MAX_LANES:  # the cores were lanes, as in the interrupted run
        assert report["lanes"] == os.cpu_count() and report["workers"] == 0, report
    info = subprocess.run([sys.executable, "-m", "imgsearch.cli", "info", "--uri", str(database), "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert json.loads(info.stdout)["count"] == len(expected), info.stderr


def exported_rows(path: Path, rows: int, labels: int = 0) -> None:
    """An `imgsearch export` Parquet file of `rows` random unit vectors (Lite0's dimension), `labels` labels in turn."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = 1280
    vectors = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    schema = pa.schema(
        [("id", pa.string()), ("vector", pa.list_(pa.float32(), dim)), ("label", pa.string()), ("path", pa.string()), ("metadata", pa.string())],
        metadata={"imgsearch.format": "1", "imgsearch.model": "efficientnet_lite0", "imgsearch.dim": str(dim), "imgsearch.preprocess": ""},
    )
    pq.write_table(pa.table({
        "id": [hashlib.sha256(str(index).encode()).hexdigest() for index in range(rows)],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
        "label": [f"label {index % labels}" if labels else "" for index in range(rows)],
        "path": [f"/catalog/{index}.png" for index in range(rows)], "metadata": ["{}"] * rows,
    }, schema=schema), path)


@pytest.mark.slow
def test_an_interrupted_import_stops_within_5_s_says_how_far_it_got_and_the_rerun_finishes(tmp_path):
    """Ctrl-C during an `import` of 4,000 rows once chunks are being written: within 5 s one line saying how many rows
    were imported, exit 130; the same command again leaves every row stored once."""
    import os

    rows = 4000
    source = tmp_path / "export.parquet"
    exported_rows(source, rows)
    database = str(tmp_path / "imported.db")
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMGSEARCH_")}
    env.update(COLUMNS="400", IMGSEARCH_UPSERT_CHUNK="200")
    interrupt_when([sys.executable, "-m", "imgsearch.cli", "-v", "import", str(source), "--uri", database], env,
                   "imported 200 rows", "SIGINT", "rows imported")
    rerun = subprocess.run([sys.executable, "-m", "imgsearch.cli", "import", str(source), "--uri", database, "--json"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0 and json.loads(rerun.stdout)["imported"] == rows, rerun.stderr
    info = subprocess.run([sys.executable, "-m", "imgsearch.cli", "info", "--uri", database, "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert json.loads(info.stdout)["count"] == rows, info.stderr


@pytest.mark.slow
def test_a_delete_interrupted_while_recomputing_unknown_says_so_and_the_rerun_recomputes_it(tmp_path):
    """SIGTERM during `delete --filter` once the rows are gone and "unknown" is being recomputed: within 5 s one line
    saying what was deleted and that the threshold is not recomputed yet, exit 143; the same command again deletes
    nothing more and recomputes it (the stored reference counts add up to the rows left)."""
    import os

    from imgsearch.recognition.abstention import REFERENCE_COUNTS_PROPERTY, calibration_is_stale
    from imgsearch.session import open_existing_store

    source = tmp_path / "export.parquet"
    exported_rows(source, 3000, labels=10)  # calibrating 2,700 references in memory: seconds to interrupt it in
    database = str(tmp_path / "references.db")
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMGSEARCH_")}
    env.update(COLUMNS="400")
    imported = subprocess.run([sys.executable, "-m", "imgsearch.cli", "import", str(source), "--uri", database],
                              capture_output=True, text=True, env=env, timeout=300)
    assert imported.returncode == 0, imported.stderr
    command = [sys.executable, "-m", "imgsearch.cli", "-v", "delete", "--filter", 'label == "label 0"', "--yes", "--uri", database]
    interrupt_when(command, env, 'recomputing the "unknown" threshold', "SIGTERM", '"unknown" not recomputed yet')
    rerun = subprocess.run([*command, "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0 and json.loads(rerun.stdout)["deleted"] == [], rerun.stderr
    with open_existing_store(load_settings(milvus_uri=database)) as store:
        counts = json.loads(store.properties()[REFERENCE_COUNTS_PROPERTY])
        assert store.count() == 2700 and sum(counts.values()) == 2700 and "label 0" not in counts, counts
        assert not calibration_is_stale(store)


def test_a_run_stopped_before_recalibrating_leaves_its_rerun_to_do_it(tmp_path, onnx_encoder):
    """References written by a run that stopped before recomputing "unknown" (Ctrl-C, an outage) are counted by the
    rerun, though it writes nothing new: the stored reference counts no longer add up, so it recalibrates."""
    import shutil

    from imgsearch.ingest.pipeline import ingest_catalog
    from imgsearch.recognition.abstention import REFERENCE_COUNTS_PROPERTY, calibration_is_stale
    from imgsearch.session import open_store

    for index, source in enumerate(fashion_images(5)):  # three photos of each class first, two more later
        target = tmp_path / ("first" if index % 5 < 3 else "second") / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    settings = load_settings(milvus_uri=str(tmp_path / "stopped.db"), device="cpu")
    with open_store(settings, onnx_encoder) as store:
        first = ingest_catalog(tmp_path / "first", onnx_encoder, store, workers=0)
        assert first.calibration is not None and not calibration_is_stale(store)
        recorded = store.properties()[REFERENCE_COUNTS_PROPERTY]
        stopped = ingest_catalog(tmp_path / "second", onnx_encoder, store, workers=0, calibrate=False)  # as if stopped there
        assert stopped.labeled_indexed > 0 and store.properties()[REFERENCE_COUNTS_PROPERTY] == recorded
        assert calibration_is_stale(store)
        rerun = ingest_catalog(tmp_path / "second", onnx_encoder, store, workers=0)
        counts = json.loads(store.properties()[REFERENCE_COUNTS_PROPERTY])
        again = ingest_catalog(tmp_path / "second", onnx_encoder, store, workers=0)
    assert rerun.indexed == 0 and not rerun.references_changed and rerun.calibration is not None
    assert sum(counts.values()) == first.labeled_indexed + stopped.labeled_indexed
    assert again.calibration is None  # current now: nothing is recomputed


# --- a full disk (a real file-size limit: RLIMIT_FSIZE, which Python turns into EFBIG on write) -------------------
def _limited(max_bytes: int):
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))


def _cli_env(onnx_encoder, **extra: str) -> dict[str, str]:
    """A CLI environment on the session's ONNX export (read only: nothing is exported under the limit)."""
    import os

    env = {key: value for key, value in os.environ.items() if not key.startswith("IMGSEARCH_")}
    env.update(COLUMNS="400", IMGSEARCH_RUNTIME="onnx", IMGSEARCH_ONNX_CACHE=str(onnx_encoder.model_path.parent), IMGSEARCH_DEVICE="cpu")
    env.update(extra)
    return env


def test_a_full_disk_during_an_ingest_is_one_line_and_the_rerun_after_freeing_space_completes(tmp_path, onnx_encoder):
    expected = fashion_catalog(tmp_path / "catalog", 300)
    database = tmp_path / "full.db"
    env = _cli_env(onnx_encoder, IMGSEARCH_HASH_CACHE=str(tmp_path / "hashes.sqlite"))
    command = [sys.executable, "-m", "imgsearch.cli", "ingest", str(tmp_path / "catalog"), "--uri", str(database)]
    full = subprocess.run(command, capture_output=True, text=True, env=env, preexec_fn=_limited(300_000), timeout=300)
    assert full.returncode == 2, full.stderr
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in full.stderr, full.stderr
    assert "full" in errors[0] or "no space" in errors[0], errors[0]
    rerun = subprocess.run([*command, "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["indexed"] + report["skipped"] == len(expected) and not report["failed"]
    info = subprocess.run([sys.executable, "-m", "imgsearch.cli", "info", "--uri", str(database), "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert json.loads(info.stdout)["count"] == len(expected), info.stderr


def test_an_upload_to_a_full_disk_is_507_and_leaves_no_file_and_no_row(tmp_path, onnx_encoder):
    """The service runs under a 200 kB file-size limit: a large upload is refused with 507 and a clear message,
    nothing is left in the upload folder, no row is stored, and a small upload still works."""
    import numpy as np

    from helpers import free_port, healthy_client

    port = free_port()
    uploads = tmp_path / "uploads"
    env = _cli_env(onnx_encoder, IMGSEARCH_UPLOAD_DIR=str(uploads), IMGSEARCH_HASH_CACHE=str(tmp_path / "hashes.sqlite"))
    process = subprocess.Popen(
        [sys.executable, "-m", "imgsearch.cli", "serve", "--uri", str(tmp_path / "served.db"), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_limited(200_000),
    )
    try:
        client = healthy_client(port, process)
        noise = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(noise, format="PNG")
        assert len(noise.getvalue()) > 200_000
        small = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 30, 30)).save(small, format="PNG")
        refused = client.post("/images", files=[("image", ("small.png", small.getvalue(), "image/png")),
                                                ("image", ("noise.png", noise.getvalue(), "image/png"))])
        assert refused.status_code == 507, refused.text
        assert "no space" in refused.json()["detail"] and "IMGSEARCH_UPLOAD_DIR" in refused.json()["detail"]
        assert [path for path in uploads.rglob("*") if path.is_file()] == []  # the small one saved first is gone too
        assert client.get("/info").json()["count"] == 0
        stored = client.post("/images", files={"image": ("small.png", small.getvalue(), "image/png")})
        assert stored.status_code == 200, stored.text
        assert client.get("/info").json()["count"] == 1 and len([p for p in uploads.rglob("*") if p.is_file()]) == 1
    finally:
        process.terminate()
        process.wait(timeout=30)

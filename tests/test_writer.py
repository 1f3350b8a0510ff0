"""Ingest's writer process (ingest/writer.py): the same rows as the writer thread, failures as one StoreError, and
no orphan when the ingesting process is SIGKILLed. Real Milvus Lite (through the loopback gRPC server pymilvus
runs for the file) and a real server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pytest

from imgsearch.errors import StoreError
from imgsearch.ingest.writer import InFlight, Writer, WriterProcess, start_writer
from imgsearch.store import ImageRecord, MilvusStore

pytestmark = pytest.mark.slow  # Milvus, and spawned processes

DIM = 16


def records(count: int, seed: int) -> list[ImageRecord]:
    vectors = np.random.default_rng(seed).normal(size=(count, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [
        ImageRecord(id=f"{seed:04d}{index:060d}", vector=vector, path=f"/catalog/{seed}/{index}.jpg", label=f"l{index % 3}",
                    metadata={"n": index})
        for index, vector in enumerate(vectors)
    ]


@pytest.fixture(params=["lite", "server"])
def two_stores(request, tmp_path):
    if request.param == "server":
        uri = request.getfixturevalue("milvus_server_uri")
        names = [f"writer_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("thread", "process")]
    else:
        uri, names = str(tmp_path / "writer.db"), ["by_thread", "by_process"]
    stores = [MilvusStore(uri, name, model="test", dim=DIM, precision="fp32") for name in names]
    yield stores
    for store in stores:
        if request.param == "server":
            store.client.drop_collection(store.collection)
        store.close()


def write(writer, chunks: list[list[ImageRecord]], in_flight: InFlight) -> None:
    for chunk in chunks:
        in_flight.add(len(chunk))
        writer.put(chunk)
    writer.close()


def test_a_writer_process_stores_what_the_writer_thread_stores(two_stores):
    by_thread, by_process = two_stores
    chunks = [records(50, seed) for seed in range(6)]
    thread_flight, process_flight = InFlight(), InFlight()
    thread_writer = start_writer(by_thread, thread_flight, "thread")
    process_writer = start_writer(by_process, process_flight, "process")
    assert isinstance(thread_writer, Writer) and isinstance(process_writer, WriterProcess)
    write(thread_writer, chunks, thread_flight)
    write(process_writer, chunks, process_flight)
    assert process_writer.written == thread_writer.written == 300
    assert process_flight.current == 0 and process_flight.peak <= 3 * 50  # two queued chunks and the one being put
    by_process.count()  # a Strong read, as the pipeline makes after a writer process
    fields = ("id", "vector", "path", "label", "metadata")
    rows_thread = {row["id"]: row for row in by_thread.iter_rows(fields)}
    rows_process = {row["id"]: row for row in by_process.iter_rows(fields)}
    assert len(rows_process) == 300 and rows_process.keys() == rows_thread.keys()
    for key, row in rows_thread.items():
        other = rows_process[key]
        assert (row["path"], row["label"], row["metadata"]) == (other["path"], other["label"], other["metadata"])
        assert np.allclose(row["vector"], other["vector"], atol=1e-6)


def test_auto_writes_from_a_thread_and_process_from_a_child(two_stores):
    store = two_stores[0]
    automatic = start_writer(store, InFlight(), "auto")
    child = start_writer(store, InFlight(), "process")
    try:
        assert isinstance(automatic, Writer) and isinstance(child, WriterProcess) and child.process.is_alive()
    finally:
        automatic.close()
        child.close()


def test_a_writer_process_that_dies_is_replaced_by_a_thread_and_nothing_is_lost(two_stores, caplog):
    store = two_stores[0]
    in_flight = InFlight()
    writer = start_writer(store, in_flight, "process")
    chunks = [records(40, seed) for seed in range(8)]
    for number, chunk in enumerate(chunks):
        in_flight.add(len(chunk))
        writer.put(chunk)
        if number == 3:
            writer.process.kill()  # as the OOM killer would: chunks in the pipe are never acknowledged
    writer.close()
    assert writer.fallback is not None and "writer process ended" in caplog.text
    assert writer.written == 320 and in_flight.current == 0
    store.count()
    assert len(list(store.iter_rows(("id",)))) == 320


def test_a_write_the_process_cannot_make_is_one_store_error(two_stores):
    store = two_stores[0]
    store.client.drop_collection(store.collection)  # the child's upserts are refused
    writer = start_writer(store, InFlight(), "process")
    with pytest.raises(StoreError, match="writing to Milvus failed"):
        try:  # as the pipeline does: the put after a failed chunk raises, close raises too and ends the child
            for seed in range(4):
                writer.put(records(10, seed))
        finally:
            writer.close()
    assert not writer.process.is_alive() and writer.fallback is None  # a refusal is not a dead writer


def test_the_writer_process_ends_when_the_ingesting_process_is_killed(tmp_path):
    """The parent owns the Lite file and is SIGKILLed while its writer waits: the orphan notices and exits."""
    pid_file = tmp_path / "writer.pid"
    script = textwrap.dedent(f"""
        import os, signal, time
        from imgsearch.ingest.writer import InFlight, start_writer
        from imgsearch.store import MilvusStore
        from test_writer import records
        store = MilvusStore({str(tmp_path / "parent.db")!r}, "rows", model="test", dim={DIM}, precision="fp32")
        writer = start_writer(store, InFlight(), "process")
        writer.put(records(10, 1))
        while writer.written < 10:  # acknowledged: the child is up and idle
            writer._receive(block=True)
        open({str(pid_file)!r}, "w").write(str(writer.process.pid))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    tests = os.path.dirname(__file__)
    result = subprocess.run([sys.executable, "-c", script], cwd=tests, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": tests})
    assert result.returncode == -signal.SIGKILL, result.stderr
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.2)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False

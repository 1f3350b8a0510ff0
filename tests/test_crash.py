"""Crash safety: `imgsearch ingest` killed with SIGKILL at different moments, then rerun, stores every good image
exactly once and re-encodes nothing that was already stored. On Milvus Lite and on a real server.

Why it holds: a row's id is the SHA-256 of the file's bytes, so an image always maps to the same row and an
upsert of it is idempotent; a rerun hashes the catalog, skips ids already stored and encodes the rest. A row
acknowledged by an upsert is durable on a server (its write-ahead log) without a flush; the flush at the end of
a run only seals segments. Rows a killed run had not yet upserted are simply encoded by the rerun. The upserts
run in a writer process, which ends on its own once its parent is gone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from helpers import FASHION_DIR
from imgsearch.ingest.catalog import file_sha256

pytestmark = pytest.mark.slow  # ingest processes killed and rerun


CLI = [sys.executable, "-m", "imgsearch.cli"]
UPSERT_CHUNK = 32  # small chunks, so a killed run leaves some rows written and some not
# Kill moments: as soon as the collection is created (start-up done, no row written; the CPU path now starts in
# well under 2 s, so a fixed delay no longer lands before the first write), after the 2nd chunk of a run, after
# the 3rd chunk of the next.
KILL_AFTER_CHUNKS = (0, 2, 3)


def environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMGSEARCH_")}
    # the writer process (ingest/writer.py, on request): its parent is the one killed, and the child must go too
    return {**env, "IMGSEARCH_UPSERT_CHUNK": str(UPSERT_CHUNK), "IMGSEARCH_WRITER": "process"}


def stored_count(uri: str, collection: str) -> int:
    result = subprocess.run(
        CLI + ["info", "--json", "--uri", uri, "--collection", collection], capture_output=True, text=True, env=environment(), timeout=120,
    )
    if result.returncode == 2 and ("does not exist" in result.stderr or "no Milvus Lite database" in result.stderr):
        return 0  # killed before the collection was created
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["count"]


def run_and_kill(command: list[str], chunks: int) -> bool:
    """Start an ingest and SIGKILL it once it has logged `chunks` upserts (for 0: once it logs that it created the
    collection). Returns whether it was killed (rather than finishing first)."""
    verbose = CLI + ["--verbose"] + command[len(CLI) :]  # the upsert log lines mark the moments
    process = subprocess.Popen(verbose, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment())
    reached = threading.Event()

    def watch() -> None:
        seen = 0
        for line in process.stderr:
            if chunks == 0 and "created collection" in line:
                process.send_signal(signal.SIGKILL)  # at once, from this thread: no time to encode a chunk
                reached.set()
            elif "upserted" in line:
                seen += 1
                if seen >= chunks:
                    reached.set()
        reached.set()  # stderr closed: the process ended

    threading.Thread(target=watch, daemon=True).start()
    reached.wait(timeout=300)
    finished = process.poll() is not None and process.returncode != -signal.SIGKILL
    if not finished:
        process.send_signal(signal.SIGKILL)
    process.wait()
    return not finished


@pytest.mark.parametrize("backend", ["lite", "server"])
def test_ingest_killed_at_several_moments_then_rerun_stores_each_image_once(backend, tmp_path, request):
    catalog = tmp_path / "catalog"
    shutil.copytree(FASHION_DIR, catalog)
    (catalog / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    files = [path for path in catalog.rglob("*") if path.is_file() and path.name != "broken.jpg"]
    good = len({file_sha256(path) for path in files})  # distinct contents: a byte copy is one row
    copies = len(files) - good
    if backend == "server":
        uri, collection = request.getfixturevalue("milvus_server_uri"), f"crash_{uuid.uuid4().hex[:10]}"
    else:
        uri, collection = str(tmp_path / "crash.db"), "crash"
    command = CLI + [
        "ingest", str(catalog), "--uri", uri, "--collection", collection, "--json", "--batch-size", "8", "--workers", "0",
    ]

    stored_after_kill = []
    for chunks in KILL_AFTER_CHUNKS:
        assert run_and_kill(command, chunks), f"ingest finished before the kill after {chunks} chunks"
        stored_after_kill.append(stored_count(uri, collection))
    # Every upsert a killed run made is kept: at least the chunks it logged, and never more than the catalog.
    assert stored_after_kill[0] == 0
    assert 2 * UPSERT_CHUNK <= stored_after_kill[1] < good
    assert stored_after_kill[1] + 3 * UPSERT_CHUNK <= stored_after_kill[2] < good

    before = stored_after_kill[-1]
    finished = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=600)
    assert finished.returncode == 3, finished.stderr  # finished; broken.jpg failed
    report = json.loads(finished.stdout)
    # What the killed runs stored is skipped, not re-encoded; the rest is encoded now.
    assert report["skipped"] == before + copies and report["indexed"] == good - before
    assert [failure["path"].endswith("broken.jpg") for failure in report["failed"]] == [True]
    assert stored_count(uri, collection) == good  # exact: no duplicates, nothing lost

    again = json.loads(subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=600).stdout)
    assert (again["indexed"], again["skipped"]) == (0, good + copies)


def children_of(pid: int) -> list[int]:
    """Live child processes of `pid` (zombies are dead)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_decode_workers_die_with_a_killed_ingest_and_the_rerun_is_not_locked_out(tmp_path):
    """SIGKILL of the ingest (as the OOM killer does) runs no clean-up; its forked decode workers, blocked on a full
    queue and holding the Milvus Lite LOCK they inherited, must die with it, or the rerun is refused."""
    catalog = tmp_path / "catalog"
    shutil.copytree(FASHION_DIR, catalog)
    good = len({file_sha256(path) for path in catalog.rglob("*") if path.is_file()})
    uri = str(tmp_path / "orphans.db")
    command = CLI + ["ingest", str(catalog), "--uri", uri, "--collection", "orphans", "--json", "--batch-size", "8", "--workers", "2"]
    process = subprocess.Popen(CLI + ["--verbose"] + command[len(CLI):], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment())
    for line in process.stderr:
        if "upserted" in line:  # the decode workers are running, and some rows are written
            break
    children = children_of(process.pid)
    assert len(children) >= 3, children  # two decode workers and the writer process
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 10
    while any(alive(child) for child in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [child for child in children if alive(child)], "processes of the killed ingest outlived it by 10 s"
    rerun = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert stored_count(uri, "orphans") == good

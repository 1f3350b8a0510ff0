"""The fast tier: validation, terminal safety, manifests, shards, settings, the pixel budget and the plan/diff
of an ingest against an in-memory store. No model is loaded and no Milvus is started."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sys
import unicodedata
from pathlib import Path

import pytest
from fastapi import HTTPException
from rich.console import Console

from helpers import free_port, run_cli
from imgsearch.api.limits import IdleTrim, PixelBudget
from imgsearch.config import check_lite_database_exists, load_settings
from imgsearch.errors import CatalogError, CollectionNotFoundError, InvalidInputError, UsageError
from imgsearch.ingest.catalog import CatalogEntry, read_manifest
from imgsearch.storage import shown_uri
from imgsearch.terminal import json_line, markup_safe, plain, visible
from imgsearch.validation import (
    LABEL_BYTES,
    recorded_copies,
    user_metadata,
    validate_id,
    validate_label,
    validate_metadata,
    validate_path_text,
    validate_vector,
    with_copies,
)

ESCAPE = "\x1b[2J"


@pytest.mark.parametrize(
    "label, stored",
    [("bag", "bag"), ("  shoes [sale] ", "shoes [sale]"), (unicodedata.normalize("NFD", "café"), "café"),
     ("a/b", "a/b"), ("../x", "../x"), ("é" * 256, "é" * 256), ("", "")],
)
def test_valid_labels_are_stored_normalised(label, stored):
    assert validate_label(label) == stored


@pytest.mark.parametrize("label", ["L" * (LABEL_BYTES + 1), "é" * 257, "a\x00b", "a\x1bb", "a\u202eb", "a\u2029b", "tab\there"])
def test_invalid_labels_are_refused(label):
    with pytest.raises(InvalidInputError):
        validate_label(label)


def test_a_required_label_cannot_be_blank():
    with pytest.raises(InvalidInputError, match="must not be empty"):
        validate_label("  ", required=True)
    with pytest.raises(InvalidInputError, match="must be text"):
        validate_label(7)


def test_paths_metadata_ids_and_vectors():
    assert validate_path_text("/data/a b[1].png") == "/data/a b[1].png"
    for bad in ("", "a\x00b", "/x/" + "p" * 5000, "bad\udcff.png"):
        with pytest.raises(InvalidInputError):
            validate_path_text(bad)
    assert validate_metadata({"sku": "1", "tags": ["a"]}) == {"sku": "1", "tags": ["a"]}
    for bad in ([1], {"x": float("nan")}, {"x": "y" * 70_000}, {"x": object()}, {"imgsearch.copies": ["/etc/passwd"]}, {"imgsearch.upload": True}):
        with pytest.raises(InvalidInputError):
            validate_metadata(bad)
    full, left_out = with_copies({"x": "y" * 60_000}, [f"/copies/{i:04}.jpg" for i in range(1000)])
    assert 0 < len(recorded_copies(full)) < 1000 and left_out == 1000 - len(recorded_copies(full))
    assert len(json.dumps(full).encode()) <= 65_536 and user_metadata(full) == {"x": "y" * 60_000}
    assert validate_id("a" * 64) == "a" * 64 and validate_id("A" * 64) == "a" * 64  # an id copied in upper case
    for bad in ("g" * 64, "a" * 63, "../../etc/passwd", None):
        with pytest.raises(InvalidInputError):
            validate_id(bad)
    assert validate_vector([0.5, 1.0], 2) == [0.5, 1.0]
    for bad in ([0.5], [float("inf"), 1.0], None):
        with pytest.raises(InvalidInputError):
            validate_vector(bad, 2)


def test_manifest_rows_that_cannot_be_used_are_failed_rows(tmp_path):
    manifest = tmp_path / "items.jsonl"
    manifest.write_text(
        "\n".join([json.dumps({"path": "a.png", "label": "x", "sku": 1}), "{not json", json.dumps({"label": "no path"}),
                   json.dumps([1]), json.dumps({"path": "../b.png", "label": 5})]) + "\n"
    )
    entries = list(read_manifest(manifest, tmp_path / "catalog"))
    assert [(entry.path.name, entry.label, entry.error is None) for entry in entries] == [
        ("a.png", "x", True), ("items.jsonl:2", "", False), ("items.jsonl:3", "", False), ("items.jsonl:4", "", False),
        ("b.png", "5", True),
    ]
    assert entries[0].metadata == {"sku": 1} and entries[4].path == tmp_path / "b.png"  # `..` removed, not resolved
    with pytest.raises(InvalidInputError, match="invalid JSON"):
        entries[1].validated()
    assert CatalogEntry(Path("/a.png"), " café ").validated().label == "café"


def test_a_csv_record_the_csv_module_refuses_fails_alone(tmp_path):
    from imgsearch.ingest.catalog import read_manifest

    manifest = tmp_path / "items.csv"
    manifest.write_text("path,label\na.png,x\nb.png," + "y" * 200_000 + "\nc.png,z\n")
    entries = list(read_manifest(manifest, tmp_path))
    assert [(entry.path.name, entry.label, entry.error is None) for entry in entries] == [
        ("a.png", "x", True), ("items.csv:3", "", False), ("c.png", "z", True)
    ]
    assert "field larger than field limit" in entries[1].error


@pytest.mark.parametrize("text", ["[/x]", "[bold]red", "shoes [sale]", ESCAPE, "a\x07b\x9bc", "\u202eevil", "tail\\"])
def test_printing_helpers_show_text_as_given(text):
    console = Console(file=io.StringIO(), width=200, emoji=False, color_system=None)
    console.print(f"label: {markup_safe(text)}")
    console.print(plain(text))
    printed = console.file.getvalue()
    assert f"label: {visible(text)}" in printed and visible(text) in printed
    assert not any(unicodedata.category(c) == "Cc" and c != "\n" for c in printed)
    encoded = json_line({"label": text})
    assert json.loads(encoded) == {"label": text} and not any(unicodedata.category(c) == "Cc" for c in encoded)


def test_pixel_budget_makes_large_decodes_wait_then_503():
    async def scenario():
        budget = PixelBudget(capacity=100, wait_seconds=0.2)
        order = []

        async def take(name, pixels, hold_seconds):
            async with budget.hold(pixels):
                order.append((name, budget.in_use))
                await asyncio.sleep(hold_seconds)

        await asyncio.gather(take("a", 80, 0.1), take("b", 80, 0.0))  # b waits for a: never 160 in use
        assert order == [("a", 80), ("b", 80)]
        blocker = asyncio.create_task(take("c", 100, 1.0))
        await asyncio.sleep(0.05)
        with pytest.raises(HTTPException) as refused:
            await take("d", 10, 0.0)
        assert refused.value.status_code == 503
        await blocker
        await take("e", 10_000, 0.0)  # larger than the whole budget: runs alone, never deadlocks
        assert budget.in_use == 0

    asyncio.run(scenario())


def test_idle_trim_hands_memory_back_once_per_idle_spell_and_never_during_a_request():
    async def scenario():
        trims = []
        trim = IdleTrim(after_seconds=0.2, release=lambda: trims.append(trim.in_flight))
        watcher = asyncio.create_task(trim.watch())
        await asyncio.sleep(0.5)
        assert trims == []  # nothing ran yet: nothing to hand back
        async with trim.request():
            await asyncio.sleep(0.6)  # a long request: no trim while it runs
            assert trims == []
        await asyncio.sleep(0.6)
        assert trims == [0]  # one trim after it, with nothing in flight
        await asyncio.sleep(0.5)
        assert trims == [0]  # still idle: not again
        for _ in range(6):  # steady traffic with gaps shorter than after_seconds: no trim in between
            async with trim.request():
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.02)
        assert trims == [0]
        await asyncio.sleep(0.6)
        assert trims == [0, 0]
        watcher.cancel()

    asyncio.run(scenario())


def test_heap_bytes_counts_a_live_allocation_until_it_is_freed():
    from imgsearch.api.limits import heap_bytes

    if heap_bytes() is None:
        pytest.skip("no glibc 2.33 mallinfo2 here")
    before = heap_bytes()["in_use"]
    block = bytearray(64 << 20)
    during = heap_bytes()["in_use"]
    del block
    after = heap_bytes()["in_use"]
    assert during - before >= 64 << 20 and during - after >= 64 << 20, (before, during, after)


def test_serve_reexecutes_itself_with_python_objects_in_malloc_unless_the_user_chose_an_allocator(monkeypatch):
    import platform

    from imgsearch import processes

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("only with glibc: elsewhere there is no trim to hand pages back")
    calls = []

    def execv(path, argv):
        calls.append((path, list(argv), os.environ.get("PYTHONMALLOC")))
        raise OSError("refused")  # as a failed exec would: the process must go on as it was

    monkeypatch.setattr(processes.os, "execv", execv)
    monkeypatch.delenv("PYTHONMALLOC", raising=False)
    processes.reexec_with_python_objects_in_malloc()
    assert calls == [(sys.executable, sys.orig_argv, "malloc")]  # the same program and arguments, in this PID
    assert "PYTHONMALLOC" not in os.environ  # the failed exec left no trace for child processes
    monkeypatch.setenv("PYTHONMALLOC", "pymalloc")
    processes.reexec_with_python_objects_in_malloc()
    assert len(calls) == 1  # the user's own choice stands


def test_shards_partition_content_hashes():
    from imgsearch.ingest.catalog import Shard

    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(300)] + ["f" * 64, "0" * 64]
    shards = [Shard.parse(f"{i}/3") for i in range(3)]
    owners = [[shard.contains(digest) for shard in shards].count(True) for digest in digests]
    assert owners == [1] * len(digests)
    assert all(any(shard.contains(digest) for digest in digests) for shard in shards)
    for bad in ("3/3", "-1/3", "1", "a/b", "0/0"):
        with pytest.raises(CatalogError, match="--shard must be I/N"):
            Shard.parse(bad)


def test_flags_override_environment_which_overrides_defaults(monkeypatch):
    assert load_settings().milvus_uri == "./imgsearch.db" and load_settings().answer_paths == "relative"
    monkeypatch.setenv("IMGSEARCH_MILVUS_URI", "/env.db")
    monkeypatch.setenv("IMGSEARCH_PUBLIC", '["page"]')
    assert load_settings().milvus_uri == "/env.db" and load_settings().public == ["page"]
    assert load_settings(milvus_uri="/flag.db").milvus_uri == "/flag.db"
    monkeypatch.setenv("IMGSEARCH_PUBLIC", '["everything"]')
    with pytest.raises(UsageError, match=r"invalid setting \(public"):  # one line naming the setting, not a traceback
        load_settings()


def test_a_missing_lite_file_is_an_error_without_creating_it(tmp_path):
    with pytest.raises(CollectionNotFoundError, match="no Milvus Lite database"):
        check_lite_database_exists(str(tmp_path / "typo.db"))
    assert not (tmp_path / "typo.db").exists()
    check_lite_database_exists("http://127.0.0.1:19530")  # a server URI is not a file




class InMemoryStore:
    """What the planner needs of a store: rows by id, and upserts of moved rows."""

    def __init__(self, rows: dict[str, dict]) -> None:
        self.rows = rows
        self.upserted: list = []

    def get(self, ids, fields=("id", "path", "label", "metadata"), as_of=None):
        return {i: {"id": i, **self.rows[i]} for i in ids if i in self.rows}

    def upsert(self, records):
        self.upserted.extend(records)


def test_the_plan_skips_stored_content_updates_moves_and_fails_bad_rows(tmp_path, monkeypatch):
    """With every hash remembered, the plan settles the catalog without reading a file; with none, it plans every
    valid file for the decode workers (which hash what they read) and still reads nothing."""
    import os

    from imgsearch.ingest.hashes import FileStamp, HashCache
    from imgsearch.ingest.plan import Settler, plan_entries
    from imgsearch.ingest.report import IngestReport

    files = {}
    for name in ("same", "moved", "new", "copy_of_new"):
        path = tmp_path / f"{name}.png"
        path.write_bytes(b"bytes of " + (b"new" if name == "copy_of_new" else name.encode()))
        files[name] = path
    digest = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in files.items()}
    store = InMemoryStore({
        digest["same"]: {"path": str(files["same"]), "label": "a", "metadata": {}, "vector": [0.0]},
        digest["moved"]: {"path": str(tmp_path / "gone.png"), "label": "a", "metadata": {}, "vector": [0.0]},
    })
    entries = [
        CatalogEntry(files["same"], "a"), CatalogEntry(files["moved"], "a"), CatalogEntry(files["new"], "b"),
        CatalogEntry(files["copy_of_new"], "b"), CatalogEntry(tmp_path / "missing.png", "b"),
        CatalogEntry(files["new"], "L" * 600), CatalogEntry(tmp_path / "m.csv:3", error="no usable 'path' value"),
    ]
    remembered = HashCache(tmp_path / "hashes.sqlite")
    remembered.remember((str(path), FileStamp.of(os.stat(path)), digest[name]) for name, path in files.items())
    plan_path = tmp_path / "plan.jsonl"
    real_open = open

    def no_catalog_reads(file, *args, **kwargs):
        assert Path(file) not in files.values(), f"the plan read {file}"
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_catalog_reads)
    report = IngestReport()
    pending = plan_entries(iter(entries), Settler(store, report), remembered, plan_path, None)
    planned = [json.loads(line) for line in plan_path.read_text().splitlines()]
    assert pending == 1 and [item["id"] for item in planned] == [digest["new"]]
    assert (report.skipped, report.updated) == (2, 1)  # unchanged, and the second copy of new content
    assert [record.path for record in store.upserted] == [str(files["moved"])]  # the move keeps its vector
    failed = {Path(failure["path"]).name: failure["error"] for failure in report.failed}
    assert failed == {"missing.png": "file not found", "new.png": failed["new.png"], "m.csv:3": "no usable 'path' value"}

    unknown = IngestReport()
    pending = plan_entries(iter(entries), Settler(store, unknown), HashCache(tmp_path / "empty.sqlite"), plan_path, None)
    planned = [json.loads(line) for line in plan_path.read_text().splitlines()]
    assert pending == 4 and {item["id"] for item in planned} == {None}  # read and hashed once, by the workers
    assert (unknown.skipped, unknown.updated, len(unknown.failed)) == (0, 0, 3)
    assert "600 bytes" in failed["new.png"]


def test_an_export_carries_recorded_copies_and_an_import_checks_them():
    from imgsearch.transfer import _record

    row = {"id": "a" * 64, "vector": [0.5, 0.5], "label": "x", "path": "/c/a.jpg"}
    record = _record({**row, "metadata": json.dumps({"sku": 1, "imgsearch.copies": ["/c/b.jpg", 7]})}, 2)
    assert record.metadata == {"sku": 1, "imgsearch.copies": ["/c/b.jpg"]}  # a non-path entry is not a copy
    with pytest.raises(InvalidInputError):
        _record({**row, "metadata": json.dumps({"imgsearch.copies": ["/c/\x00.jpg"]})}, 2)
    with pytest.raises(InvalidInputError):
        _record({**row, "metadata": "[1]"}, 2)


def test_a_password_written_into_the_milvus_uri_is_never_shown():
    assert shown_uri("http://root:s3cret@milvus.internal:19530/db") == "http://***@milvus.internal:19530/db"
    assert shown_uri("https://user@host:19530") == "https://***@host:19530"
    for plain_uri in ("http://milvus.internal:19530", "./imgsearch.db", "/data/a@b.db", "http://host:19530/path@x"):
        assert shown_uri(plain_uri) == plain_uri
    failed = run_cli(["info", "--uri", f"http://root:s3cret@127.0.0.1:{free_port()}"])  # nothing listens there
    assert failed.returncode == 2 and "opening Milvus at http://***@127.0.0.1:" in failed.stderr
    assert "s3cret" not in failed.stderr + failed.stdout

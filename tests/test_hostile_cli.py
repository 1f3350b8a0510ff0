"""The `imgsearch` command and the core it shares with the API, against hostile and careless input: names that
are rich markup or terminal escapes, labels that are too long, manifests and imports with bad rows, mistyped
paths, symlinks, and generated file names and labels through ingest -> search -> recognize -> export -> import."""

from __future__ import annotations

import io
import json
import os
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from PIL import Image

from helpers import FASHION_DIR, copy_fashion_catalog
from helpers import run_cli as run
from imgsearch.errors import EXIT_FAILED, EXIT_PARTIAL
from imgsearch.store import ImageRecord
from imgsearch.terminal import json_line, markup_safe

pytestmark = pytest.mark.slow  # the imgsearch command in subprocesses


ESCAPE = "\x1b[2J"
NAMES = ["[/x]", "[bold]", "shoes [sale]", "bag :fire:"]  # valid labels that rich would otherwise interpret


def tree(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def image_bytes(color, size=(40, 40), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def assert_no_raw_controls(*outputs: str) -> None:
    for output in outputs:
        assert "\x1b" not in output and "\x07" not in output, repr(output[:500])


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A catalog whose folder (label) and file names are markup or escapes, ingested through the CLI."""
    root = tmp_path_factory.mktemp("hostile-cli")
    catalog = root / "catalog"
    sources = sorted(FASHION_DIR.glob("*/*.png"))
    for index, name in enumerate(NAMES):
        (catalog / name).mkdir(parents=True)
        shutil.copy(sources[index * 30], catalog / name / f"{name.replace('/', '_')}.png")  # "[/x]": folder "[", sub-folder "x]"
    (catalog / f"esc{ESCAPE}").mkdir()  # a folder whose name is not a valid label: its file fails, alone
    shutil.copy(sources[200], catalog / f"esc{ESCAPE}" / "a.png")
    shutil.copy(sources[230], catalog / NAMES[2] / f"file{ESCAPE}.png")  # a valid label, a file name with an escape
    uri = str(root / "hostile.db")
    result = run(["ingest", str(catalog), "--uri", uri])
    return root, catalog, uri, result


def test_ingest_reports_the_bad_folder_escaped_and_stores_the_rest(hostile):
    _, catalog, _, result = hostile
    assert result.returncode == EXIT_PARTIAL, result.stderr
    assert "indexed 5, skipped 0 unchanged, failed 1" in result.stdout
    assert "esc\\x1b[2J" in result.stderr and "control character U+001B" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert_no_raw_controls(result.stdout, result.stderr)


def test_search_table_prints_names_as_given(hostile):
    _, catalog, uri, _ = hostile
    result = run(["search", str(catalog / "shoes [sale]"), "--uri", uri, "-k", "6"])
    assert result.returncode == 0, result.stderr
    for name in NAMES:
        assert name in result.stdout, name
    assert "file\\x1b[2J.png" in result.stdout
    assert_no_raw_controls(result.stdout, result.stderr)


def test_search_json_keeps_exact_names_and_escapes_controls(hostile):
    _, catalog, uri, _ = hostile
    result = run(["search", str(catalog / NAMES[0]), "--uri", uri, "-k", "6", "--json"])
    assert result.returncode == 0, result.stderr
    assert_no_raw_controls(result.stdout)
    hits = json.loads(result.stdout)[0]["results"]
    assert {hit["label"] for hit in hits} == set(NAMES)
    assert any(hit["path"].endswith(f"file{ESCAPE}.png") for hit in hits)  # JSON carries the exact name


def test_enroll_and_recognize_with_markup_labels(hostile, tmp_path):
    _, catalog, uri, _ = hostile
    photo = tmp_path / f"new{ESCAPE}.png"
    photo.write_bytes((FASHION_DIR / "sandal" / "sandal_022.png").read_bytes())
    label = "[/x] sandal [bold]"
    enrolled = run(["enroll", label, str(photo), "--uri", uri])
    assert enrolled.returncode == 0, enrolled.stderr
    assert label in enrolled.stdout
    recognised = run(["recognize", str(photo), "--uri", uri, "-k", "10"])
    assert recognised.returncode == 0, recognised.stderr
    assert label in recognised.stdout and "new\\x1b[2J.png" in recognised.stdout
    assert_no_raw_controls(enrolled.stdout, enrolled.stderr, recognised.stdout, recognised.stderr)


def test_invalid_filter_is_one_line_exit_2(hostile):
    _, catalog, uri, _ = hostile
    result = run(["search", str(catalog / NAMES[0]), "--uri", uri, "--filter", "label === ]["])
    assert result.returncode == EXIT_FAILED
    assert result.stderr.startswith("error: search failed") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_the_pixel_limit_is_this_projects_setting(hostile, tmp_path):
    """100 MP is over Pillow's own limit (89 MP) and over imgsearch's default (64 MP): the setting decides."""
    _, _, uri, _ = hostile
    big = tmp_path / "big.jpg"
    Image.new("RGB", (10_000, 10_000), (120, 80, 40)).save(big, "JPEG", quality=50)
    refused = run(["search", str(big), "--uri", uri, "--json"])
    assert refused.returncode == EXIT_PARTIAL and "exceeds the limit of 64000000" in refused.stderr
    assert json.loads(refused.stdout) == []
    allowed = run(["search", str(big), "--uri", uri, "--json"], env_extra={"IMGSEARCH_MAX_IMAGE_PIXELS": "200000000"})
    assert allowed.returncode == 0, allowed.stderr
    assert len(json.loads(allowed.stdout)[0]["results"]) >= 5


# --- bad rows never cost the good ones; exit codes are the same with --json ---------------------------------
def test_a_manifest_row_with_a_600_character_label_fails_alone(tmp_path):
    catalog = tmp_path / "catalog"
    files = copy_fashion_catalog(catalog, 2)
    manifest = tmp_path / "manifest.jsonl"
    rows = [{"path": str(path.relative_to(catalog)), "label": path.parent.name, "sku": index} for index, path in enumerate(files)]
    rows.insert(7, {"path": str(files[0].relative_to(catalog)), "label": "L" * 600})
    lines = [json.dumps(row) for row in rows] + ["{not json", json.dumps({"label": "no path"}), json.dumps(["a list"])]
    manifest.write_text("\n".join(lines) + "\n")
    outcomes = []
    for flags, uri in ((["--json"], tmp_path / "a.db"), ([], tmp_path / "b.db")):
        result = run(["ingest", str(catalog), "--manifest", str(manifest), "--uri", str(uri), *flags])
        outcomes.append(result.returncode)
        assert "Traceback" not in result.stderr
        if flags:
            report = json.loads(result.stdout)
            assert report["indexed"] == 20 and len(report["failed"]) == 4
            assert any("600 bytes" in failure["error"] for failure in report["failed"])
        else:
            assert "indexed 20, skipped 0 unchanged, failed 4" in result.stdout
    assert outcomes == [EXIT_PARTIAL, EXIT_PARTIAL]


def test_enroll_refuses_bad_labels_before_creating_anything(tmp_path):
    photo = FASHION_DIR / "bag" / "bag_000.png"
    before = tree(tmp_path)
    for label in ("L" * 600, "", "   ", f"a{ESCAPE}"):
        for flags in ([], ["--json"]):
            result = run(["enroll", label, str(photo), "--uri", str(tmp_path / "new.db"), *flags])
            assert result.returncode == EXIT_FAILED, (label[:10], result.stderr)
            assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
            assert_no_raw_controls(result.stderr)
    assert tree(tmp_path) == before


def test_enroll_with_only_bad_files_is_exit_3_with_and_without_json(hostile, tmp_path):
    _, _, uri, _ = hostile
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    codes = [run(["enroll", "broken", str(tmp_path), "--uri", uri, *flags]).returncode for flags in ([], ["--json"])]
    assert codes == [EXIT_PARTIAL, EXIT_PARTIAL]


def test_read_only_commands_on_a_missing_database_create_nothing(tmp_path):
    query = str(FASHION_DIR / "bag" / "bag_000.png")
    before = tree(tmp_path)
    missing = str(tmp_path / "typo.db")
    no_client = (["info"], ["export", "--out", str(tmp_path / "out.parquet")], ["delete", "0" * 64], ["duplicates"])
    for args in (*no_client, ["search", query], ["recognize", query]):
        result = run([*args, "--uri", missing], python_flags=("-X", "importtime"))
        assert result.returncode == EXIT_FAILED and f"no Milvus Lite database at {missing}" in result.stderr, args
        imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
        assert args not in no_client or "pymilvus" not in imported, args  # answered before the client loads
    assert tree(tmp_path) == before


def test_a_usage_error_imports_no_model_code(tmp_path):
    """Mistyped paths and bad labels are answered before torch, torchvision, timm or open_clip are imported
    (the time it takes is measured by hand: see the note in docs)."""
    for args in (
        ["search", str(tmp_path / "missing.jpg")],
        ["recognize", str(tmp_path / "missing.jpg")],
        ["ingest", str(tmp_path / "missing")],
        ["enroll", "", str(tmp_path)],
        ["search", str(FASHION_DIR / "bag" / "bag_000.png"), "--uri", str(tmp_path / "missing.db")],
    ):
        result = run(args, python_flags=("-X", "importtime"))
        assert result.returncode == EXIT_FAILED, (args, result.stderr[-300:])
        imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
        assert imported and not imported & {"torch", "torchvision", "timm", "open_clip"}, args


# --- import: per-row validation, pyarrow errors are one line ----------------------------------------------
def _export_table(rows: list[dict], dim: int, model="efficientnet_lite0") -> pa.Table:
    schema = pa.schema(
        [("id", pa.string()), ("vector", pa.list_(pa.float32())), ("label", pa.string()), ("path", pa.string()), ("metadata", pa.string())],
        metadata={"imgsearch.format": "1", "imgsearch.model": model, "imgsearch.dim": str(dim), "imgsearch.preprocess": ""},
    )
    return pa.Table.from_pylist(rows, schema=schema)


def test_import_reports_bad_rows_and_keeps_the_good(tmp_path):
    good = [
        {"id": f"{i:064x}", "vector": [0.5] * 1280, "label": "ok", "path": f"/data/{i}.png", "metadata": "{}"} for i in range(3)
    ]
    bad = [
        {"id": "a" * 64, "vector": [0.5] * 3, "label": "short", "path": "/x.png", "metadata": "{}"},
        {"id": "b" * 64, "vector": [0.5] * 1280, "label": "meta", "path": "/y.png", "metadata": "{broken"},
        {"id": "../../etc", "vector": [0.5] * 1280, "label": "id", "path": "/z.png", "metadata": "{}"},
        {"id": "c" * 64, "vector": [0.5] * 1280, "label": "L" * 600, "path": "/w.png", "metadata": "{}"},
        {"id": "d" * 64, "vector": [float("nan")] * 1280, "label": "nan", "path": "/v.png", "metadata": "{}"},
    ]
    source = tmp_path / "mixed.parquet"
    pq.write_table(_export_table(good + bad, 1280), source)
    codes = []
    for flags in (["--json"], []):
        result = run(["import", str(source), "--uri", str(tmp_path / "target.db"), *flags])
        codes.append(result.returncode)
        assert "Traceback" not in result.stderr
        if flags:
            summary = json.loads(result.stdout)
            assert summary["imported"] == 3 and len(summary["failed"]) == 5
    assert codes == [EXIT_PARTIAL, EXIT_PARTIAL]
    info = json.loads(run(["info", "--json", "--uri", str(tmp_path / "target.db")]).stdout)
    assert info["count"] == 3


def test_import_of_another_dimension_or_a_broken_file_is_one_line(tmp_path):
    target = str(tmp_path / "target.db")
    ok = tmp_path / "ok.parquet"
    pq.write_table(_export_table([{"id": "e" * 64, "vector": [0.1] * 1280, "label": "", "path": "/a.png", "metadata": "{}"}], 1280), ok)
    assert run(["import", str(ok), "--uri", target]).returncode == 0
    other_dim = tmp_path / "dim.parquet"
    pq.write_table(_export_table([{"id": "f" * 64, "vector": [0.1] * 8, "label": "", "path": "/b.png", "metadata": "{}"}], 8), other_dim)
    result = run(["import", str(other_dim), "--uri", target, "--collection", "imgsearch_efficientnet_lite0"])
    assert result.returncode == EXIT_FAILED and "dim 1280" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    unusable = tmp_path / "unusable.parquet"
    pq.write_table(_export_table([], 0).replace_schema_metadata({"imgsearch.model": "m", "imgsearch.dim": "x"}), unusable)
    result = run(["import", str(unusable), "--uri", target])
    assert result.returncode == EXIT_FAILED and "unusable vector dimension" in result.stderr
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(ok.read_bytes()[:-200] + ok.read_bytes()[-8:])
    result = run(["import", str(truncated), "--uri", target])
    assert result.returncode == EXIT_FAILED and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


# --- k results, symlinks (core functions, both backends) ----------------------------------------------------
def test_k_results_up_to_the_row_count(make_store):
    store = make_store()
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(304, 1280)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store.upsert([ImageRecord(id=f"{i:064x}", vector=v, path=f"/p/{i}.png") for i, v in enumerate(vectors)])
    store.flush()
    for k in (65, 300, 304):
        assert [len(hits) for hits in store.search(vectors[:2], k=k)] == [k, k]
    assert [len(hits) for hits in store.search(vectors[:1], k=400)] == [304]


def test_a_symlink_is_stored_under_the_walked_path_and_pruned_when_the_link_goes(tmp_path, onnx_encoder, make_store):
    from imgsearch.ingest.pipeline import ingest_catalog

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    target = outside / "bag.png"
    shutil.copy(FASHION_DIR / "bag" / "bag_000.png", target)
    catalog = tmp_path / "catalog"
    (catalog / "bag").mkdir(parents=True)
    shutil.copy(FASHION_DIR / "coat" / "coat_010.png", catalog / "bag" / "real.png")
    link = catalog / "bag" / "link.png"
    link.symlink_to(target)
    store = make_store()
    report = ingest_catalog(catalog, onnx_encoder, store, workers=0)
    assert report.indexed == 2 and not report.failed
    paths = {row["path"] for row in store.iter_rows(("id", "path"))}
    assert paths == {str(catalog / "bag" / "real.png"), str(link)}
    link.unlink()
    report = ingest_catalog(catalog, onnx_encoder, store, workers=0, prune=True)
    assert report.pruned == 1 and target.exists()
    assert {row["path"] for row in store.iter_rows(("id", "path"))} == {str(catalog / "bag" / "real.png")}


def test_a_file_name_that_is_not_utf8_fails_alone(tmp_path, onnx_encoder, make_store):
    from imgsearch.ingest.pipeline import ingest_catalog

    catalog = tmp_path / "catalog"
    (catalog / "bag").mkdir(parents=True)
    shutil.copy(FASHION_DIR / "bag" / "bag_000.png", catalog / "bag" / "good.png")
    shutil.copy(FASHION_DIR / "bag" / "bag_015.png", os.path.join(os.fsencode(catalog / "bag"), b"bad\xff.png"))
    store = make_store()
    report = ingest_catalog(catalog, onnx_encoder, store, workers=0)
    assert report.indexed == 1 and len(report.failed) == 1 and "not valid UTF-8" in report.failed[0]["error"]
    assert "\\udcff" in json_line(report.failed) and store.count() == 1


# --- generated names through the whole round trip -------------------------------------------------------------
# File names: anything a Linux file system takes (no "/" or NUL), including controls, markup, bidi and accents.
NAME_ALPHABET = st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",))
names = st.text(NAME_ALPHABET, min_size=1, max_size=40).filter(lambda n: n not in (".", "..") and not n.startswith(".") and len(n.encode()) < 200)


@hypothesis_settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(entries=st.lists(st.tuples(names, names), min_size=1, max_size=4, unique_by=lambda pair: unicodedata.normalize("NFC", pair[0]).strip()))
def test_generated_names_round_trip(tmp_path_factory, onnx_encoder, entries):
    """Folders (labels) and file names from hypothesis: ingest stores every valid label exactly once, reports
    every invalid one as a failed row, and search, recognize, export and import carry the names unchanged."""
    from imgsearch.errors import InvalidInputError
    from imgsearch.ingest.pipeline import ingest_catalog
    from imgsearch.recognition.knn import recognize_vectors
    from imgsearch.store import MilvusStore
    from imgsearch.transfer import export_parquet, import_parquet
    from imgsearch.validation import validate_label

    outer = tmp_path_factory.mktemp("generated")
    root = outer / "run"
    catalog = root / "catalog"
    expected: dict[str, str] = {}  # stored path -> label
    invalid = 0
    for index, (label, file_name) in enumerate(entries):
        folder = catalog / label
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{file_name}.png"
        path.write_bytes(image_bytes((index * 40 % 256, 255 - index * 30, 17 * index % 256)))
        try:
            expected[str(path)] = validate_label(label)
        except InvalidInputError:
            invalid += 1
    store = MilvusStore(str(root / "g.db"), "generated", model=onnx_encoder.name, dim=onnx_encoder.dim, precision=onnx_encoder.precision)
    copy = MilvusStore(str(root / "g.db"), "imported", model=onnx_encoder.name, dim=onnx_encoder.dim, precision=onnx_encoder.precision)
    try:
        before = tree(outer)
        report = ingest_catalog(catalog, onnx_encoder, store, workers=0)
        assert report.indexed == len(expected) and len(report.failed) == invalid
        rows = {row["path"]: row["label"] for row in store.iter_rows(("id", "path", "label"))}
        assert rows == expected
        if expected:
            vectors = onnx_encoder.encode_images([Image.open(path).convert("RGB") for path in expected])
            hits = store.search(vectors, k=len(expected))
            assert [hit[0].path for hit in hits] == list(expected)
            labeled = {path: label for path, label in expected.items() if label}
            if labeled:
                decided = recognize_vectors(store, vectors, k=10)
                assert {label for label, _, _ in decided} <= set(labeled.values())
        for failure in report.failed:  # what the CLI prints of it is safe
            assert not any(unicodedata.category(c) in ("Cc", "Cs") for c in markup_safe(failure["path"]) + json_line(failure))
        out = root / "export.parquet"
        assert export_parquet(store, out) == len(expected)
        assert import_parquet(copy, out) == (len(expected), [])
        assert {row["path"]: row["label"] for row in copy.iter_rows(("id", "path", "label"))} == expected
        written = tree(outer) - before  # nothing but the database and the export
        assert all(entry.startswith(("run/g.db", "run/export.parquet")) for entry in written), written
    finally:
        store.close()
        copy.close()


def test_one_liners_instead_of_tracebacks_or_silent_answers(tmp_path):
    """--html to a folder fails before the scan; --threshold nan is refused (it would turn abstention off and print
    NaN, which is not JSON); a Lite path with a trailing slash is that database; `duplicates /` covers everything; a
    relative prefix that does not exist is an error, not 0 images."""
    catalog = tmp_path / "catalog"
    copy_fashion_catalog(catalog, 1)
    uri = str(tmp_path / "one.db")
    run(["ingest", str(catalog), "--uri", uri + "/"], check=True)  # as tab completion writes it
    assert (tmp_path / "one.db").is_dir() and not (tmp_path / "one.db" / "one.db").exists()
    folder = run(["duplicates", "--html", str(tmp_path), "--uri", uri])
    assert folder.returncode == EXIT_FAILED and "is a folder" in folder.stderr and "Traceback" not in folder.stderr
    missing = run(["duplicates", "--html", str(tmp_path / "no" / "such" / "r.html"), "--uri", uri])
    assert missing.returncode == EXIT_FAILED and "cannot write" in missing.stderr
    for value in ("nan", "inf"):
        refused = run(["recognize", str(catalog), "--threshold", value, "--uri", uri, "--json"])
        assert refused.returncode == EXIT_FAILED and "threshold" in refused.stderr and refused.stdout == "", value
    everything = json.loads(run(["duplicates", "/", "--threshold", "0", "--uri", uri + "/", "--json"], check=True).stdout)
    assert everything["rows"] == 10
    relative = run(["duplicates", "no/such/folder", "--uri", uri], cwd=tmp_path)
    assert relative.returncode == EXIT_FAILED and "no such folder or file: no/such/folder" in relative.stderr
    absent = run(["duplicates", "/no/such/folder", "--uri", uri])
    assert absent.returncode == 0 and "no stored image's path starts with /no/such/folder" in absent.stderr


def test_nfc_and_nfd_spellings_of_one_name_print_apart(tmp_path):
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    sources = sorted(FASHION_DIR.glob("*/*.png"))
    composed, decomposed = unicodedata.normalize("NFC", "café.png"), unicodedata.normalize("NFD", "café.png")
    shutil.copy(sources[0], catalog / composed)
    shutil.copy(sources[0], catalog / decomposed)  # one row, the other name its recorded identical copy
    uri = str(tmp_path / "nfd.db")
    run(["ingest", str(catalog), "--uri", uri], check=True)
    table = run(["duplicates", "--uri", uri], check=True).stdout
    assert "café.png" in table and "cafe\\u0301.png" in table  # one as typed, the other with its accent escaped
    paths = {Path(m["path"]).name for g in json.loads(run(["duplicates", "--uri", uri, "--json"], check=True).stdout)["groups"]
             for m in [g["representative"], *g["members"]]}
    assert paths == {composed, decomposed}  # JSON keeps the exact names

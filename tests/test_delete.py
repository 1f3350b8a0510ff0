"""`imgsearch delete`: by id, by filter, dry runs, unknown ids and bad selections; a selection of (nearly) every row
is confirmed first; catalog files are never removed, even under the upload folder."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import FASHION_DIR, copy_fashion_catalog, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def ingested(tmp_path):
    catalog = tmp_path / "catalog"
    copy_fashion_catalog(catalog, 2)
    uri = str(tmp_path / "delete.db")
    run_cli(["ingest", str(catalog), "--uri", uri], check=True)
    return catalog, uri


def count(uri: str) -> int:
    return json.loads(run_cli(["info", "--uri", uri, "--json"], check=True).stdout)["count"]


def test_delete_by_id_and_by_filter(ingested):
    catalog, uri = ingested
    hits = json.loads(run_cli(["search", str(catalog / "bag"), "--uri", uri, "-k", "1", "--json"], check=True).stdout)
    ids = [result["results"][0]["id"] for result in hits]
    deleted = json.loads(run_cli(["delete", *ids, "--uri", uri, "--json"], check=True).stdout)
    assert sorted(row["id"] for row in deleted["deleted"]) == sorted(ids) and deleted["missing"] == []
    assert count(uri) == 18
    dry = run_cli(["delete", "--filter", 'label == "coat"', "--uri", uri, "--dry-run"], check=True)
    assert "would delete 2 images" in dry.stdout and count(uri) == 18
    run_cli(["delete", "--filter", 'label == "coat"', "--uri", uri], check=True)
    assert count(uri) == 16
    own = json.loads(run_cli(["info", "--uri", uri, "--json"], check=True).stdout)["self_calibration"]
    assert (own["references"], own["labels"]) == (16, 8)  # bags and coats went: they no longer calibrate "unknown"
    assert all(path.is_file() for path in catalog.rglob("*.png"))  # rows go, catalog files stay


def test_unknown_ids_are_reported_and_bad_selections_refused(ingested):
    catalog, uri = ingested
    unknown = "0" * 64
    result = run_cli(["delete", unknown, "--uri", uri, "--json"])
    assert result.returncode == 3 and json.loads(result.stdout)["missing"] == [unknown]
    assert "not deleted" in result.stderr and unknown in result.stderr
    for args, message in (
        (["delete"], "exactly one of"),
        (["delete", unknown, "--filter", 'label == "bag"'], "exactly one of"),
        (["delete", "../../etc/passwd"], "64 hex characters"),
        (["delete", "--filter", " "], "--filter is empty"),
        (["delete", "--filter", "label = = 1"], "error:"),
    ):
        refused = run_cli([*args, "--uri", uri])
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr, args
    assert count(uri) == 20


def test_an_upper_case_id_names_the_same_image_and_deep_json_is_one_line(ingested, tmp_path):
    catalog, uri = ingested
    [hit] = json.loads(run_cli(["search", str(catalog / "bag"), "--uri", uri, "-k", "1", "--json"], check=True).stdout)[:1]
    image_id = hit["results"][0]["id"]
    deleted = json.loads(run_cli(["delete", image_id.upper(), "--uri", uri, "--json"], check=True).stdout)
    assert [row["id"] for row in deleted["deleted"]] == [image_id] and count(uri) == 19
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    refused = run_cli(["delete", "--from-json", str(nested), "--uri", uri])
    assert refused.returncode == 2 and "nested too deeply" in refused.stderr and "Traceback" not in refused.stderr


def test_a_selection_of_every_row_or_most_rows_needs_yes(ingested, tmp_path):
    catalog, uri = ingested  # 20 rows, 2 per class
    for expression in ("true", "1 == 1", 'id != ""', 'label like "%"'):
        refused = run_cli(["delete", "--filter", expression, "--uri", uri])
        assert refused.returncode == 2 and "selects all 20 stored images" in refused.stderr and "--yes" in refused.stderr, (expression, refused.stderr)
    most = run_cli(["delete", "--filter", 'label != "bag"', "--uri", uri])
    assert most.returncode == 2 and "selects 18 of the 20 stored images" in most.stderr
    listing = tmp_path / "everything.json"
    listing.write_text(run_cli(["duplicates", "--threshold", "0", "--similar", "--uri", uri, "--json"], check=True).stdout)
    piped = run_cli(["delete", "--from-json", str(listing), "--include-similar", "--uri", uri])
    assert piped.returncode == 2 and "of the 20 stored images" in piped.stderr
    assert count(uri) == 20  # nothing went
    assert "would delete 20 images" in run_cli(["delete", "--filter", "true", "--uri", uri, "--dry-run"], check=True).stdout
    assert "deleted 18 images" in run_cli(["delete", "--filter", 'label != "bag"', "--uri", uri, "--yes"], check=True).stdout
    assert count(uri) == 2 and all(path.is_file() for path in catalog.rglob("*.png"))


def test_a_terminal_is_asked_before_everything_goes(ingested):
    """On a terminal the question is asked; anything but yes deletes nothing."""
    import os
    import pty
    import subprocess
    import sys

    _, uri = ingested
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMGSEARCH_")}
    for answer, expected in ((b"n\n", 20), (b"y\n", 0)):
        leader, follower = pty.openpty()
        process = subprocess.Popen(
            [sys.executable, "-m", "imgsearch.cli", "delete", "--filter", "true", "--uri", uri],
            stdin=follower, stdout=follower, stderr=follower, env=env,
        )
        os.close(follower)
        seen = b""
        while b"delete them?" not in seen:
            seen += os.read(leader, 1024)
        os.write(leader, answer)
        assert process.wait(timeout=120) == (0 if expected == 0 else 2)
        os.close(leader)
        assert b"selects all 20 stored images" in seen and count(uri) == expected


def test_catalog_files_under_the_upload_folder_are_never_removed(tmp_path):
    """A catalog ingested from inside the upload folder is the user's: deleting its rows (by duplicates listing, by
    filter) removes no file, whatever IMGSEARCH_UPLOAD_DIR says; the ingest warns about the overlap."""
    uploads = tmp_path / "uploads"
    shutil.copytree(FASHION_DIR / "bag", uploads / "bag")
    for rocket in FASHION_DIR.glob("rocket*.jpg"):
        shutil.copy(rocket, uploads)
    files = sorted(path for path in uploads.rglob("*") if path.is_file())
    uri = str(tmp_path / "u.db")
    ingest = run_cli(["ingest", "uploads", "--uri", uri], cwd=tmp_path, check=True)
    assert "overlaps the service's upload folder" in ingest.stderr
    listing = tmp_path / "d.json"
    listing.write_text(run_cli(["duplicates", "uploads", "--threshold", "0.95", "--uri", uri, "--json"], cwd=tmp_path, check=True).stdout)
    for upload_dir in ("uploads", "."):
        env = {"IMGSEARCH_UPLOAD_DIR": upload_dir}
        dry = run_cli(["delete", "--filter", 'label == "bag"', "--uri", uri, "--dry-run"], env_extra=env, cwd=tmp_path, check=True)
        assert "would delete 30 images (0 uploaded files with them)" in dry.stdout
    done = run_cli(["delete", "--from-json", str(listing), "--uri", uri], env_extra={"IMGSEARCH_UPLOAD_DIR": "."}, cwd=tmp_path, check=True)
    assert "(0 uploaded files with them)" in done.stdout and "deleted 0 images" not in done.stdout
    assert all(path.is_file() for path in files)

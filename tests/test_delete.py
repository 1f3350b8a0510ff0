"""`imgsearch delete`: by id, by filter, dry runs, unknown ids and bad selections."""

from __future__ import annotations

import json

import pytest

from helpers import copy_fashion_catalog, run_cli

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
        (["delete", "../../etc/passwd"], "64 lowercase hex"),
        (["delete", "--filter", " "], "--filter is empty"),
        (["delete", "--filter", "label = = 1"], "error:"),
    ):
        refused = run_cli([*args, "--uri", uri])
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr, args
    assert count(uri) == 20

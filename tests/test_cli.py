"""The `imgsearch` command as users run it: separate processes, JSON shapes, settings precedence, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import FASHION_DIR, auto_cpu_precision, copy_fashion_catalog, run_cli, searching_through

pytestmark = pytest.mark.slow  # the imgsearch command in subprocesses


CLI = [sys.executable, "-m", "imgsearch.cli"]


def run(args, env_extra=None, cwd=None, check=True):
    return run_cli(args, env_extra, cwd, check=check)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    catalog = root / "catalog"
    copy_fashion_catalog(catalog, 2)
    (catalog / "broken.jpg").write_bytes(b"\x00" * 50)
    uri = str(root / "cli.db")
    result = run(["ingest", str(catalog), "--uri", uri, "--json"], check=False)
    assert result.returncode == 3, result.stderr  # finished, but broken.jpg failed
    return root, catalog, uri, json.loads(result.stdout)


def test_option_help_shows_real_defaults_only():
    """A setting's flag states its default as the value a user gets, never pydantic's placeholder for a default
    factory, and says nothing when the default is empty."""
    from imgsearch.shell import SHARED_OPTIONS

    helps = {field: annotated.__metadata__[0].help for field, annotated in SHARED_OPTIONS.items()}
    assert all("Undefined" not in text and not text.endswith("; default ]") for text in helps.values()), helps
    assert helps["storage_options"].endswith("[env IMGSEARCH_STORAGE_OPTIONS]")
    assert helps["batch_size"].endswith("[env IMGSEARCH_BATCH_SIZE; default 32]")


def test_ingest_json_shape(ingested):
    _, catalog, _, report = ingested
    assert report["indexed"] == 20 and report["skipped"] == 0
    assert report["failed"] == [{"path": str((catalog / "broken.jpg").resolve()), "error": "not a recognised image format"}]


def test_ingest_summary_line_and_rerun_skips(ingested):
    _, catalog, uri, _ = ingested
    result = run(["ingest", str(catalog), "--uri", uri], check=False)
    assert result.returncode == 3 and "indexed 0, skipped 20 unchanged, failed 1" in result.stdout
    assert "broken.jpg" in result.stderr


def test_search_json_shape(ingested):
    _, catalog, uri, _ = ingested
    query = sorted((catalog / "bag").glob("*.png"))[0]
    result = run(["search", str(query), str(catalog / "sneaker"), "-k", "3", "--uri", uri, "--json"])
    items = json.loads(result.stdout)
    assert [item["query"] for item in items][0] == str(query) and len(items) == 3
    first = items[0]["results"]
    assert len(first) == 3 and set(first[0]) == {"id", "score", "path", "label", "metadata"}
    assert first[0]["path"] == str(query.resolve()) and first[0]["label"] == "bag"
    assert first[0]["score"] >= first[1]["score"] >= first[2]["score"]


def test_search_filter_and_table(ingested):
    _, catalog, uri, _ = ingested
    query = sorted((catalog / "bag").glob("*.png"))[0]
    filtered = json.loads(run(["search", str(query), "--uri", uri, "--json", "--filter", 'label == "coat"']).stdout)
    assert {hit["label"] for hit in filtered[0]["results"]} == {"coat"}
    table = run(["search", str(query), "--uri", uri, "-k", "2"]).stdout
    assert "score" in table and "bag" in table


def test_info_and_settings_precedence(ingested, tmp_path):
    _, _, uri, _ = ingested
    from_env = json.loads(run(["info", "--json"], env_extra={"IMGSEARCH_MILVUS_URI": uri}).stdout)
    assert from_env == {
        "collection": "imgsearch_efficientnet_lite0",
        "uri": uri,
        "exists": True,
        "count": 20,
        "model": "efficientnet_lite0",
        "dim": 1280,
        "preprocess": from_env["preprocess"],
        "precision": auto_cpu_precision(),  # made by the CPU default
        "weights": "",  # the model's own (not adapted)
        "recognition": None,  # no eval yet
        "self_calibration": from_env["self_calibration"],
    }
    assert from_env["self_calibration"]["references"] == 20 and from_env["self_calibration"]["labels"] == 10
    other = str(tmp_path / "other.db")
    flag_wins = run(["info", "--json", "--uri", other], env_extra={"IMGSEARCH_MILVUS_URI": uri}, check=False)
    assert flag_wins.returncode == 2 and f"no Milvus Lite database at {other}" in flag_wins.stderr
    default = run(["info", "--json"], cwd=tmp_path, check=False)
    assert default.returncode == 2 and "no Milvus Lite database at ./imgsearch.db" in default.stderr
    assert not (tmp_path / "other.db").exists() and not (tmp_path / "imgsearch.db").exists()  # read-only: nothing created
    env_collection = run(["info", "--json", "--uri", uri], env_extra={"IMGSEARCH_COLLECTION": "shelf"}, check=False)
    assert env_collection.returncode == 2 and "collection shelf does not exist" in env_collection.stderr


def test_model_guard_is_one_clear_line(ingested, tmp_path):
    root, catalog, uri, _ = ingested
    import timm
    import torch

    weights = tmp_path / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), weights)
    result = run(
        ["search", str(catalog / "bag"), "--uri", uri, "--collection", "imgsearch_efficientnet_lite0",
         "--model", "timm:resnet10t", "--weights", str(weights)],
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "efficientnet_lite0" in result.stderr and "timm:resnet10t" in result.stderr
    assert "Traceback" not in result.stderr


def test_locked_database_is_one_clear_line(ingested):
    _, catalog, uri, _ = ingested
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from pymilvus import MilvusClient; import sys, time; c = MilvusClient({uri!r}); print('ok', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ok"
        result = run(["info", "--uri", uri], check=False)
        assert result.returncode == 2
        assert "in use by another process" in result.stderr and "Traceback" not in result.stderr
    finally:
        holder.kill()
        holder.wait()


def test_missing_catalog_and_unknown_model_are_clear(tmp_path):
    result = run(["ingest", str(tmp_path / "nowhere"), "--uri", str(tmp_path / "x.db")], check=False)
    assert result.returncode == 2 and "catalog path not found" in result.stderr
    result = run(["ingest", str(tmp_path), "--model", "no_such_model", "--uri", str(tmp_path / "x.db")], check=False)
    assert result.returncode == 2 and "unknown model" in result.stderr and not (tmp_path / "x.db").exists()
    result = run(["export", "--out", str(tmp_path / "v.parquet"), "--uri", str(tmp_path / "x.db")], check=False)
    assert result.returncode == 2 and "no Milvus Lite database" in result.stderr and "Traceback" not in result.stderr


def test_export_import_round_trip_is_exact(ingested, tmp_path):
    import numpy as np

    _, _, uri, _ = ingested
    out = tmp_path / "vectors.parquet"
    exported = json.loads(run(["export", "--out", str(out), "--uri", uri, "--json"]).stdout)
    assert exported["exported"] == 20 and out.is_file()
    target = str(tmp_path / "copy.db")
    imported = json.loads(run(["import", str(out), "--uri", target, "--json"]).stdout)
    assert imported == {"imported": 20, "failed": [], "collection": "imgsearch_efficientnet_lite0", "model": "efficientnet_lite0"}
    info = json.loads(run(["info", "--json", "--uri", target]).stdout)
    assert info["count"] == 20 and info["preprocess"] == json.loads(run(["info", "--json", "--uri", uri]).stdout)["preprocess"]
    # Read in a child process: a .db opened by this process would stay locked against the other tests' CLI runs.
    dump = (
        "import json, sys\nfrom pymilvus import MilvusClient\nc = MilvusClient(sys.argv[1])\n"
        "c.load_collection('imgsearch_efficientnet_lite0')\n"
        "rows = c.query('imgsearch_efficientnet_lite0', filter='', limit=1000,"
        " output_fields=['id', 'vector', 'label', 'path', 'metadata'])\n"
        "print(json.dumps([dict(r) for r in rows]))\n"
    )

    def rows(db):
        result = subprocess.run([sys.executable, "-c", dump, db], capture_output=True, text=True, check=True, timeout=120)
        return {row["id"]: row for row in json.loads(result.stdout)}

    original, copy = rows(uri), rows(target)
    assert original.keys() == copy.keys() and len(copy) == 20
    for key, row in original.items():
        assert np.array_equal(np.asarray(row["vector"], dtype=np.float32), np.asarray(copy[key]["vector"], dtype=np.float32))
        assert (row["label"], row["path"], row["metadata"]) == (copy[key]["label"], copy[key]["path"], copy[key]["metadata"])


def test_import_refuses_a_collection_of_another_model(ingested, tmp_path):
    _, _, uri, _ = ingested
    out = tmp_path / "vectors.parquet"
    run(["export", "--out", str(out), "--uri", uri])
    other = str(tmp_path / "other.db")
    create = (
        f"from imgsearch.store import MilvusStore; "
        f"MilvusStore({other!r}, 'imgsearch_efficientnet_lite0', model='timm:resnet10t', dim=512, precision='fp32')"
    )
    subprocess.run([sys.executable, "-c", create], check=True, timeout=120)
    result = run(["import", str(out), "--uri", other], check=False)
    assert result.returncode == 2 and "timm:resnet10t" in result.stderr and "Traceback" not in result.stderr
    garbage = tmp_path / "garbage.parquet"
    garbage.write_text("not parquet")
    result = run(["import", str(garbage), "--uri", other], check=False)
    assert result.returncode == 2 and "not a Parquet file" in result.stderr


def test_enroll_then_recognize_json_shape(ingested, tmp_path):
    root, catalog, uri, _ = ingested
    new_class = tmp_path / "handbags"
    new_class.mkdir()
    bags = sorted((FASHION_DIR / "bag").glob("*.png"))
    for source in bags[10:15]:
        shutil.copy(source, new_class / source.name)
    enrolled = json.loads(run(["enroll", "handbag", str(new_class), "--uri", uri, "--json"]).stdout)
    assert enrolled["label"] == "handbag" and enrolled["indexed"] == 5

    queries = [str(bags[20]), str(bags[21])]
    items = json.loads(run(["recognize", *queries, "--uri", uri, "--json", "-k", "10"]).stdout)
    assert [item["path"] for item in items] == queries
    for item in items:
        assert set(item) == {"path", "label", "confidence", "threshold", "margin", "threshold_source", "kept_for_review", "neighbours"}
        assert item["threshold_source"].startswith("self-calibrated on 25 references")  # recomputed by the enrolment
        assert item["label"] in ("handbag", "bag", None) and isinstance(item["confidence"], float)  # None: too close to call
        assert len(item["neighbours"]) == 10 and item["kept_for_review"] is None  # not asked to keep unknowns
        assert all(set(n) == {"id", "label", "score", "path"} and n["label"] for n in item["neighbours"])
    assert "handbag" in {n["label"] for item in items for n in item["neighbours"]}


def test_recognize_abstains_as_null_and_unknown(ingested):
    _, catalog, uri, _ = ingested
    query = str(sorted((catalog / "coat").glob("*.png"))[0])
    items = json.loads(run(["recognize", query, "--uri", uri, "--json", "--threshold", "1.5"]).stdout)
    assert items[0]["label"] is None and items[0]["confidence"] < 1.5
    table = run(["recognize", query, "--uri", uri, "--threshold", "1.5"]).stdout
    assert "unknown" in table


def test_head_cli_trains_recognizes_and_refuses_another_collection(ingested, tmp_path):
    _, catalog, uri, _ = ingested
    head = tmp_path / "shop-head"
    trained = json.loads(run(["train-head", "--mode", "linear", "--uri", uri, "--out", str(head), "--json"]).stdout)
    assert trained["labels"] >= 10 and (tmp_path / "shop-head.safetensors").is_file()
    query = str(sorted((catalog / "trouser").glob("*.png"))[0])
    items = json.loads(run(["recognize", query, "--method", "head", "--head", str(head), "--uri", uri, "--json"]).stdout)
    assert items[0]["label"] == "trouser" and 0 < items[0]["confidence"] <= 1 and items[0]["neighbours"] == []
    assert items[0]["threshold"] == trained["threshold"] and items[0]["threshold_source"].startswith("the head's")
    info = json.loads(run(["info", "--json", "--uri", uri]).stdout)
    assert trained["threshold"] != info["self_calibration"]["threshold"]  # its own, on the softmax scale

    run(["ingest", str(catalog / "bag"), "--uri", uri, "--collection", "other"])
    refused = run(["recognize", query, "--method", "head", "--head", str(head), "--uri", uri, "--collection", "other"], check=False)
    assert refused.returncode == 2 and "trained on collection imgsearch_efficientnet_lite0, not other" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_eval_on_a_folder_writes_report_and_stores_the_threshold(ingested, tmp_path):
    _, _, uri, _ = ingested
    out = tmp_path / "report"
    result = run([
        "eval", str(FASHION_DIR), "--out", str(out), "--references-per-class", "12", "--shots", "1,2",
        "--episodes", "3", "--uri", uri,
    ])
    assert "wrote" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["references"] == 120 and report["queries"] == 60
    assert set(report["knn_accuracy"]) == {"1", "5", "20", "100"} and 0.3 < report["accuracy"] <= 1
    assert set(report["n_shot"]) == {"1", "2"} and report["n_shot"]["2"]["episodes"] == 3
    assert 0.5 < report["open_set"]["auroc"] <= 1 and report["open_set"]["unknown_classes"] == ["trouser", "tshirt"]
    assert np.array(report["confusion"]).sum() == 60
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads(run(["info", "--json", "--uri", uri]).stdout)
    assert info["recognition"]["threshold"] == pytest.approx(report["open_set"]["threshold"])


def test_eval_reads_debian_fashion_mnist(tmp_path):
    out = tmp_path / "fm"
    result = run([
        "eval", "fashion-mnist", "--out", str(out), "--references-per-class", "10", "--queries-per-class", "5",
        "--shots", "1,5", "--episodes", "2", "--no-calibrate", "--json",
    ], cwd=tmp_path)
    report = json.loads(result.stdout)
    assert report["classes"][0] == "tshirt" and report["references"] == 100 and report["queries"] == 50
    assert report["late_enrolment"]["shots"] == 5 and "linear" in report["head"]
    assert (out / "report.json").is_file() and (out / "report.png").is_file()
    assert not (tmp_path / "imgsearch.db").exists()  # --no-calibrate opens no collection


def test_eval_bad_dataset_is_one_line(tmp_path):
    result = run(["eval", "fashion-mnist:" + str(tmp_path), "--no-calibrate"], check=False, cwd=tmp_path)
    assert result.returncode == 2 and "dataset-fashion-mnist" in result.stderr and "Traceback" not in result.stderr


def test_three_shards_in_parallel_fill_one_server_collection_without_overlap(milvus_server_uri, tmp_path):
    catalog = tmp_path / "catalog"
    copy_fashion_catalog(catalog, 4)
    collection = f"sharded_{os.getpid()}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMGSEARCH_")}
    processes = [
        subprocess.Popen(
            CLI + ["ingest", str(catalog), "--uri", milvus_server_uri, "--collection", collection, "--shard", f"{i}/3", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for i in range(3)
    ]
    reports = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        reports.append(json.loads(stdout))
    assert sum(report["indexed"] for report in reports) == 40  # every image exactly once
    assert all(report["indexed"] + report["other_shards"] == 40 for report in reports)
    assert all(report["indexed"] > 0 for report in reports)
    info = json.loads(run(["info", "--json", "--uri", milvus_server_uri, "--collection", collection]).stdout)
    assert info["count"] == 40
    rerun = json.loads(run(["ingest", str(catalog), "--uri", milvus_server_uri, "--collection", collection, "--json"]).stdout)
    assert (rerun["indexed"], rerun["skipped"]) == (0, 40)  # no shard missed or duplicated anything


@pytest.fixture(scope="module")
def second_model_weights(tmp_path_factory):
    """A second real model for switching to: the Lite0 ImageNet weights in timm's own layout, loaded as
    `timm:tf_efficientnet_lite0` (another encoder identity and preprocessing; no download)."""
    from safetensors.torch import save_file

    from imgsearch.encoders.lite import load_lite_classifier

    path = tmp_path_factory.mktemp("weights") / "tf_efficientnet_lite0.safetensors"
    save_file({key: value.contiguous() for key, value in load_lite_classifier().state_dict().items()}, str(path))
    return path


def test_reindex_switches_the_alias_while_searches_keep_answering(milvus_server_uri, tmp_path, second_model_weights):
    from pymilvus import MilvusClient

    catalog = tmp_path / "catalog"
    copy_fashion_catalog(catalog, 2)
    suffix = f"{os.getpid()}_{tmp_path.name[-6:]}".replace("-", "_")
    old, alias = f"shop_v1_{suffix}", f"shop_{suffix}"
    run(["ingest", str(catalog), "--uri", milvus_server_uri, "--collection", old])
    client = MilvusClient(uri=milvus_server_uri)
    client.create_alias(old, alias)
    probe = client.query(old, filter="", output_fields=["vector"], limit=1)[0]["vector"]

    with searching_through(milvus_server_uri, alias, probe) as (answered, errors):
        new = f"shop_v2_{suffix}"
        result = run([
            "reindex", "--model", "timm:tf_efficientnet_lite0", "--weights", str(second_model_weights), "--alias", alias,
            "--target", new, "--uri", milvus_server_uri, "--json",
        ])
        time.sleep(0.5)  # a few searches after the switch too
    report = json.loads(result.stdout)
    assert (report["source"], report["target"], report["indexed"], report["failed"]) == (old, new, 20, [])
    assert errors == [] and len(answered) > 10 and set(answered) == {3}
    assert client.describe_alias(alias)["collection_name"] == new
    labels = lambda name: sorted(row["label"] for row in client.query(name, filter="", output_fields=["label"], limit=100))  # noqa: E731
    assert labels(new) == labels(old) and len(labels(new)) == 20
    query = str(sorted((catalog / "sneaker").glob("*.png"))[0])
    hits = json.loads(run([
        "search", query, "--collection", alias, "--model", "timm:tf_efficientnet_lite0", "--weights", str(second_model_weights),
        "--uri", milvus_server_uri, "--json", "-k", "1",
    ]).stdout)
    assert hits[0]["results"][0]["path"] == str(Path(query).resolve())
    refused = run(["search", query, "--collection", alias, "--uri", milvus_server_uri], check=False)
    assert refused.returncode == 2 and "holds vectors of model timm:tf_efficientnet_lite0" in refused.stderr
    client.close()


def test_serve_on_a_locked_lite_file_fails_with_one_line(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable, "-c",
            f"from imgsearch.store import MilvusStore; import time; MilvusStore({str(tmp_path / 'held.db')!r}, 'x', model='m', dim=4, precision='fp32'); "
            "print('ready', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        result = run(["serve", "--uri", str(tmp_path / "held.db"), "--port", "8765"], check=False)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2 and "in use by another process" in result.stderr and "Traceback" not in result.stderr

"""Catalogs and uploads in a real S3-compatible server (SeaweedFS's `weed mini`, started once per session)."""

from __future__ import annotations

import io
import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import FASHION_DIR, ObservingProxy, copy_fashion_catalog, cosine, run_cli, serve
from imgsearch import storage
from imgsearch.ingest.catalog import bytes_sha256
from imgsearch.ingest.pipeline import ingest_catalog

pytestmark = [pytest.mark.objectstore, pytest.mark.slow]


@pytest.fixture
def bucket(object_store):
    """A fresh bucket, with this process's storage options pointing at the server (credentials from the environment)."""
    name = f"catalog-{uuid.uuid4().hex[:10]}"
    object_store.filesystem().mkdir(name)
    storage.configure({"endpoint_url": object_store.endpoint})
    yield name
    storage.configure({})


def _upload_folder(fs, folder: Path, url_prefix: str) -> dict[str, Path]:
    """Every file under `folder` put at the same relative key under the prefix; key -> local file."""
    placed = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = f"{url_prefix}/{path.relative_to(folder).as_posix()}"
            fs.pipe_file(key.removeprefix("s3://"), path.read_bytes())
            placed[key] = path
    return placed


def _rows(store) -> dict[str, dict]:
    return {row["id"]: row for row in store.iter_rows(("id", "path", "label", "metadata", "vector"))}


def _lite(tmp_path: Path, name: str, encoder):
    from imgsearch.store import MilvusStore

    return MilvusStore(str(tmp_path / f"{name}.db"), "images", model=encoder.name, dim=encoder.dim,
                       preprocess_version=encoder.preprocess_version, precision=encoder.precision)


def test_a_bucket_ingests_like_the_same_folder_and_a_reingest_reads_no_object(tmp_path, object_store, bucket, onnx_encoder, photos):
    catalog = tmp_path / "catalog"
    copy_fashion_catalog(catalog, per_class=2)
    (catalog / "shoes" / "nested").mkdir(parents=True)
    photos["coffee"].save(catalog / "shoes" / "nested" / "coffee.jpg", quality=90)
    (catalog / ".thumbs").mkdir()
    photos["camera"].save(catalog / ".thumbs" / "hidden.jpg")  # hidden keys are skipped, as hidden folders are
    fs = object_store.filesystem()
    _upload_folder(fs, catalog, f"s3://{bucket}/shop")
    local, remote = _lite(tmp_path, "local", onnx_encoder), _lite(tmp_path, "remote", onnx_encoder)
    cache = tmp_path / "hashes.sqlite"
    local_report = ingest_catalog(catalog, onnx_encoder, local, workers=0, hash_cache=cache)
    proxy = ObservingProxy(object_store.port)  # every request passes here, and is counted
    try:
        storage.configure({"endpoint_url": f"http://127.0.0.1:{proxy.port}"})
        remote_report = ingest_catalog(f"s3://{bucket}/shop", onnx_encoder, remote, workers=1, hash_cache=cache)
    finally:
        proxy.close()
    assert remote_report.indexed == local_report.indexed == 21 and not remote_report.failed
    assert proxy.object_gets == 21 and proxy.requests - proxy.object_gets <= 10  # one GET per object; the rest list (7 here)
    local_rows, remote_rows = _rows(local), _rows(remote)
    assert set(local_rows) == set(remote_rows)
    for digest, row in remote_rows.items():
        mine = local_rows[digest]
        assert row["label"] == mine["label"]
        assert row["path"] == f"s3://{bucket}/shop/" + Path(mine["path"]).relative_to(catalog).as_posix()
        assert cosine(np.asarray(row["vector"]), np.asarray(mine["vector"])) >= 0.9999
    assert {row["label"] for row in remote_rows.values()} >= {"shoes/nested", "bag"}
    assert remote.roots() == [f"s3://{bucket}/shop"]

    proxy = ObservingProxy(object_store.port)  # every request of the re-ingest passes here, and is counted
    try:
        storage.configure({"endpoint_url": f"http://127.0.0.1:{proxy.port}"})
        again = ingest_catalog(f"s3://{bucket}/shop", onnx_encoder, remote, workers=0, hash_cache=cache)
    finally:
        proxy.close()
    assert (again.indexed, again.skipped, again.failed) == (0, 21, [])
    assert proxy.requests > 0 and proxy.object_gets == 0  # it listed the bucket and read nothing
    local.close(), remote.close()


def test_a_manifest_of_urls_moves_without_reencoding_and_prunes_from_the_listing(tmp_path, object_store, bucket, onnx_encoder):
    fs = object_store.filesystem()
    bags = sorted((FASHION_DIR / "bag").glob("*.png"))[:3]
    for path in bags:
        fs.pipe_file(f"{bucket}/in/bag/{path.name}", path.read_bytes())
    lines = [{"path": f"s3://{bucket}/in/bag/{path.name}", "label": "bag", "sku": f"B-{n}"} for n, path in enumerate(bags)]
    lines.append({"path": f"s3://{bucket}/in/never-uploaded.png", "label": "bag"})  # a vanished object: one failed row
    fs.pipe_file(f"{bucket}/manifest.jsonl", "\n".join(json.dumps(line) for line in lines).encode())
    store = _lite(tmp_path, "manifest", onnx_encoder)
    cache = tmp_path / "hashes.sqlite"
    report = ingest_catalog(f"s3://{bucket}", onnx_encoder, store, manifest=f"s3://{bucket}/manifest.jsonl", workers=0, hash_cache=cache)
    assert report.indexed == 3 and [failure["path"] for failure in report.failed] == [f"s3://{bucket}/in/never-uploaded.png"]
    rows = _rows(store)
    assert {row["metadata"]["sku"] for row in rows.values()} == {"B-0", "B-1", "B-2"}

    moved_id = bytes_sha256(bags[0].read_bytes())
    fs.mv(f"{bucket}/in/bag/{bags[0].name}", f"{bucket}/in/tote/{bags[0].name}")  # a move between prefixes
    fs.rm_file(f"{bucket}/in/bag/{bags[1].name}")
    encoded = []
    original = onnx_encoder.encode
    onnx_encoder.encode = lambda batch: encoded.append(len(batch)) or original(batch)
    try:
        moved = ingest_catalog(f"s3://{bucket}/in", onnx_encoder, store, workers=0, hash_cache=cache, prune=True)
    finally:
        del onnx_encoder.encode
    assert encoded == [] and moved.updated == 1 and moved.pruned == 1
    row = store.get([moved_id])[moved_id]
    assert row["path"] == f"s3://{bucket}/in/tote/{bags[0].name}" and row["label"] == "tote"
    assert row["metadata"]["sku"] == "B-0"  # a listing gives no metadata: the row keeps the manifest's
    assert store.count() == 2
    store.close()


def test_dropped_connections_are_retried_then_fail_only_their_rows(tmp_path, object_store, bucket, onnx_encoder):
    fs = object_store.filesystem()
    shirts = sorted((FASHION_DIR / "shirt").glob("*.png"))[:3]
    for path in shirts:
        fs.pipe_file(f"{bucket}/shirts/{path.name}", path.read_bytes())
    store = _lite(tmp_path, "flaky", onnx_encoder)
    proxy = ObservingProxy(object_store.port, drop_object_gets=2)  # two reads lose their connection, once each
    try:
        storage.configure({"endpoint_url": f"http://127.0.0.1:{proxy.port}"})
        report = ingest_catalog(f"s3://{bucket}/shirts", onnx_encoder, store, workers=0, hash_cache=tmp_path / "h.sqlite")
        assert (report.indexed, report.failed) == (3, []) and proxy.object_gets >= 5  # retried, then read
        fs.pipe_file(f"{bucket}/shirts/late.png", sorted((FASHION_DIR / "bag").glob("*.png"))[0].read_bytes())
        proxy.drop_object_gets = 10_000  # a connection that never holds: that object fails, after the retries
        gets_before, started = proxy.object_gets, time.monotonic()
        failing = ingest_catalog(f"s3://{bucket}/shirts", onnx_encoder, store, workers=0, hash_cache=tmp_path / "h.sqlite")
        seconds, attempts = time.monotonic() - started, proxy.object_gets - gets_before
    finally:
        proxy.close()
    print(f"a read that never holds failed after {attempts} attempts in {seconds:.1f} s")
    assert attempts >= 5  # botocore's standard mode: 5 attempts
    assert failing.skipped == 3 and [failure["path"] for failure in failing.failed] == [f"s3://{bucket}/shirts/late.png"]
    assert failing.indexed == 0 and store.count() == 3 and seconds < 120
    store.close()


def test_an_object_overwritten_between_listing_and_reading_is_stored_as_read(tmp_path, object_store, bucket, onnx_encoder, monkeypatch):
    fs = object_store.filesystem()
    first, second = sorted((FASHION_DIR / "sandal").glob("*.png"))[:2]
    fs.pipe_file(f"{bucket}/sandals/x.png", first.read_bytes())
    listing = storage.list_images

    def overwritten_after_listing(*args, **kwargs):
        yield from listing(*args, **kwargs)
        fs.pipe_file(f"{bucket}/sandals/x.png", second.read_bytes())  # after the plan listed it, before a worker reads it

    monkeypatch.setattr(storage, "list_images", overwritten_after_listing)
    store = _lite(tmp_path, "changed", onnx_encoder)
    report = ingest_catalog(f"s3://{bucket}/sandals", onnx_encoder, store, workers=0, hash_cache=tmp_path / "h.sqlite")
    assert report.indexed == 1 and list(_rows(store)) == [bytes_sha256(second.read_bytes())]
    monkeypatch.setattr(storage, "list_images", listing)
    again = ingest_catalog(f"s3://{bucket}/sandals", onnx_encoder, store, workers=0, hash_cache=tmp_path / "h.sqlite")
    assert (again.indexed, again.skipped) == (0, 1) and store.count() == 1
    store.close()


def test_wrong_keys_a_missing_bucket_and_a_stopped_store_are_one_line_and_exit_2(tmp_path, object_store, bucket):
    database = tmp_path / "never.db"
    cases = {
        "wrong keys": (f"s3://{bucket}", {**object_store.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}),
        "missing bucket": ("s3://no-such-bucket-here/catalog", object_store.env()),
        "stopped store": (f"s3://{bucket}", object_store.env(endpoint="http://127.0.0.1:9")),
    }
    for case, (url, env) in cases.items():
        result = run_cli(["ingest", url, "--uri", str(database)], env_extra=env)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (case, result.stderr)
        assert object_store.SECRET not in result.stderr + result.stdout and "not-the-secret" not in result.stderr
        assert not database.exists(), case
    refused = run_cli(["info", "--uri", str(database), "--storage-options", '{"secret": "x"}'])
    assert refused.returncode == 2 and "credentials" in refused.stderr and "x" not in refused.stderr.split("credentials")[1]


def test_the_service_serves_objects_only_under_their_recorded_prefix(tmp_path, object_store, bucket, onnx_encoder):
    from imgsearch.config import load_settings
    from imgsearch.store import ImageRecord

    fs = object_store.filesystem()
    coat, other = sorted((FASHION_DIR / "coat").glob("*.png"))[:2]
    fs.pipe_file(f"{bucket}/shop/coat/{coat.name}", coat.read_bytes())
    fs.mkdir(f"{bucket}-private")
    fs.pipe_file(f"{bucket}-private/secret.png", other.read_bytes())
    fs.pipe_file(f"{bucket}/secret.png", other.read_bytes())
    store = _lite(tmp_path, "served", onnx_encoder)
    ingest_catalog(f"s3://{bucket}/shop", onnx_encoder, store, workers=0, hash_cache=tmp_path / "h.sqlite")
    vector = np.full(onnx_encoder.dim, 0.01, dtype=np.float32)
    escapes = {  # imported rows: a path is data, never a licence to read it
        "another bucket": f"s3://{bucket}-private/secret.png",
        "a bucket that shares the prefix": f"s3://{bucket}-private/shop/x.png",
        "dot-dot": f"s3://{bucket}/shop/../secret.png",
        "double slash": f"s3://{bucket}/shop//../secret.png",
        "percent-encoding": f"s3://{bucket}/shop/%2e%2e/secret.png",
    }
    store.upsert([ImageRecord(id=f"{n:064x}", vector=vector, path=path) for n, path in enumerate(escapes.values(), 1)])
    store.close()
    settings = load_settings(
        milvus_uri=str(tmp_path / "served.db"), collection="images", upload_dir=str(tmp_path / "uploads"), device="cpu",
        storage_options=json.dumps({"endpoint_url": object_store.endpoint}),
    )
    with serve(settings) as client:
        good = client.get(f"/images/{bytes_sha256(coat.read_bytes())}")
        assert good.status_code == 200 and good.content == coat.read_bytes() and good.headers["content-type"] == "image/png"
        thumbnail = client.get(f"/images/{bytes_sha256(coat.read_bytes())}?size=32")
        assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
        for n, case in enumerate(escapes, 1):
            assert client.get(f"/images/{n:064x}").status_code == 404, case
        storage.configure({"endpoint_url": "http://127.0.0.1:9"})  # the store stops answering (the options are process-wide)
        for size in ("", "?size=32"):
            down = client.get(f"/images/{bytes_sha256(coat.read_bytes())}{size}")
            assert down.status_code == 503 and down.headers["retry-after"] and "cannot reach" in down.json()["detail"], down.text
        storage.configure({"endpoint_url": object_store.endpoint})
        fs.rm_file(f"{bucket}/shop/coat/{coat.name}")
        assert client.get(f"/images/{bytes_sha256(coat.read_bytes())}").status_code == 404  # gone from the bucket


def test_two_replicas_on_one_server_and_one_upload_bucket_behave_as_one_service(tmp_path, object_store, bucket, milvus_server_uri):
    from imgsearch.config import load_settings

    collection = f"replicas_{uuid.uuid4().hex[:8]}"
    settings = load_settings(
        milvus_uri=milvus_server_uri, collection=collection, upload_dir=f"s3://{bucket}/uploads", device="cpu",
        storage_options=json.dumps({"endpoint_url": object_store.endpoint}),
    )
    classes = {"bag": sorted((FASHION_DIR / "bag").glob("*.png")), "trouser": sorted((FASHION_DIR / "trouser").glob("*.png"))}
    with serve(settings) as a, serve(settings) as b:
        for label, files in classes.items():
            enrolled = a.post("/enroll", data={"label": label}, files=[("image", (p.name, p.read_bytes(), "image/png")) for p in files[:8]])
            assert enrolled.status_code == 200, enrolled.text
        assert enrolled.json()["calibration"]["labels"] == 2  # A recalibrated and wrote the threshold to the collection
        query = classes["trouser"][-1]
        deadline, answer = time.monotonic() + 10, None
        while time.monotonic() < deadline:  # B sees A's rows within Milvus's consistency window
            response = b.post("/recognize", files=[("image", (query.name, query.read_bytes(), "image/png"))])
            assert response.status_code == 200, response.text
            answer = response.json()[0]
            if answer["label"] == "trouser":
                break
            time.sleep(0.5)
        assert answer["label"] == "trouser" and answer["threshold_source"].startswith("self-calibrated"), answer

        from skimage import data as skimage_data  # a query no reference resembles, kept for review through A

        buffer = io.BytesIO()
        Image.fromarray(skimage_data.chelsea()).save(buffer, "JPEG", quality=85)
        cat = buffer.getvalue()
        kept = a.post("/recognize", files={"image": ("cat.jpg", cat, "image/jpeg")}, data={"keep_unknown": "true", "threshold": "0.999"})
        assert kept.status_code == 200 and kept.json()[0]["kept_for_review"] is True, kept.text
        assert object_store.filesystem().exists(f"{bucket}/uploads/{bytes_sha256(cat)[:2]}/{bytes_sha256(cat)}.jpg")
        [group] = [g for g in b.get("/review").json() if bytes_sha256(cat) in {m["id"] for m in g["members"]}]
        enrolled = b.post("/review/enroll", json={"label": "cat", "select": [group["key"]]})
        assert enrolled.status_code == 200 and enrolled.json()["ids"] == [bytes_sha256(cat)], enrolled.text
        assert a.get(f"/images/{bytes_sha256(cat)}").content == cat  # the kept query's file, through the other replica

        upload = classes["bag"][-1]
        stored = a.post("/images", files=[("image", (upload.name, upload.read_bytes(), "image/png"))])
        assert stored.status_code == 200, stored.text
        image_id = stored.json()["ids"][0]
        key = f"{bucket}/uploads/{image_id[:2]}/{image_id}.png"
        assert object_store.filesystem().cat_file(key) == upload.read_bytes()
        assert b.get(f"/images/{image_id}").content == upload.read_bytes()
        deleted = b.delete(f"/images/{image_id}")
        assert deleted.status_code == 200 and deleted.json()["file_removed"] is True
        assert not object_store.filesystem().exists(key)
        assert a.get(f"/images/{image_id}").status_code == 404


def test_duplicates_of_bucket_rows_show_their_objects_and_copies(tmp_path, object_store, bucket, onnx_encoder):
    from imgsearch.duplicates import find_duplicates, write_html

    fs = object_store.filesystem()
    dress = sorted((FASHION_DIR / "dress").glob("*.png"))[0]
    for key in ("dresses/a.png", "dresses/copy-of-a.png"):  # the same bytes twice: one row, one recorded copy
        fs.pipe_file(f"{bucket}/{key}", dress.read_bytes())
    store = _lite(tmp_path, "dupes", onnx_encoder)
    report = ingest_catalog(f"s3://{bucket}/dresses", onnx_encoder, store, workers=0, hash_cache=tmp_path / "h.sqlite")
    assert (report.indexed, report.copies) == (1, 1)
    found = find_duplicates(store, prefix=f"s3://{bucket}/")
    [group] = found.groups
    assert group.representative["path"] == f"s3://{bucket}/dresses/a.png"
    assert [(member.path, member.copy_of) for member in group.members] == [(f"s3://{bucket}/dresses/copy-of-a.png", f"s3://{bucket}/dresses/a.png")]
    page = write_html(found, tmp_path / "dupes.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 2 and "not readable" not in page  # thumbnails read from the bucket
    store.close()

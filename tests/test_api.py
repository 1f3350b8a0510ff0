"""The REST service over real HTTP: a uvicorn server on loopback, real Milvus Lite, the real Lite0 model."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from helpers import FASHION_DIR, copy_fashion_catalog, free_port, healthy_client, serve
from imgsearch.config import load_settings
from imgsearch.ingest.catalog import bytes_sha256, file_sha256

pytestmark = pytest.mark.slow  # the REST service with the real model
REVIEW_MAX = 3  # kept "unknown" queries the test service holds at most



@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    folder = root / "catalog"
    copy_fashion_catalog(folder, 3)
    return root, folder


@pytest.fixture(scope="module")
def service(catalog, onnx_encoder):
    root, folder = catalog
    settings = load_settings(
        milvus_uri=str(root / "api.db"), upload_dir=root / "uploads", batch_wait_ms=50.0, device="cpu",
        max_upload_bytes=2_000_000, review_max=REVIEW_MAX,
    )
    from imgsearch.ingest.pipeline import ingest_catalog
    from imgsearch.session import open_store

    encoder = onnx_encoder
    with open_store(settings, encoder) as store:
        ingest_catalog(folder, encoder, store, workers=0)
    with serve(settings) as client:
        yield client


def test_health_info_and_openapi(service):
    assert service.get("/health").json() == {"status": "ok"}
    info = service.get("/info").json()
    assert info["count"] == 30 and info["model"] == "efficientnet_lite0" and info["supports_text"] is False
    paths = service.get("/openapi.json").json()["paths"]
    for endpoint in ("/health", "/info", "/search", "/search/text", "/recognize", "/enroll", "/images", "/images/{image_id}", "/metrics"):
        assert endpoint in paths
    from imgsearch.config import DUPLICATES_THRESHOLD_HELP  # the CLI's defaults too: the two once disagreed (0.85 and 0.9)

    [threshold] = [p for p in paths["/duplicates"]["get"]["parameters"] if p["name"] == "threshold"]
    assert threshold["schema"].get("default") is None and threshold["description"] == DUPLICATES_THRESHOLD_HELP


def test_duplicates_scans_run_one_at_a_time_across_requests(service, monkeypatch):
    """Each GET /duplicates reads the whole collection; concurrent ones wait their turn, so the memory of scans in
    flight is one scan's, and every request still gets its answer."""
    import threading

    import imgsearch.duplicates

    scanning, most = [0], [0]
    lock = threading.Lock()
    real = imgsearch.duplicates.find_duplicates

    def watched(*args, **kwargs):
        with lock:
            scanning[0] += 1
            most[0] = max(most[0], scanning[0])
        try:
            time.sleep(0.3)  # long enough for the other requests to arrive meanwhile
            return real(*args, **kwargs)
        finally:
            with lock:
                scanning[0] -= 1

    monkeypatch.setattr(imgsearch.duplicates, "find_duplicates", watched)
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: service.get("/duplicates", params={"threshold": 0.95}), range(3)))
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert len({answer.text for answer in answers}) == 1 and answers[0].json()["rows"] == 30
    assert most[0] == 1


def test_duplicates_grades_through_the_api(service, catalog):
    """A mirrored upload of a stored product is the same picture edited, with its evidence; the other products are
    never copies of each other, only look-alikes listed apart when asked."""
    _, folder = catalog
    product = sorted((folder / "sneaker").glob("*.png"))[0]
    buffer = io.BytesIO()
    Image.open(product).transpose(Image.FLIP_LEFT_RIGHT).save(buffer, "PNG")
    [upload_id] = service.post("/images", files={"image": ("m.png", buffer.getvalue(), "image/png")}).json()["ids"]
    try:
        answer = service.get("/duplicates").json()
        assert answer["similar"] is None
        [group] = [g for g in answer["groups"] if upload_id in {g["representative"]["id"], *(m["id"] for m in g["members"])}]
        names = {g["representative"]["path"] for g in answer["groups"]} | {m["path"] for g in answer["groups"] for m in g["members"]}
        assert str(product.relative_to(folder)) in {group["representative"]["path"], *(m["path"] for m in group["members"])}
        assert [(m["grade"], m["evidence"]) for m in group["members"]] == [("same picture edited", "mirrored")]
        assert len(names) == 2  # no two of the 30 different products are called copies
        asked = service.get("/duplicates", params={"similar": "true", "threshold": 0.5}).json()  # look-alikes from 0.5
        assert asked["groups"] == answer["groups"] and asked["similar"]
        assert {(m["grade"], m["evidence"]) for g in asked["similar"] for m in g["members"]} == {("similar", None)}
    finally:
        assert service.delete(f"/images/{upload_id}").status_code == 200


def test_search_by_image_finds_the_same_image_first(service, catalog):
    _, folder = catalog
    query = sorted((folder / "bag").glob("*.png"))[0]
    response = service.post("/search", files={"image": ("q.png", query.read_bytes(), "image/png")}, data={"k": "3"})
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 3 and results[0]["id"] == file_sha256(query) and results[0]["score"] == pytest.approx(1, abs=1e-3)
    assert set(results[0]) == {"id", "score", "path", "label", "metadata"}
    filtered = service.post(
        "/search", files={"image": ("q.png", query.read_bytes(), "image/png")}, data={"k": "5", "filter": 'label == "coat"'}
    ).json()["results"]
    assert {hit["label"] for hit in filtered} == {"coat"}


def test_text_search_needs_a_clip_model(service):
    response = service.post("/search/text", json={"text": "a red shoe", "k": 3})
    assert response.status_code == 400 and "text" in response.json()["detail"]


def test_enroll_then_recognize(service, tmp_path):
    bags = sorted((FASHION_DIR / "bag").glob("*.png"))[10:15]
    enrolled = service.post("/enroll", data={"label": "handbag"}, files=[("image", (p.name, p.read_bytes(), "image/png")) for p in bags])
    assert enrolled.status_code == 200, enrolled.text
    body = enrolled.json()
    assert body["indexed"] == 5 and body["ids"] == [file_sha256(p) for p in bags]
    assert body["check"]["label"] == "handbag" and body["check"]["references"] == 5 and body["calibration"]["labels"] >= 2
    queries = sorted((FASHION_DIR / "bag").glob("*.png"))[20:22]
    response = service.post("/recognize", files=[("image", (p.name, p.read_bytes(), "image/png")) for p in queries], data={"k": "10"})
    assert response.status_code == 200, response.text
    items = response.json()
    assert [item["path"] for item in items] == [p.name for p in queries]
    fields = {"path", "label", "confidence", "threshold", "margin", "threshold_source", "kept_for_review", "neighbours"}
    assert all(set(item) == fields and len(item["neighbours"]) == 10 for item in items)
    assert all(item["threshold_source"].startswith("self-calibrated on") for item in items)  # the enrolment recalibrated
    given = service.post("/recognize", files=[("image", ("q.png", queries[0].read_bytes(), "image/png"))], data={"threshold": "0.99"})
    assert given.json()[0]["threshold_source"] == "given" and given.json()[0]["label"] is None
    assert "handbag" in {n["label"] for item in items for n in item["neighbours"]}


def test_a_slow_recalibration_runs_on_after_the_enrolment_answers(catalog, onnx_encoder):
    """With no time to wait (at 100k references it takes about a minute), POST /enroll answers at once, says the
    threshold is pending, and the recalibrated one is in effect soon after; an API deletion of a reference
    recalibrates in the background too."""
    root, folder = catalog
    settings = load_settings(
        milvus_uri=str(root / "pending.db"), upload_dir=root / "pending-uploads", device="cpu", calibration_wait_seconds=0,
    )
    from imgsearch.ingest.pipeline import ingest_catalog
    from imgsearch.session import open_store

    with open_store(settings, onnx_encoder) as store:
        ingest_catalog(folder, onnx_encoder, store, workers=0)  # 10 labels x 3, calibrated by the ingest

    def calibrated_references(client) -> int:
        return client.get("/info").json()["self_calibration"]["references"]

    def eventually(client, references: int) -> None:
        deadline = time.monotonic() + 60
        while calibrated_references(client) != references and time.monotonic() < deadline:
            time.sleep(0.2)
        assert calibrated_references(client) == references

    bags = sorted((FASHION_DIR / "bag").glob("*.png"))[10:14]
    with serve(settings) as client:
        assert calibrated_references(client) == 30
        body = client.post("/enroll", data={"label": "handbag"}, files=[("image", (p.name, p.read_bytes(), "image/png")) for p in bags]).json()
        assert body["indexed"] == 4 and body["calibration"] is None and body["calibration_pending"] is True
        eventually(client, 34)
        assert client.delete(f"/images/{body['ids'][0]}").status_code == 200
        eventually(client, 33)


def test_review_through_the_api_keeps_lists_and_enrols_unknown_queries(service):
    from skimage import data

    def jpeg(image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        return buffer.getvalue()

    cat = Image.fromarray(data.chelsea())
    shots = [jpeg(cat), jpeg(cat.crop((25, 15, cat.width - 25, cat.height - 15)))]
    files = [("image", (f"cat{i}.jpg", shot, "image/jpeg")) for i, shot in enumerate(shots)]
    answers = service.post("/recognize", files=files, data={"keep_unknown": "true"}).json()
    assert [answer["label"] for answer in answers] == [None, None]
    groups = service.get("/review").json()
    [group] = [g for g in groups if {m["id"] for m in g["members"]} == {bytes_sha256(shot) for shot in shots}]
    assert all(m["path"].endswith(f"{m['id']}.jpg") for m in group["members"])  # saved like uploads: named by content
    refused = service.post("/review/enroll", json={"label": "cat", "select": ["not-an-id"]})
    assert refused.status_code == 422 and "neither a review group key" in refused.text
    for selection in (str(group["group"]), "²", "①", "9" * 99):  # numbers change as queries are kept; not even digits
        refused = service.post("/review/enroll", json={"label": "cat", "select": [selection]})
        assert refused.status_code == 422 and "review group" in refused.json()["detail"], selection
    enrolled = service.post("/review/enroll", json={"label": "cat", "select": [group["key"]]}).json()
    assert enrolled["enrolled"] == 2 and sorted(enrolled["ids"]) == sorted(bytes_sha256(shot) for shot in shots)
    assert all(bytes_sha256(shot) not in {m["id"] for g in service.get("/review").json() for m in g["members"]} for shot in shots)
    mirrored = jpeg(cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((0, 0, cat.width - 40, cat.height - 20)))
    [answer] = service.post("/recognize", files={"image": ("another.jpg", mirrored, "image/jpeg")}).json()
    assert answer["label"] == "cat"
    assert service.delete(f"/images/{bytes_sha256(shots[0])}").status_code == 200  # references like any other
    assert service.delete(f"/images/{bytes_sha256(shots[1])}").status_code == 200


def test_the_review_holds_at_most_its_limit_and_saves_no_file_for_what_it_refuses(service, catalog):
    from skimage import data

    def png(pixels) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).convert("RGB").save(buffer, "PNG")
        return buffer.getvalue()

    photos = [png(data.astronaut()), png(data.coffee()), png(data.rocket()), png(data.camera())]
    files = [("image", (f"photo{i}.png", photo, "image/png")) for i, photo in enumerate(photos)]
    answers = service.post("/recognize", files=files, data={"keep_unknown": "true"}).json()
    assert [answer["label"] for answer in answers] == [None] * 4  # street photos against a clothing catalog
    assert [answer["kept_for_review"] for answer in answers] == [True] * REVIEW_MAX + [False] * (4 - REVIEW_MAX)
    held = {m["id"] for g in service.get("/review").json() for m in g["members"]}
    assert held == {bytes_sha256(photo) for photo in photos[:REVIEW_MAX]}
    refused = bytes_sha256(photos[-1])
    assert not list((catalog[0] / "uploads").rglob(f"{refused}*"))  # refused: its upload is not stored either
    [again] = service.post("/recognize", files=[files[0]], data={"keep_unknown": "true"}).json()
    assert again["kept_for_review"] is True  # the same bytes again: already held
    [plain] = service.post("/recognize", files=[files[-1]]).json()
    assert plain["kept_for_review"] is None  # not asked to keep
    enrolled = service.post("/review/enroll", json={"label": "street", "select": sorted(held)}).json()
    assert enrolled["enrolled"] == REVIEW_MAX  # leaves the review empty for the other tests, then the references go
    assert all(service.delete(f"/images/{row_id}").status_code == 200 for row_id in held)


def test_upload_get_thumbnail_and_delete(service, catalog):
    uploads_dir = catalog[0] / "uploads"
    image = Image.new("RGB", (320, 200), (200, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    uploaded = service.post("/images", files={"image": ("red.png", buffer.getvalue(), "image/png")}, data={"label": "red"})
    assert uploaded.status_code == 200, uploaded.text
    [image_id] = uploaded.json()["ids"]
    original = service.get(f"/images/{image_id}")
    assert original.status_code == 200 and original.content == buffer.getvalue()
    thumb = service.get(f"/images/{image_id}", params={"size": 64})
    assert thumb.headers["content-type"] == "image/jpeg" and max(Image.open(io.BytesIO(thumb.content)).size) == 64
    stored = uploads_dir / image_id[:2] / f"{image_id}.png"  # named by content, never by label or client name
    assert stored.read_bytes() == buffer.getvalue()
    assert service.delete(f"/images/{image_id}").json() == {"deleted": image_id, "file_removed": True}
    assert not stored.exists()  # the uploaded file went with its row
    assert service.get(f"/images/{image_id}").status_code == 404
    assert service.delete(f"/images/{image_id}").status_code == 404
    assert service.get("/images/..%2F..%2Fetc%2Fpasswd").status_code == 404  # ids only, never paths


def test_deleting_a_catalog_image_keeps_the_users_file(service, catalog):
    catalog_file = sorted((catalog[1] / "trouser").glob("*.png"))[-1]
    image_id = file_sha256(catalog_file)
    assert service.delete(f"/images/{image_id}").json() == {"deleted": image_id, "file_removed": False}
    assert catalog_file.is_file() and service.get(f"/images/{image_id}").status_code == 404


@pytest.mark.parametrize(
    "name, payload, status",
    [
        ("empty.png", b"", 422),
        ("notes.png", b"just some text, not an image", 422),
        ("garbage.jpg", b"\xff\xd8\xff\xe0" + b"\x00\x13" * 500, 422),
        ("huge.png", b"\x89PNG" + b"\x00" * 2_100_000, 413),
    ],
)
def test_hostile_uploads_get_4xx_with_detail(service, name, payload, status):
    response = service.post("/search", files={"image": (name, payload, "image/png")})
    assert response.status_code == status and response.json()["detail"]


def test_decompression_bomb_is_422(service):
    bomb = Image.new("L", (12000, 12000))  # 144 MP > the 64 MP limit, a few hundred KB as PNG
    buffer = io.BytesIO()
    bomb.save(buffer, "PNG")
    response = service.post("/search", files={"image": ("bomb.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 422 and "pixels" in response.json()["detail"]


def test_concurrent_requests_share_batches(service, catalog):
    _, folder = catalog
    queries = sorted(folder.rglob("*.png"))[:16]

    def search(path):
        return service.post("/search", files={"image": (path.name, path.read_bytes(), "image/png")}, data={"k": "1"}).status_code

    before = batch_histogram(service)
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(search, queries)) == [200] * 16
    after = batch_histogram(service)
    passes, images = after[0] - before[0], after[1] - before[1]
    assert images == 16 and passes < 16, (passes, images)  # fewer forward passes than requests
    scraped = service.get("/metrics").text.splitlines()
    in_flight = [line for line in scraped if line.startswith("imgsearch_requests_in_flight ")]
    assert in_flight == ["imgsearch_requests_in_flight 1.0"]  # the scrape itself: the 16 searches were all counted out
    heap = [float(line.split()[1]) for line in scraped if line.startswith('imgsearch_heap_bytes{state="in_use"}')]
    assert heap and heap[0] > 50 * 2**20, heap  # the live heap of a process with a model loaded


def batch_histogram(client) -> tuple[float, float]:
    text = client.get("/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("imgsearch_batch_size_")}
    return values["imgsearch_batch_size_count"], values["imgsearch_batch_size_sum"]


def test_api_key(catalog, onnx_encoder):
    root, _ = catalog
    settings = load_settings(milvus_uri=str(root / "keyed.db"), api_key="s3cret", device="cpu")
    with serve(settings) as client:
        assert client.get("/info").status_code == 401
        assert client.get("/info", headers={"X-API-Key": "wrong"}).status_code == 401
        assert client.get("/info", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.get("/health").status_code == 200  # readiness stays open for orchestrators


@pytest.mark.browser
def test_web_page_in_a_real_browser(service, catalog):
    """Debian's Chromium, driven by Playwright: upload an image, see the grid with it first; then recognise."""
    from playwright.sync_api import sync_playwright

    _, folder = catalog
    query = sorted((folder / "trouser").glob("*.png"))[0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(str(service.base_url))
            page.wait_for_function("document.querySelector('[data-testid=info]').textContent.includes('images')")
            assert page.is_hidden("#text-form")  # Lite0 has no text tower
            page.set_input_files("#file", str(query))
            page.wait_for_selector("[data-testid=result]")
            cards = page.locator("[data-testid=result]")
            assert cards.count() >= 5
            assert cards.first.get_attribute("data-id") == file_sha256(query)
            assert cards.first.locator(".label").inner_text() == "trouser"
            page.wait_for_function("document.querySelector('[data-testid=result] img').naturalWidth > 0")  # thumbnail shown

            page.check("input[value=recognize]")
            page.set_input_files("#file", str(sorted((FASHION_DIR / "trouser").glob("*.png"))[25]))
            page.wait_for_selector("[data-testid=label]")
            assert page.inner_text("[data-testid=label]") in ("trouser", "unknown")
            assert "recognised" in page.inner_text("[data-testid=status]")
        finally:
            browser.close()


def test_fuzzed_requests_never_get_a_5xx(service):
    """A bounded property-based fuzz of every operation in /openapi.json (schemathesis strategies, 10 examples
    each): user errors are 4xx with a detail, never 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{str(service.base_url).rstrip('/')}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    failures, statuses = [], set()
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def call(case) -> None:
            response = case.call(timeout=120)
            statuses.add(response.status_code)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:200]}")

        call()
    assert failures == []
    assert any(200 <= status < 300 for status in statuses) and any(400 <= status < 500 for status in statuses), statuses


def test_load_on_the_server_backend(milvus_server_uri, catalog, onnx_encoder, tmp_path):
    """8 clients x 100 searches against an `imgsearch serve` process on a real Milvus server: no errors."""
    from imgsearch.ingest.pipeline import ingest_catalog
    from imgsearch.session import open_store

    root, folder = catalog
    collection = f"load_{os.getpid()}"
    settings = load_settings(milvus_uri=milvus_server_uri, collection=collection, device="cpu")
    with open_store(settings, onnx_encoder) as store:
        ingest_catalog(folder, onnx_encoder, store, workers=0)
    queries = [path.read_bytes() for path in sorted(folder.rglob("*.png"))[:10]]
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMGSEARCH_")}
    server = subprocess.Popen(
        [sys.executable, "-m", "imgsearch.cli", "serve", "--port", str(port), "--uri", milvus_server_uri,
         "--collection", collection, "--device", "cpu"],
        env={**env, "IMGSEARCH_UPLOAD_DIR": str(tmp_path / "uploads")}, stderr=subprocess.PIPE, text=True,
    )
    try:
        client = healthy_client(port, server)

        def search(i: int) -> tuple[int, float]:
            began = time.perf_counter()
            response = client.post("/search", files={"image": ("q.png", queries[i % 10], "image/png")}, data={"k": "5"})
            return response.status_code, time.perf_counter() - began

        began = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(search, range(8 * 100)))
        seconds = time.perf_counter() - began
        stopped = stop_with_requests_in_flight(server, client, port, queries)
    finally:
        server.terminate()
        server.wait(timeout=60)
    statuses = [status for status, _ in results]
    latencies = np.array([latency for _, latency in results]) * 1000
    print(f"load: {len(results)} requests in {seconds:.1f} s ({len(results) / seconds:.0f}/s), "
          f"p50 {np.percentile(latencies, 50):.0f} ms, p99 {np.percentile(latencies, 99):.0f} ms")
    assert statuses.count(200) == 800, {status: statuses.count(status) for status in set(statuses)}
    assert stopped["in flight"] == [200] * 4 and stopped["exit"] == 0, stopped
    assert stopped["new connection"] == "refused" and stopped["last answer after the signal"] > 0, stopped


def status_within(request, status: int, seconds: float) -> httpx.Response:
    """`request()` again every 0.3 s until it answers `status` or `seconds` pass; the last answer."""
    deadline = time.monotonic() + seconds
    while True:
        response = request()
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.3)


@pytest.mark.server
def test_a_service_whose_alias_moves_to_another_embedding_answers_503_until_it_names_its_own_again(
    milvus_server_uri, catalog, onnx_encoder, tmp_path
):
    """`reindex` moves an alias in one step. A replica still running the old encoder must not compare its queries with
    vectors of another embedding (at the same width the answers would be silently wrong): within
    EMBEDDING_CHECK_SECONDS its searches and /health answer 503 with a line naming the embedding the alias now holds,
    and it answers again once the alias names its own embedding."""
    from pymilvus import MilvusClient

    from imgsearch.api.service import EMBEDDING_CHECK_SECONDS
    from imgsearch.ingest.pipeline import ingest_catalog
    from imgsearch.session import open_store
    from imgsearch.store import MilvusStore

    root, folder = catalog
    suffix = f"{os.getpid()}_{tmp_path.name[-6:]}".replace("-", "_")
    own, other, alias = f"moved_own_{suffix}", f"moved_other_{suffix}", f"moved_{suffix}"
    with open_store(load_settings(milvus_uri=milvus_server_uri, collection=own, device="cpu"), onnx_encoder) as store:
        ingest_catalog(folder, onnx_encoder, store, workers=0)
        model, dim, precision = store.model, store.dim, store.precision
    adapted = "adapted:0123456789abcdef"  # another embedding of the same model and width: nothing but the guard tells them apart
    MilvusStore(milvus_server_uri, other, model=model, dim=dim, precision=precision, weights=adapted).close()
    client = MilvusClient(uri=milvus_server_uri)
    client.create_alias(own, alias)
    query = sorted(folder.rglob("*.png"))[0].read_bytes()
    settings = load_settings(milvus_uri=milvus_server_uri, collection=alias, device="cpu", upload_dir=tmp_path / "uploads")
    try:
        with serve(settings) as http:
            def search() -> httpx.Response:
                return http.post("/search", files={"image": ("q.png", query, "image/png")}, data={"k": "3"})

            assert len(search().json()["results"]) == 3
            client.alter_alias(other, alias)
            refused = status_within(search, 503, EMBEDDING_CHECK_SECONDS + 10)
            assert refused.status_code == 503 and adapted in refused.json()["detail"] and "restart" in refused.json()["detail"], refused.text
            assert http.get("/health").status_code == 503
            recognised = http.post("/recognize", files={"image": ("q.png", query, "image/png")})
            assert recognised.status_code == 503, recognised.text
            client.alter_alias(own, alias)
            answered = status_within(search, 200, EMBEDDING_CHECK_SECONDS + 10)
            assert answered.status_code == 200 and len(answered.json()["results"]) == 3, answered.text
            assert http.get("/health").status_code == 200
    finally:
        client.drop_alias(alias)
        for name in (own, other):
            client.drop_collection(name)
        client.close()


def stop_with_requests_in_flight(server: subprocess.Popen, client, port: int, queries: list[bytes]) -> dict:
    """SIGTERM while four 16-image recognitions are being answered: they finish, a new connection is refused, the
    service exits 0 (a graceful stop)."""
    import signal

    images = [("image", (f"q{index}.png", queries[index % len(queries)], "image/png")) for index in range(16)]

    def recognize() -> tuple[int, float]:
        status = client.post("/recognize", files=images).status_code
        return status, time.monotonic()

    with ThreadPoolExecutor(4) as pool:
        inflight = [pool.submit(recognize) for _ in range(4)]
        time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.2)
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
            new_connection = "answered"
        except httpx.ConnectError:
            new_connection = "refused"
        answers = [future.result() for future in inflight]
    return {
        "in flight": [status for status, _ in answers], "new connection": new_connection,
        "last answer after the signal": max(at for _, at in answers) - signalled, "exit": server.wait(timeout=60),
    }


def test_cors_is_configurable(catalog, onnx_encoder):
    root, _ = catalog
    settings = load_settings(milvus_uri=str(root / "cors.db"), cors_origins=["https://shop.example"], device="cpu")
    with serve(settings) as client:
        allowed = client.options("/info", headers={"Origin": "https://shop.example", "Access-Control-Request-Method": "GET"})
        assert allowed.headers.get("access-control-allow-origin") == "https://shop.example"
        other = client.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_uploads_kept_for_review_and_catalog_rows_keep_their_files(tmp_path, onnx_encoder):
    """An upload's file goes with its row only when no kept review query uses it; enrolling a kept query whose
    content is a catalog row relabels that row and leaves its path, metadata and file alone. The catalog lies inside
    the upload folder here: its files are still the user's."""
    from skimage import data

    from imgsearch.ingest.pipeline import ingest_catalog
    from imgsearch.session import open_store

    catalog = tmp_path / "catalog"
    copy_fashion_catalog(catalog, 2)
    Image.fromarray(data.coffee()).save(catalog / "coffee.png")  # an unlabeled catalog photo
    settings = load_settings(milvus_uri=str(tmp_path / "r.db"), upload_dir=tmp_path, batch_wait_ms=10.0, device="cpu")
    with open_store(settings, onnx_encoder) as store:
        ingest_catalog(catalog, onnx_encoder, store, workers=0)
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, "PNG")
    astronaut = buffer.getvalue()
    with serve(settings) as client:
        [upload_id] = client.post("/images", files={"image": ("a.png", astronaut, "image/png")}).json()["ids"]
        upload_file = tmp_path / upload_id[:2] / f"{upload_id}.png"
        photos = [("image", ("a.png", astronaut, "image/png")), ("image", ("c.png", (catalog / "coffee.png").read_bytes(), "image/png"))]
        answers = client.post("/recognize", files=photos, data={"keep_unknown": "true"}).json()
        assert [answer["kept_for_review"] for answer in answers] == [True, True]
        assert client.delete(f"/images/{upload_id}").json() == {"deleted": upload_id, "file_removed": False}  # review uses it
        assert upload_file.is_file()
        coffee_id = file_sha256(catalog / "coffee.png")
        for row_id, label in ((upload_id, "astronaut"), (coffee_id, "coffee")):
            assert client.post("/review/enroll", json={"label": label, "select": [row_id[:16]]}).status_code == 200
        assert client.get(f"/images/{upload_id}").content == astronaut  # the reference's image is still there
        [hit] = client.post("/search", files={"image": ("c.png", (catalog / "coffee.png").read_bytes(), "image/png")}, data={"k": 1}).json()["results"]
        assert (hit["id"], hit["label"], hit["path"]) == (coffee_id, "coffee", "coffee.png")  # still the catalog file
        assert client.delete(f"/images/{coffee_id}").json()["file_removed"] is False and (catalog / "coffee.png").is_file()
        bag = sorted((catalog / "bag").glob("*.png"))[0]
        assert client.delete(f"/images/{file_sha256(bag)}").json()["file_removed"] is False and bag.is_file()
        assert client.delete(f"/images/{upload_id.upper()}").json() == {"deleted": upload_id, "file_removed": True}
        assert not upload_file.exists()  # nothing refers to it any more

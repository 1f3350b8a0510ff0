"""The web page in Debian's Chromium through Playwright, with an API key set: the query beside its results, paths,
labels and metadata, the label filter, more results, errors that replace results, and the duplicates view with a
confirmed delete. Screenshots go to tests/artifacts/ (ignored by git)."""

from __future__ import annotations

import io
import shutil

import pytest
from PIL import Image

from helpers import ARTIFACTS, browser_page, fashion_images, serve

pytestmark = [pytest.mark.slow, pytest.mark.browser]

KEY = "page-key"


@pytest.fixture(scope="module")
def service(tmp_path_factory, onnx_encoder):
    from skimage import data

    from imgsearch.config import load_settings
    from imgsearch.ingest.pipeline import ingest_catalog
    from imgsearch.session import open_store

    root = tmp_path_factory.mktemp("page")
    catalog = root / "catalog"
    for image in fashion_images(per_class=6):
        (catalog / image.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, catalog / image.parent.name / image.name)
    cat = Image.fromarray(data.chelsea())
    cat.save(catalog / "chelsea.jpg", quality=90)
    cat.resize((cat.width // 2, cat.height // 2)).save(catalog / "chelsea_small.jpg", quality=60)
    shutil.copy(catalog / "chelsea.jpg", catalog / "chelsea_copy.jpg")  # the same bytes: one row, a recorded copy
    (root / "items.csv").write_text("path,sku\nchelsea.jpg,CAT-0001\n")
    settings = load_settings(
        milvus_uri=str(root / "page.db"), upload_dir=root / "uploads", api_key=KEY, public=["page"], device="cpu",
    )
    with open_store(settings, onnx_encoder) as store:
        ingest_catalog(catalog, onnx_encoder, store, workers=0)
        ingest_catalog(catalog, onnx_encoder, store, manifest=root / "items.csv", workers=0)  # adds the metadata
    query = root / "query.jpg"
    cat.crop((20, 20, cat.width - 20, cat.height - 20)).save(query, quality=70)
    with serve(settings) as client:
        client.headers["X-API-Key"] = KEY
        yield client, root, query


@pytest.fixture
def page(service):
    client, *_ = service
    with browser_page(str(client.base_url)) as page:
        yield page


def with_key(page) -> None:
    page.wait_for_function("document.querySelector('#key-box').open")  # the page opened it on the 401
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.querySelector('[data-testid=info]').textContent.includes('images')")


def test_without_the_key_the_page_says_so(page):
    page.wait_for_function("document.querySelector('[data-testid=info]').textContent.includes('401')")


def test_search_shows_the_query_beside_results_with_paths_labels_and_metadata(page, service):
    _, root, query = service
    with_key(page)
    assert page.is_hidden("#text-form")  # Lite0 reads no words
    page.fill("#k", "4")
    page.set_input_files("#file", str(query))
    page.wait_for_selector("[data-testid=result]")
    assert page.is_visible("#query-image") and page.inner_text("#query-name") == "query.jpg"
    cards = page.locator("[data-testid=result]")
    assert cards.count() == 4
    assert cards.first.locator(".path").inner_text() == "chelsea.jpg"  # relative to its catalog folder
    assert "CAT-0001" in cards.first.get_attribute("title")  # metadata on hover
    page.wait_for_function("document.querySelector('[data-testid=result] img').naturalWidth > 0")
    page.screenshot(path=str(ARTIFACTS / "page-search.png"), full_page=True)

    assert page.is_visible("[data-testid=more]")  # a full page: more can be asked for
    page.click("[data-testid=more]")
    page.wait_for_function("document.querySelectorAll('[data-testid=result]').length === 8")

    page.fill("#label", "trouser")
    page.dispatch_event("#label", "change")
    page.wait_for_function(
        "[...document.querySelectorAll('[data-testid=result] .label')].every((l) => l.textContent === 'trouser')"
    )
    assert cards.count() == 4  # back to the first page, only trousers


def test_an_error_replaces_the_results(page, tmp_path, service):
    _, _, query = service
    with_key(page)
    page.set_input_files("#file", str(query))
    page.wait_for_selector("[data-testid=result]")
    broken = tmp_path / "notes.png"
    broken.write_bytes(b"not an image at all")
    page.set_input_files("#file", str(broken))
    page.wait_for_selector("#status.error")
    assert "422" in page.inner_text("[data-testid=status]")
    assert page.locator("[data-testid=result]").count() == 0  # nothing stale stays on screen
    page.screenshot(path=str(ARTIFACTS / "page-error.png"), full_page=True)


def test_the_duplicates_view_deletes_a_copy_after_confirmation(page, service):
    client, *_ = service
    with_key(page)
    before = client.get("/info").json()["count"]
    page.check("input[value=duplicates]")
    page.click("#duplicates-form button")
    page.wait_for_selector("[data-testid=group]")
    group = page.locator("[data-testid=group]", has=page.locator("[data-testid=member] .path", has_text="chelsea_small.jpg"))
    assert group.locator("[data-testid=representative] .path").inner_text() == "chelsea.jpg"
    page.screenshot(path=str(ARTIFACTS / "page-duplicates.png"), full_page=True)

    copy = group.locator("[data-testid=member]", has=page.locator(".path", has_text="chelsea_copy.jpg"))
    assert copy.locator(".score").inner_text().startswith("identical content")
    assert copy.locator(".copy-of").inner_text() == "same file as chelsea.jpg"
    assert copy.locator("button").count() == 0  # deleting "it" would delete chelsea.jpg's row

    member = group.locator("[data-testid=member]", has=page.locator(".path", has_text="chelsea_small.jpg"))
    assert member.locator(".score").inner_text().startswith("same picture edited")
    assert member.locator(".evidence").inner_text() == "resized to 50%"  # what the pixel check found
    page.once("dialog", lambda dialog: dialog.dismiss())  # cancelled: nothing happens
    member.locator("button").click()
    assert client.get("/info").json()["count"] == before
    page.once("dialog", lambda dialog: dialog.accept())
    member.locator("button").click()
    page.wait_for_function("document.querySelector('[data-testid=status]').textContent.startsWith('deleted')")
    assert member.count() == 0
    assert client.get("/info").json()["count"] == before - 1


def test_the_label_filter_is_a_value_not_an_expression(service):
    client, _, query = service
    files = {"image": ("q.jpg", query.read_bytes(), "image/jpeg")}
    sneaky = client.post("/search", data={"k": "5", "label": 'x" or label != "'}, files=files)
    assert sneaky.status_code == 200 and sneaky.json()["results"] == []
    buffer = io.BytesIO()
    Image.open(query).save(buffer, "PNG")
    bags = client.post("/search", data={"k": "3", "label": "bag"}, files={"image": ("q.png", buffer.getvalue(), "image/png")})
    assert [hit["label"] for hit in bags.json()["results"]] == ["bag"] * 3


def test_an_unknown_answer_is_named_on_the_page_and_recognised_from_then_on(page, service, tmp_path):
    from skimage import data

    client, _, query = service
    with_key(page)
    page.check("input[value=recognize]")
    page.set_input_files("#file", str(query))  # a cat, in a catalog where only clothes are labeled
    page.wait_for_selector("[data-testid=label]")
    assert page.inner_text("[data-testid=label]") == "unknown"
    page.fill("[data-testid=enrol] input", "cat")
    page.screenshot(path=str(ARTIFACTS / "page-unknown-label-box.png"), full_page=True)
    page.click("[data-testid=enrol] button")
    page.wait_for_function("document.querySelector('[data-testid=status]').textContent.startsWith('enrolled query.jpg as cat')")
    assert client.get("/info").json()["self_calibration"]["labels"] == 11  # the enrolment recalibrated "unknown"
    another = tmp_path / "another_cat.jpg"  # another shot of the same cat: mirrored, cropped elsewhere
    cat = Image.fromarray(data.chelsea()).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    cat.crop((0, 30, cat.width - 40, cat.height)).save(another, quality=85)
    page.set_input_files("#file", str(another))
    page.wait_for_function("document.querySelector('[data-testid=label]').textContent === 'cat'")
    assert page.locator("[data-testid=enrol]").count() == 0  # a known answer offers no label box

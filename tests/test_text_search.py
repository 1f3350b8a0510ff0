"""Search by words: `imgsearch search --text` and `POST /search/text` share search.search_text.

No CLIP weights exist offline here, so the plumbing is tested with an open_clip ViT-B-32 whose weights are
EXPLICITLY RANDOM, written by this test: it proves text reaches the text tower and comes back as ranked rows from
the same code path in the CLI and the API, not that the ranking means anything. With real weights available
(IMGSEARCH_TEST_CLIP_WEIGHTS=path to an open_clip ViT-B-32 checkpoint), the last test checks the meaning too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import ARTIFACTS, browser_page, fashion_images, run_cli, serve

pytestmark = pytest.mark.slow

MODEL = "open_clip:ViT-B-32"


@pytest.fixture(scope="module")
def random_clip(tmp_path_factory) -> Path:
    import open_clip
    import torch

    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)  # random weights, on purpose
    path = tmp_path_factory.mktemp("clip") / "vit_b_32_RANDOM_for_plumbing_tests.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def clip_collection(tmp_path_factory, random_clip):
    root = tmp_path_factory.mktemp("text")
    catalog = root / "catalog"
    for image in fashion_images(per_class=1)[:4]:
        (catalog / image.parent.name).mkdir(parents=True, exist_ok=True)
        (catalog / image.parent.name / image.name).write_bytes(image.read_bytes())
    uri = str(root / "text.db")
    common = ["--uri", uri, "--model", MODEL, "--weights", str(random_clip), "--runtime", "torch"]
    run_cli(["ingest", str(catalog), *common], check=True)
    return uri, common


@pytest.fixture(scope="module")
def clip_service(clip_collection, random_clip):
    """The service on the collection (it holds the Lite file until the module ends: CLI calls come first)."""
    from imgsearch.config import load_settings

    uri, _ = clip_collection
    with serve(load_settings(milvus_uri=uri, model=MODEL, weights=random_clip, runtime="torch")) as client:
        yield client


def test_cli_and_api_answer_a_text_query_through_the_same_code(clip_collection, request):
    uri, common = clip_collection
    answer = json.loads(run_cli(["search", "--text", "a red dress", "--text", "a bag", "-k", "3", *common, "--json"], check=True).stdout)
    assert [result["query"] for result in answer] == ["a red dress", "a bag"]
    assert [len(result["results"]) for result in answer] == [3, 3]
    clip_service = request.getfixturevalue("clip_service")  # after the CLI: the service holds the Lite file
    assert clip_service.get("/info").json()["supports_text"] is True
    response = clip_service.post("/search/text", json={"text": "a red dress", "k": 3})
    assert response.status_code == 200
    assert [hit["id"] for hit in response.json()["results"]] == [hit["id"] for hit in answer[0]["results"]]
    scores = [hit["score"] for hit in response.json()["results"]]
    assert scores == pytest.approx([hit["score"] for hit in answer[0]["results"]], abs=1e-4)


@pytest.mark.browser
def test_the_page_offers_a_text_box_for_a_clip_model_and_shows_its_answer(clip_service):
    expected = [hit["id"] for hit in clip_service.post("/search/text", json={"text": "a bag", "k": 12}).json()["results"]]
    with browser_page(str(clip_service.base_url)) as page:
        page.wait_for_selector("#text-form", state="visible")  # shown because /info says the model reads text
        page.fill("#text", "a bag")
        page.click("#text-form button")
        page.wait_for_function("document.querySelector('[data-testid=status]').textContent.includes('a bag')")
        cards = page.locator("[data-testid=result]")
        assert [cards.nth(i).get_attribute("data-id") for i in range(cards.count())] == expected
        assert len(expected) == 4 and page.is_hidden("#query")  # no query image for words
        page.screenshot(path=str(ARTIFACTS / "page-text-search.png"), full_page=True)


def test_image_only_models_refuse_text_in_one_line(tmp_path):
    catalog = tmp_path / "catalog"
    image = fashion_images(per_class=1)[0]
    catalog.mkdir()
    (catalog / image.name).write_bytes(image.read_bytes())
    uri = str(tmp_path / "lite0.db")
    run_cli(["ingest", str(catalog), "--uri", uri], check=True)
    refused = run_cli(["search", "--text", "a red dress", "--uri", uri])
    assert refused.returncode == 2
    assert refused.stderr.strip() == "error: model efficientnet_lite0 has no text encoder; text search needs a CLIP model"
    assert run_cli(["search", "--uri", uri]).returncode == 2  # neither images nor words


@pytest.mark.skipif(
    not os.environ.get("IMGSEARCH_TEST_CLIP_WEIGHTS"),
    reason="no real CLIP weights offline: set IMGSEARCH_TEST_CLIP_WEIGHTS to an open_clip ViT-B-32 checkpoint",
)
def test_real_clip_weights_rank_the_matching_product_first(tmp_path):
    weights = os.environ["IMGSEARCH_TEST_CLIP_WEIGHTS"]
    catalog = tmp_path / "catalog"
    for image in fashion_images(per_class=1):
        (catalog / image.parent.name).mkdir(parents=True, exist_ok=True)
        (catalog / image.parent.name / image.name).write_bytes(image.read_bytes())
    common = ["--uri", str(tmp_path / "real.db"), "--model", MODEL, "--weights", weights]
    run_cli(["ingest", str(catalog), *common], check=True)
    answer = json.loads(run_cli(["search", "--text", "a photo of trousers", "-k", "1", *common, "--json"], check=True).stdout)
    assert answer[0]["results"][0]["label"] == "trouser"

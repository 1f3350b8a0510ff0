"""Search quality on real photos: an image finds itself, edited copies find their original."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from helpers import copy_fashion_catalog
from imgsearch.ingest.pipeline import ingest_catalog
from imgsearch.search import search_paths

pytestmark = pytest.mark.slow  # real weights and Milvus Lite


ORIGINALS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "coins")


@pytest.fixture
def catalog_store(tmp_path, encoder, make_store, photos):
    catalog = tmp_path / "catalog"
    (catalog / "photos").mkdir(parents=True)
    for name in ORIGINALS + ("hubble_deep_field", "immunohistochemistry"):
        photos[name].save(catalog / "photos" / f"{name}.jpg", quality=92)
    copy_fashion_catalog(catalog, 2)  # 20 product-photo distractors
    store = make_store()
    report = ingest_catalog(catalog, encoder, store, workers=0)
    assert report.indexed == 28
    return catalog, store


def test_each_image_finds_itself_first_with_score_one(catalog_store, encoder):
    catalog, store = catalog_store
    results, failed = search_paths(encoder, store, [catalog], k=3)
    assert not failed and len(results) == 28
    for result in results:
        assert result.results[0].path == str(Path(result.query).resolve())
        assert result.results[0].score == pytest.approx(1.0, abs=1e-3)
        assert result.results[0].score >= result.results[1].score >= result.results[2].score


def _edits(image: Image.Image) -> dict[str, Image.Image]:
    width, height = image.size
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=25)
    thumbnail = image.copy()
    thumbnail.thumbnail((96, 96))
    return {
        "crop": image.crop((width // 8, height // 8, width - width // 8, height - height // 8)),
        "mirror": ImageOps.mirror(image),
        "jpeg25": Image.open(io.BytesIO(buffer.getvalue())),
        "thumbnail": thumbnail,
    }


def test_edited_copies_rank_their_original_first(tmp_path, catalog_store, encoder, photos):
    catalog, store = catalog_store
    queries = tmp_path / "queries"
    queries.mkdir()
    for name in ORIGINALS:
        for edit, image in _edits(photos[name]).items():
            image.convert("RGB").save(queries / f"{name}__{edit}.png")
    results, failed = search_paths(encoder, store, [queries], k=5)
    assert not failed and len(results) == len(ORIGINALS) * 4
    misses = [
        (result.query, result.results[0].path)
        for result in results
        if not result.results[0].path.endswith(f"photos/{result.query.split('/')[-1].split('__')[0]}.jpg")
    ]
    assert misses == []


def test_filter_restricts_results(catalog_store, encoder, photos, tmp_path):
    _, store = catalog_store
    query = tmp_path / "q.png"
    photos["chelsea"].save(query)
    results, _ = search_paths(encoder, store, [query], k=5, filter='label == "bag"')
    assert [hit.label for hit in results[0].results] == ["bag", "bag"]


def test_unreadable_query_is_reported_not_fatal(catalog_store, encoder, photos, tmp_path):
    _, store = catalog_store
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    photos["coffee"].save(good)
    bad.write_text("not an image")
    results, failed = search_paths(encoder, store, [good, bad], k=1)
    assert [result.query for result in results] == [str(good)]
    assert failed == [{"path": str(bad), "error": "not a recognised image format"}]

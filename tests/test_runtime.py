"""The ONNX fast path agrees with torch; the pipeline keeps a bounded number of images in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import copy_fashion_catalog, fashion_images
from imgsearch.encoders import load_encoder
from imgsearch.encoders.onnx_runtime import OnnxEncoder, export_onnx
from imgsearch.ingest.pipeline import ingest_catalog

pytestmark = pytest.mark.slow  # real weights



def test_onnx_matches_torch_per_image(encoder, onnx_encoder, photos):
    from PIL import Image

    images = list(photos.values()) + [Image.open(path).convert("RGB") for path in fashion_images(1)]
    batch = torch.stack([encoder.preprocess(image) for image in images])
    reference = encoder.encode(batch)
    fast = onnx_encoder.encode(batch)
    assert fast.shape == reference.shape and fast.dtype == np.float32
    cosines = (reference * fast).sum(axis=1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(fast, axis=1))
    assert cosines.min() >= 0.999, cosines
    assert np.allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-5)
    assert (onnx_encoder.name, onnx_encoder.dim, onnx_encoder.preprocess_version) == (
        encoder.name, encoder.dim, encoder.preprocess_version,
    )


def test_export_is_cached_and_keyed_by_model(encoder, tmp_path):
    first = export_onnx(encoder, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert export_onnx(encoder, tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert first.name.startswith("efficientnet_lite0-") and list(tmp_path.iterdir()) == [first]


def test_runtime_auto_picks_onnx_on_cpu(tmp_path):
    encoder = load_encoder("efficientnet_lite0", device="cpu", runtime="auto", onnx_cache=tmp_path)
    assert isinstance(encoder, OnnxEncoder)


def test_onnx_and_torch_ingest_store_the_same_vectors(tmp_path, encoder, onnx_encoder, make_store):
    copy_fashion_catalog(tmp_path / "catalog", 1)
    torch_store, onnx_store = make_store(collection="by_torch"), make_store(collection="by_onnx")
    ingest_catalog(tmp_path / "catalog", encoder, torch_store, workers=0)
    ingest_catalog(tmp_path / "catalog", onnx_encoder, onnx_store, workers=0)
    torch_rows = {row["id"]: np.asarray(row["vector"]) for row in torch_store.iter_rows(("id", "vector"))}
    onnx_rows = {row["id"]: np.asarray(row["vector"]) for row in onnx_store.iter_rows(("id", "vector"))}
    assert torch_rows.keys() == onnx_rows.keys() and len(torch_rows) == 10
    for key, vector in torch_rows.items():
        assert float(vector @ onnx_rows[key]) >= 0.999


def test_images_in_flight_stay_bounded_as_the_catalog_grows(tmp_path, onnx_encoder, make_store):
    peaks = {}
    for per_class in (1, 6):
        catalog = tmp_path / f"catalog{per_class}"
        copy_fashion_catalog(catalog, per_class)
        report = ingest_catalog(
            catalog, onnx_encoder, make_store(collection=f"size{per_class}"), workers=0, batch_size=2, upsert_chunk=4
        )
        assert report.indexed == 10 * per_class
        assert 0 < report.max_in_flight <= report.in_flight_bound
        peaks[per_class] = report.max_in_flight
    assert report.in_flight_bound < 60  # the bound is below the catalog size, so nothing holds the whole catalog
    assert peaks[6] <= report.in_flight_bound

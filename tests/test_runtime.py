"""The ONNX fast path agrees with torch; the pipeline keeps a bounded number of images in memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import auto_cpu_precision, copy_fashion_catalog, fashion_images, free_port, healthy_client, run_cli
from imgsearch.encoders import load_encoder
from imgsearch.encoders.onnx_runtime import OnnxEncoder
from imgsearch.encoders.preprocessing import ResizeCrop
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


def test_the_export_is_cached_with_its_card_and_reopened_without_the_torch_model(encoder, photos, tmp_path):
    first = load_encoder("efficientnet_lite0", device="cpu", runtime="onnx", onnx_cache=tmp_path)
    files = sorted(path.name for path in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1] == files[0].replace(".json", ".onnx")
    card = json.loads((tmp_path / files[0]).read_text())
    assert (card["name"], card["dim"], card["preprocess_version"]) == (encoder.name, encoder.dim, encoder.preprocess_version)
    assert ResizeCrop.from_dict(card["preprocess"]) == encoder.spec
    stamp = first.model_path.stat().st_mtime_ns
    again = load_encoder("efficientnet_lite0", device="cpu", runtime="onnx", onnx_cache=tmp_path)
    assert again.model_path == first.model_path and again.model_path.stat().st_mtime_ns == stamp
    assert "torch_encoder" not in again.__dict__  # the torch model was never built
    images = [photos["chelsea"], photos["coins"]]
    assert np.allclose(again.encode_images(images), encoder.encode_images(images), atol=2e-3)


def test_another_weights_file_is_another_export(tmp_path):
    from imgsearch.encoders.lite import packaged_weights_path
    from imgsearch.encoders.onnx_runtime import cache_stem

    copy = tmp_path / "lite0.pth"
    copy.write_bytes(packaged_weights_path().read_bytes())
    stems = {cache_stem("efficientnet_lite0", None), cache_stem("efficientnet_lite0", copy)}
    os.utime(copy, ns=(1, 1))  # the same path rewritten: a new stem
    stems.add(cache_stem("efficientnet_lite0", copy))
    assert len(stems) == 3


def test_runtime_auto_picks_int8_for_lite0_on_a_cpu_with_int8_dot_products_and_fp32_otherwise(tmp_path):
    from imgsearch.encoders.lite import packaged_weights_path

    encoder = load_encoder("efficientnet_lite0", device="cpu", runtime="auto", onnx_cache=tmp_path)
    assert isinstance(encoder, OnnxEncoder) and encoder.precision == auto_cpu_precision()
    assert encoder.model_path.name.endswith(".int8.onnx") == (auto_cpu_precision() == "int8")
    assert encoder.built_torch_encoder is None  # exported in a child process: torch's memory went with it
    copy = tmp_path / "lite0.pth"  # weights of the user's own: not measured in int8, so fp32
    copy.write_bytes(packaged_weights_path().read_bytes())
    encoder = load_encoder("efficientnet_lite0", weights=copy, device="cpu", runtime="auto", onnx_cache=tmp_path)
    assert isinstance(encoder, OnnxEncoder) and not encoder.model_path.name.endswith(".int8.onnx")


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


MODEL_CODE = {"torch", "torchvision", "timm", "open_clip"}


def _imported(stderr: str) -> set[str]:
    return {line.split("|")[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_with_a_cached_export_no_command_imports_torch(tmp_path, int8_encoder):
    """The CPU default (runtime auto: onnxruntime, int8 where the CPU has VNNI): once the export is cached, search, recognize, info, ingest and serve
    run on onnxruntime, Pillow and numpy alone."""
    import shutil

    cache = shutil.copytree(int8_encoder.model_path.parent, tmp_path / "onnx")  # the session's export, quantised
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "IMGSEARCH_ONNX_CACHE": str(cache), "IMGSEARCH_MILVUS_URI": str(tmp_path / "cold.db"),
           "CUDA_VISIBLE_DEVICES": ""}
    copy_fashion_catalog(tmp_path / "catalog", 1)
    run_cli(["ingest", str(tmp_path / "catalog")], env_extra=env, check=True)
    query = str(fashion_images(2)[-1])
    copy_fashion_catalog(tmp_path / "more", 3)
    for args in (["search", query, "-k", "3"], ["recognize", query], ["info"], ["ingest", str(tmp_path / "more")]):
        result = run_cli(args, env_extra=env, python_flags=("-X", "importtime"), check=True)
        imported = _imported(result.stderr)
        assert not imported & MODEL_CODE, (args, imported & MODEL_CODE)
        assert ("onnxruntime" in imported) == (args[0] != "info"), args  # info loads no model at all
    assert "indexed 20" in result.stdout  # the ingest really encoded the new photos, in worker processes

    port = free_port()
    log = open(tmp_path / "serve.log", "w")  # a file, not a pipe: import lines alone would fill a pipe and block it
    server = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "imgsearch.cli", "serve", "--port", str(port)],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=log,
    )
    try:
        with healthy_client(port, server) as client:
            with open(query, "rb") as image:
                answer = client.post("/search", data={"k": "2"}, files={"image": ("q.png", image, "image/png")})
            assert answer.status_code == 200 and len(answer.json()["results"]) == 2, answer.text
        # the process that answered re-executed itself with Python's objects in glibc's malloc (the soak's growth)
        assert b"\0PYTHONMALLOC=malloc\0" in b"\0" + (Path("/proc") / str(server.pid) / "environ").read_bytes()
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
        log.close()
    imported = _imported((tmp_path / "serve.log").read_text())
    assert "onnxruntime" in imported and not imported & MODEL_CODE, imported & MODEL_CODE

"""GPU JPEG decoding during ingest, checked on the CPU: the same code runs with torchvision's CPU decoder.

Workers pass baseline colour JPEGs on undecoded (images.device_decodable_jpeg); the encoder's device decodes,
orients, resizes and crops them (encoders/jpeg_decoder.py). Everything else takes the CPU path unchanged.
On a GPU, benchmarks/gpu.py checks nvJPEG's vectors against the CPU path's.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from imgsearch.images import device_decodable_jpeg

ORIENTATION = 0x0112


def jpeg_bytes(image: Image.Image, orientation: int = 1, **options) -> bytes:
    exif = Image.Exif()
    if orientation != 1:
        exif[ORIENTATION] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92, exif=exif, **options)
    return buffer.getvalue()


def test_only_baseline_colour_jpegs_within_the_limit_go_to_the_device(photos):
    photo = photos["chelsea"]
    width, height = photo.size
    assert device_decodable_jpeg(jpeg_bytes(photo)) == (1, width * height)
    assert device_decodable_jpeg(jpeg_bytes(photo, orientation=6)) == (6, width * height)
    png = io.BytesIO()
    photo.save(png, "PNG")
    refused = {
        "progressive": jpeg_bytes(photo, progressive=True),
        "cmyk": jpeg_bytes(photo.convert("CMYK")),
        "greyscale": jpeg_bytes(photo.convert("L")),
        "png": png.getvalue(),
        "garbage": b"\xff\xd8\xff\xe0 not really a jpeg",
        "empty": b"",
    }
    for kind, data in refused.items():
        assert device_decodable_jpeg(data) is None, kind
    assert device_decodable_jpeg(jpeg_bytes(photo), max_pixels=width * height - 1) is None  # the CPU path reports it


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_on_the_device_is_pillows(orientation):
    import torch

    from imgsearch.encoders.jpeg_decoder import orient

    pixels = np.random.default_rng(orientation).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)  # not square
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[ORIENTATION] = orientation
    image.info["exif"] = exif.tobytes()
    expected = np.asarray(ImageOps.exif_transpose(image))
    oriented = orient(torch.from_numpy(pixels).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert np.array_equal(oriented, expected)


def test_decode_calls_are_bounded_by_pixels():
    from imgsearch.encoders.jpeg_decoder import _chunks

    assert _chunks([40, 40, 30, 100, 250, 10], budget=100) == [[0, 1], [2], [3], [4], [5]]
    assert _chunks([], budget=100) == []


@pytest.mark.parametrize("backend", ["lite"])
def test_device_decoding_gives_the_cpu_paths_vectors_and_falls_back_for_the_rest(tmp_path, encoder, make_store, photos, monkeypatch):
    import imgsearch.encoders.jpeg_decoder as jpeg_decoder
    from imgsearch.encoders.jpeg_decoder import DeviceJpegDecoder

    monkeypatch.setattr(jpeg_decoder, "DECODE_PIXELS", 2_000_000)  # several decode calls per batch of 4
    from imgsearch.encoders.torch_encoder import Tensors
    from imgsearch.ingest.pipeline import ingest_catalog

    catalog = tmp_path / "catalog"
    (catalog / "photos").mkdir(parents=True)
    device_jpegs, cpu_files = [], []
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        for orientation in (1, 6, 3):  # as shot, and turned: a vector from the unturned pixels would differ
            (catalog / "photos" / f"{name}_{orientation}.jpg").write_bytes(jpeg_bytes(photos[name], orientation))
            device_jpegs.append(f"{name}_{orientation}.jpg")
    for name, size in {"rocket": (1676, 1257), "camera": (1281, 960)}.items():  # camera-size: the CPU path decodes
        big = photos[name].resize(size, Image.Resampling.BILINEAR)  # these at 1/4 and 1/2 scale (draft mode)
        (catalog / "photos" / f"{name}_big.jpg").write_bytes(jpeg_bytes(big))
        device_jpegs.append(f"{name}_big.jpg")
    for name, data in {
        "camera_progressive.jpg": jpeg_bytes(photos["camera"], progressive=True),
        "coins_cmyk.jpg": jpeg_bytes(photos["coins"].convert("CMYK")),
        "hubble_grey.jpg": jpeg_bytes(photos["hubble_deep_field"].convert("L")),
        "rocket_truncated.jpg": jpeg_bytes(photos["rocket"].rotate(90, expand=True))[:4000],
    }.items():
        (catalog / "photos" / name).write_bytes(data)
        cpu_files.append(name)
    photos["immunohistochemistry"].save(catalog / "photos" / "immunohistochemistry.png")
    cpu_files.append("immunohistochemistry.png")

    plain = make_store(collection="cpu_path")
    report_plain = ingest_catalog(catalog, encoder, plain, workers=2, batch_size=4, hash_cache=tmp_path / "h1.sqlite")
    encoder.transfer_preprocess = Tensors(encoder.spec.uint8)  # what a CUDA encoder sends and decodes
    encoder.jpeg_decoder = DeviceJpegDecoder(encoder.spec, "cpu", encoder.input_size)
    try:
        device = make_store(collection="device_path")
        report = ingest_catalog(catalog, encoder, device, workers=2, batch_size=4, hash_cache=tmp_path / "h2.sqlite")
    finally:
        encoder.transfer_preprocess = encoder.jpeg_decoder = None

    assert report.gpu_decoded == len(device_jpegs) and report_plain.gpu_decoded == 0
    assert report.failed == report_plain.failed  # the truncated JPEG: the CPU path's reason, however it was read
    assert [failure["path"].rsplit("/", 1)[-1] for failure in report.failed] == ["rocket_truncated.jpg"]
    rows_plain = {row["path"].rsplit("/", 1)[-1]: np.asarray(row["vector"]) for row in plain.iter_rows(("path", "vector"))}
    rows = {row["path"].rsplit("/", 1)[-1]: np.asarray(row["vector"]) for row in device.iter_rows(("path", "vector"))}
    assert rows.keys() == rows_plain.keys() == set(device_jpegs + cpu_files) - {"rocket_truncated.jpg"}
    for name in device_jpegs:  # another decoder and resize: close, not equal
        assert float(rows[name] @ rows_plain[name]) >= 0.99, name
    turned = float(rows["chelsea_6.jpg"] @ rows_plain["chelsea_1.jpg"])
    assert turned < 0.99  # so the check above would catch a missing rotation
    for name in set(cpu_files) - {"rocket_truncated.jpg"}:  # the fallback is the CPU path itself
        assert np.allclose(rows[name], rows_plain[name], atol=1e-5), name

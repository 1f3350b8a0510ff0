"""Safe decoding of every image kind a catalog may hold."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from imgsearch.errors import ImageDecodeError
from imgsearch.images import find_images, load_image, to_rgb


def _save(image: Image.Image, path, format: str, **options) -> None:
    image.save(path, format=format, **options)


@pytest.fixture
def cat(photos):
    return photos["chelsea"]


@pytest.mark.parametrize("format,suffix", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp"), ("GIF", "gif"), ("TIFF", "tif")])
def test_common_formats_decode_to_rgb(tmp_path, cat, format, suffix):
    path = tmp_path / f"cat.{suffix}"
    _save(cat, path, format)
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.size == cat.size


def test_format_is_sniffed_not_taken_from_extension(tmp_path, cat):
    path = tmp_path / "really_a_png.jpg"
    _save(cat, path, "PNG")
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(cat))


def test_exif_orientation_is_applied(tmp_path, cat):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; viewers turn it 90 degrees clockwise
    stored = cat.transpose(Image.Transpose.ROTATE_90)
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)
    upright = load_image(path)
    assert upright.size == cat.size
    difference = np.abs(np.asarray(upright, dtype=np.int16) - np.asarray(cat, dtype=np.int16)).mean()
    assert difference < 6  # JPEG noise only; a wrong rotation differs by far more


def test_cmyk_becomes_rgb(tmp_path, cat):
    path = tmp_path / "cmyk.jpg"
    cat.convert("CMYK").save(path, quality=95)
    image = load_image(path)
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image, dtype=np.int16) - np.asarray(cat, dtype=np.int16)).mean() < 12


def test_palette_with_transparency_is_flattened_on_white(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    image.putpixel((0, 0), 1)
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    rgb = load_image(path)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((1, 1)) == (255, 255, 255)  # transparent red -> white background
    assert rgb.getpixel((0, 0)) == (0, 0, 255)


def test_sixteen_bit_grey_keeps_its_contrast(tmp_path):
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (64, 64, 3)
    assert rgb.min() == 0 and rgb.max() == 255  # not clipped to white, not crushed to black


def test_animation_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert load_image(path).getpixel((4, 4)) == (255, 0, 0)


def test_grayscale_and_rgba(tmp_path, cat):
    grey = tmp_path / "grey.png"
    cat.convert("L").save(grey)
    assert load_image(grey).mode == "RGB"
    rgba = cat.convert("RGBA")
    rgba.putalpha(0)
    path = tmp_path / "clear.png"
    rgba.save(path)
    assert load_image(path).getpixel((10, 10)) == (255, 255, 255)


@pytest.mark.parametrize(
    "content,reason",
    [
        (b"", "empty file"),
        (b"just some text, not pixels\n" * 10, "not a recognised image format"),
        (b"\x00\xffgarbage\x13" * 100, "not a recognised image format"),
    ],
)
def test_unreadable_bytes_raise_typed_error(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError) as caught:
        load_image(path)
    assert reason in caught.value.reason
    assert str(path) in str(caught.value)


def test_truncated_jpeg_is_reported(tmp_path, cat):
    buffer = io.BytesIO()
    cat.save(buffer, format="JPEG")
    path = tmp_path / "truncated.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match="truncated"):
        load_image(path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (5000, 5000)).save(path)  # 25 Mpx of zeros compresses to a few KB
    assert path.stat().st_size < 100_000
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        load_image(path, max_pixels=10_000_000)
    assert load_image(path, max_pixels=30_000_000).size == (5000, 5000)


def test_jpeg_draft_mode_reduces_big_photos(tmp_path, cat):
    big = cat.resize((cat.width * 6, cat.height * 6))
    path = tmp_path / "big.jpg"
    big.save(path, quality=90)
    reduced = load_image(path, min_side=224)
    assert min(reduced.size) >= 224
    assert reduced.width < big.width // 2
    assert load_image(path).size == big.size


def test_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found"):
        load_image(tmp_path / "nope.png")


def test_float_mode_is_scaled():
    image = Image.fromarray(np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10), mode="F")
    values = np.asarray(to_rgb(image))
    assert values.max() == 255 and values.min() == 0


def test_find_images_walks_sorted_and_skips_hidden(tmp_path):
    for name in ("b/2.png", "a/1.JPG", ".hidden/3.png", "a/.4.png", "a/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images([tmp_path])]
    assert found == ["a/1.JPG", "b/2.png"]

"""The pixel check `imgsearch duplicates` runs on candidate pairs: real photos and their edits are the same picture,
with the right evidence; different products that look alike are not (fast tier: no model, no Milvus)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from helpers import FASHION_DIR
from imgsearch.verification import ORIENTATIONS, Match, hash_distance, signature, verify


def photo(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def crop(image: Image.Image, keep: float, corner: bool = True) -> Image.Image:
    width, height = image.size
    cut_x, cut_y = int(width * (1 - keep)), int(height * (1 - keep))
    return image.crop((cut_x, cut_y, width, height) if corner else (cut_x // 2, cut_y // 2, width - cut_x // 2, height - cut_y // 2))


TRANSPOSES = {
    Image.Transpose.FLIP_LEFT_RIGHT: "mirrored",
    Image.Transpose.FLIP_TOP_BOTTOM: "flipped upside down",
    Image.Transpose.ROTATE_180: "rotated 180°",
    Image.Transpose.ROTATE_90: "rotated 90° anticlockwise",  # PIL turns anticlockwise
    Image.Transpose.ROTATE_270: "rotated 90° clockwise",
    Image.Transpose.TRANSPOSE: "rotated 90° and mirrored",
    Image.Transpose.TRANSVERSE: "rotated 90° and flipped",
}


@pytest.mark.parametrize("name", ["chelsea", "coffee", "astronaut"])
def test_the_hashes_of_every_flip_and_rotation_follow_from_the_image_s_own(name):
    """The eight orientations are sign changes and a transpose of the DCT signs: no bit differs from the hash of
    the turned image, so flips and rotations cost no extra decode."""
    original = signature(photo(name))
    for transpose, words in TRANSPOSES.items():
        bits, how = hash_distance(original, signature(photo(name).transpose(transpose)))
        assert bits <= 2 and ORIENTATIONS[how] == words, (transpose, bits, ORIENTATIONS[how])


@pytest.mark.parametrize("name", ["chelsea", "coffee", "rocket", "astronaut", "immunohistochemistry"])
def test_edited_copies_of_real_photos_are_the_same_picture_with_their_evidence(name):
    original = photo(name)
    half = (original.width // 2, original.height // 2)
    edits = {
        "re-encoded or retouched": jpeg(original, 30),
        "resized to 50%": jpeg(original.resize(half), 60),
        "mirrored": jpeg(ImageOps.mirror(original), 70),
        "rotated 90° anticlockwise": jpeg(original.transpose(Image.Transpose.ROTATE_90), 85),
        "flipped upside down": ImageOps.flip(original),
        "cropped to 70%": jpeg(crop(original, 0.7), 85),
        "cropped to 90%": crop(original, 0.9, corner=False),
        "mirrored, cropped to 80%": jpeg(ImageOps.mirror(crop(original, 0.8)), 85),
    }
    edits["re-encoded or retouched"] = ImageEnhance.Brightness(edits["re-encoded or retouched"]).enhance(1.15)
    first = signature(original)
    for words, edited in edits.items():
        match = verify(first, signature(edited))
        assert match is not None and match.describe() == words, (name, words, match)


def test_the_evidence_reads_from_either_side():
    original = photo("chelsea")
    turned, cropped = original.transpose(Image.Transpose.ROTATE_90), crop(original, 0.7)
    assert verify(signature(turned), signature(original)).describe() == "rotated 90° clockwise"
    assert verify(signature(original), signature(turned)).describe(reverse=True) == "rotated 90° clockwise"
    assert verify(signature(cropped), signature(original)).describe() == "a wider view (the other is cropped to 70%)"
    small = original.resize((original.width // 2, original.height // 2))
    assert verify(signature(small), signature(original)).describe() == "resized to 200%"
    assert Match((False, False, False), 0.5).describe(reverse=True) == "resized to 200%"


def test_look_alike_products_and_different_photos_are_not_the_same_picture():
    """Two ankle boots (and two trousers) of Fashion-MNIST that the embedding scores above 0.93 are different
    pictures; so are different photos, in any orientation or crop."""
    for kind, first, second in (("ankle_boot", "ankle_boot_027.png", "ankle_boot_023.png"), ("trouser", "trouser_009.png", "trouser_029.png")):
        assert verify(signature(Image.open(FASHION_DIR / kind / first)), signature(Image.open(FASHION_DIR / kind / second))) is None
    names = ["chelsea", "coffee", "rocket", "astronaut", "camera", "coins", "immunohistochemistry", "brick", "grass", "gravel"]
    signatures = {name: signature(photo(name)) for name in names}
    for index, first in enumerate(names):
        for second in names[index + 1:]:
            assert verify(signatures[first], signatures[second]) is None, (first, second)
            assert verify(signatures[first], signature(crop(photo(second), 0.7))) is None, (first, second)


def test_a_crop_of_a_tiny_image_is_not_claimed_and_flat_images_match_nothing():
    """At 28 px a crop cannot be told from a look-alike, so none is claimed; a flat image has no picture to match."""
    boot = Image.open(FASHION_DIR / "ankle_boot" / "ankle_boot_027.png")
    assert verify(signature(boot), signature(crop(boot, 0.8).resize(boot.size))) is None
    assert verify(signature(boot), signature(ImageOps.mirror(boot))).describe() == "mirrored"  # flips need no crop check
    grey, white = Image.new("RGB", (300, 200), (128, 128, 128)), Image.new("RGB", (300, 200), (255, 255, 255))
    assert verify(signature(grey), signature(white)) is None
    assert np.isfinite(signature(grey).thumb).all()

"""Is one image the same picture as another, edited? The pixel check `imgsearch duplicates` runs on each pair
that the embedding calls close, because an embedding says "looks alike", not "is the same picture": two sneakers
of one model score as high as a copy.

Two checks, on small grey versions of both files (docs/duplicates.md measures each):

- **Flips, rotations, re-encoding, resizing, light and colour.** The signs of the 8×8 lowest DCT frequencies of a
  32×32 grey image are a 64-bit perceptual hash. A mirror, flip or 90° rotation of the image permutes those
  coefficients and flips some signs, so the hashes of all eight flips and rotations of an image follow from its own.
  A pair whose hashes agree under one of the eight is then compared pixel by pixel in that orientation: gradient
  correlation, which two different products of one shape (same silhouette, other details) do not reach.
- **Crops (also mirrored).** The smaller view is scaled to a few sizes and slid over the other, 64 px on the long side,
  looking for a window whose grey values correlate almost perfectly. Skipped when either image is smaller than
  CROP_MIN_SIDE: at 28 px a crop cannot be told from a look-alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

HASH_SIDE = 32
HASH_FREQUENCIES = 8  # 8 x 8 = 64 bits
HASH_MAX_BITS = 10  # of 64 that may differ: re-encoded, resized to 0.3 and brightened copies stay within 10
GRADIENT_CORRELATION = 0.93  # the flip/rotation check's pixel test (resized-to-0.3 copies: 0.94 and up)
THUMB_SIDE = 64  # long side of the grey thumbnail the crop check slides
CROP_CORRELATION = 0.93
CROP_MIN_SIDE = 64  # px, the shorter side of both images
CROP_SCALES = tuple(round(1.0 - 0.05 * step, 2) for step in range(9))  # the smaller view is 100% .. 60% of the other
MIN_TEMPLATE = 12  # px: a window smaller than this matches anything

_k = np.arange(HASH_SIDE)
_DCT = np.sqrt(2 / HASH_SIDE) * np.cos(np.pi * (2 * _k[None, :] + 1) * _k[:, None] / (2 * HASH_SIDE))
_DCT[0] /= np.sqrt(2)
_ODD = np.arange(HASH_FREQUENCIES) % 2 == 1
_ODD_ROWS = np.broadcast_to(_ODD[:, None], (HASH_FREQUENCIES,) * 2)  # coefficients whose sign a top-bottom flip changes
_ODD_COLUMNS = np.broadcast_to(_ODD[None, :], (HASH_FREQUENCIES,) * 2)  # ... a left-right mirror changes

# The eight flips and rotations, as (transpose, mirror, flip) applied in that order, and how the evidence names them
# (what was done to the first image to get the second; PIL's ROTATE_90 turns anticlockwise).
ORIENTATIONS = {
    (False, False, False): "",
    (False, True, False): "mirrored",
    (False, False, True): "flipped upside down",
    (False, True, True): "rotated 180°",
    (True, False, True): "rotated 90° anticlockwise",
    (True, True, False): "rotated 90° clockwise",
    (True, False, False): "rotated 90° and mirrored",
    (True, True, True): "rotated 90° and flipped",
}


@dataclass(frozen=True)
class Signature:
    """What the checks need of one image: its size, a 32×32 grey square, its hash bits and a grey thumbnail."""

    width: int
    height: int
    pixels: int  # of the file as stored (the decoded image may be a reduced draft of it)
    square: np.ndarray  # float32, HASH_SIDE², the whole image squashed to a square
    bits: np.ndarray  # bool, 8×8
    thumb: np.ndarray  # float32, long side THUMB_SIDE, aspect kept: what a crop is looked for in
    detail: Image.Image  # grey, long side 2 × THUMB_SIDE: scaled down to each window size the crop check tries


def signature(image: Image.Image, pixels: int | None = None) -> Signature:
    """`pixels`: the stored file's, when `image` was decoded at a reduced size. Each size is made from the image
    itself: made from one another, the hash and the crop check lost a few copies (benchmarks/duplicates.py)."""
    grey = image.convert("L")
    square = np.asarray(grey.resize((HASH_SIDE, HASH_SIDE), Image.BOX), dtype=np.float32)
    bits = (_DCT @ square @ _DCT.T)[:HASH_FREQUENCIES, :HASH_FREQUENCIES] > 0
    thumb = np.asarray(_fit(grey, THUMB_SIDE), dtype=np.float32)
    return Signature(grey.width, grey.height, pixels or grey.width * grey.height, square, bits, thumb, _fit(grey, 2 * THUMB_SIDE))


def _fit(grey: Image.Image, side: int) -> Image.Image:
    scale = side / max(grey.size)
    return grey.resize((max(1, round(grey.width * scale)), max(1, round(grey.height * scale))), Image.BOX) if scale < 1 else grey


def orient(array: np.ndarray, transpose: bool, mirror: bool, flip: bool, odd: tuple = (None, None)) -> np.ndarray:
    """`array` (pixels, or hash bits when `odd` gives the sign masks) transposed, mirrored, flipped in that order."""
    if transpose:
        array = array.T
    if odd[0] is not None:  # on DCT signs a mirror or flip is a sign change of the odd frequencies
        return array ^ (odd[1] if mirror else False) ^ (odd[0] if flip else False)
    if mirror:
        array = array[:, ::-1]
    if flip:
        array = array[::-1]
    return array


def hash_distance(a: Signature, b: Signature) -> tuple[int, tuple[bool, bool, bool]]:
    """The fewest differing hash bits between `b` and any flip or rotation of `a`, and that orientation."""
    return min(
        (int(np.count_nonzero(orient(a.bits, *how, odd=(_ODD_ROWS, _ODD_COLUMNS)) ^ b.bits)), how) for how in ORIENTATIONS
    )


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / norm if norm > 1e-6 else 0.0


def _gradient(square: np.ndarray) -> np.ndarray:
    return np.hypot(np.diff(square, axis=1)[:-1], np.diff(square, axis=0)[:, :-1])


def best_window(image: np.ndarray, template: np.ndarray) -> float:
    """The highest correlation of `template` with any window of `image` of its size (windows that are nearly flat,
    under one grey level of spread, cannot match: they would divide by almost nothing)."""
    height, width = template.shape
    centred = template - template.mean()
    norm = float(np.sqrt((centred * centred).sum()))
    if norm < 1e-3 or height > image.shape[0] or width > image.shape[1]:
        return 0.0
    products = np.einsum("yxhw,hw->yx", sliding_window_view(image, (height, width)), centred)
    sums = np.pad(image.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    squares = np.pad((image * image).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def box(table: np.ndarray) -> np.ndarray:
        return table[height:, width:] - table[:-height, width:] - table[height:, :-width] + table[:-height, :-width]

    count = height * width
    variance = box(squares) - box(sums) ** 2 / count
    spread = np.sqrt(np.maximum(variance, 0.0))
    scores = np.where(spread >= np.sqrt(count), products / np.maximum(spread, 1e-6) / norm, 0.0)
    return float(scores.max())


def _best_crop(larger: Signature, smaller: Signature) -> tuple[float, bool, float]:
    """(correlation, mirrored, scale) of the best window of `larger` showing `smaller`, mirrored or not."""
    image = larger.thumb
    height, width = image.shape
    widest = min(width, height * smaller.width / smaller.height)  # the largest window of the smaller's aspect
    best = (0.0, False, 1.0)
    for scale in CROP_SCALES:
        template_width = round(scale * widest)
        template_height = round(template_width * smaller.height / smaller.width)
        if min(template_width, template_height) < MIN_TEMPLATE or template_height > height or template_width > width:
            continue
        resized = smaller.detail.resize((template_width, template_height), Image.BOX)
        template = np.asarray(resized, dtype=np.float32)
        for mirrored in (False, True):
            score = best_window(image, template[:, ::-1] if mirrored else template)
            if score > best[0]:
                best = (score, mirrored, scale)
    return best


@dataclass(frozen=True)
class Match:
    """How the second image of a verified pair was made from the first."""

    orientation: tuple[bool, bool, bool]  # a key of ORIENTATIONS
    size: float  # the second's linear size over the first's
    crop: float | None = None  # the window's share of the larger view, for a crop
    second_is_crop: bool = True

    def describe(self, reverse: bool = False) -> str:
        """E.g. "mirrored, resized to 50%"; `reverse`: how the first was made from the second."""
        orientation = INVERSE.get(self.orientation, self.orientation) if reverse else self.orientation
        if self.crop is not None:
            cropped = self.second_is_crop != reverse
            crop = f"cropped to {self.crop:.0%}" if cropped else f"a wider view (the other is cropped to {self.crop:.0%})"
            return _describe(ORIENTATIONS[orientation], crop)
        size = 1 / self.size if reverse else self.size
        return _describe(ORIENTATIONS[orientation], f"resized to {size:.0%}" if abs(size - 1) >= 0.05 else "") or "re-encoded or retouched"


INVERSE = {(True, False, True): (True, True, False), (True, True, False): (True, False, True)}  # the two quarter turns


def verify(a: Signature, b: Signature) -> Match | None:
    """How `b` was made from `a` when the pixels say they are the same picture; None when they do not (look-alikes,
    or images too small to tell a crop)."""
    bits, how = hash_distance(a, b)
    size = float(np.sqrt(b.pixels / a.pixels))
    if bits <= HASH_MAX_BITS and correlation(_gradient(orient(a.square, *how)), _gradient(b.square)) >= GRADIENT_CORRELATION:
        return Match(how, size)
    if min(a.width, a.height, b.width, b.height) < CROP_MIN_SIDE:
        return None
    inside_a, inside_b = _best_crop(a, b), _best_crop(b, a)
    score, mirrored, scale = max(inside_a, inside_b)
    if score < CROP_CORRELATION:
        return None
    return Match((False, mirrored, False), size, crop=scale, second_is_crop=inside_a >= inside_b)


def _describe(*parts: str) -> str:
    return ", ".join(part for part in parts if part)

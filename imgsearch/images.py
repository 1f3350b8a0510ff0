"""Safe image loading: every readable file becomes an upright RGB image, everything else one typed error."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from imgsearch.config import DEFAULT_BATCH_SIZE, DEFAULT_MAX_PIXELS
from imgsearch.errors import ImageDecodeError, UsageError
from imgsearch.storage import describe_os_error

try:  # HEIC/HEIF/AVIF when the optional plugin is installed
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - optional dependency
    pass

# Extensions picked up when walking folders; the real format is always sniffed from the content.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)

# The pixel limit is imgsearch's setting (IMGSEARCH_MAX_IMAGE_PIXELS), checked from the header before any pixel
# is decoded; Pillow's own global limit (89 MP) would otherwise refuse images the setting allows, or let
# through images the setting refuses, with its own wording.
Image.MAX_IMAGE_PIXELS = None
# Where an upload's sniffed format decides the suffix of the file the service stores.
FORMAT_SUFFIXES = {
    "JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif",
    "HEIF": ".heic", "AVIF": ".avif", "MPO": ".jpg",
}


def load_image(
    source: str | os.PathLike[str] | bytes | BinaryIO,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int | None = None,
    name: str | None = None,
) -> Image.Image:
    """Decode `source` into an upright RGB image.

    `min_side` lets JPEGs decode at a reduced scale (draft mode) while keeping
    the shorter side at least that long; it is the encoder's input size.
    Raises ImageDecodeError with the reason for anything unreadable.
    """
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "<upload>")
    if isinstance(source, (str, os.PathLike)):
        try:
            handle = open(source, "rb")
        except OSError as error:
            raise ImageDecodeError(label, describe_os_error(error)) from None
        with handle:
            if os.fstat(handle.fileno()).st_size == 0:
                raise ImageDecodeError(label, "empty file")
            return load_image(handle, max_pixels=max_pixels, min_side=min_side, name=label)
    try:
        if isinstance(source, bytes):
            if not source:
                raise ImageDecodeError(label, "empty file")
            return _decode(io.BytesIO(source), max_pixels, min_side, label)
        return _decode(source, max_pixels, min_side, label)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(label, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, MemoryError) as error:
        # Pillow reports truncated or corrupt data with these.
        raise ImageDecodeError(label, f"corrupt or truncated image ({error})") from None


def read_header(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "<upload>") -> tuple[int, str]:
    """(pixels, format) from the header alone, with load_image's checks: lets a caller budget memory before
    decoding. Raises ImageDecodeError for what load_image would refuse up front."""
    if not data:
        raise ImageDecodeError(name, "empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            image_format = image.format or ""
    except UnidentifiedImageError:
        raise ImageDecodeError(name, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError) as error:
        raise ImageDecodeError(name, f"corrupt or truncated image ({error})") from None
    _check_size(width, height, max_pixels, name)
    return width * height, image_format


def device_decodable_jpeg(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int] | None:
    """(EXIF orientation 1-8, pixels) of a baseline, 8-bit, YCbCr-coded colour JPEG within the size limit: what a GPU
    decoder (nvJPEG) takes as it is, the orientation then applied on the GPU. None for everything else (other
    formats, greyscale, CMYK, Adobe-coded or progressive JPEGs, multi-picture files, too many pixels, an unreadable
    header), which load_image decodes on the CPU and reports on, as for any file. Reads the header only."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if (
                image.format != "JPEG" or image.mode != "RGB" or width * height > max_pixels or min(width, height) < 1
                or any(key in image.info for key in ("progressive", "progression", "adobe"))
            ):
                return None
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # whatever Pillow raises for a header it cannot read: the CPU path names the reason
        return None
    return (orientation if orientation in range(1, 9) else 1), width * height  # exif_transpose ignores other values


def _check_size(width: int, height: int, max_pixels: int, name: str) -> None:
    if width < 1 or height < 1:
        raise ImageDecodeError(name, "image has no pixels")
    if width * height > max_pixels:
        raise ImageDecodeError(name, f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")


def draft_request(width: int, height: int, min_side: int | None) -> tuple[int, int] | None:
    """The size to ask a JPEG decoder for when the encoder needs a shorter side of `min_side` (the shorter side
    becomes min_side, the longer in proportion, rounded up), or None when the image is not over twice that."""
    if not min_side or min(width, height) <= 2 * min_side:
        return None
    scale = min(width, height) / min_side
    return math.ceil(width / scale), math.ceil(height / scale)


def _decode(handle: BinaryIO, max_pixels: int, min_side: int | None, label: str) -> Image.Image:
    image = Image.open(handle)
    width, height = image.size
    _check_size(width, height, max_pixels, label)
    if getattr(image, "is_animated", False):
        image.seek(0)  # animations: first frame only
    if image.format == "JPEG" and (requested := draft_request(width, height, min_side)) is not None:
        image.draft(image.mode, requested)  # 1/2, 1/4 or 1/8 scale; Pillow keeps both sides >= the requested size
    image.load()
    image = ImageOps.exif_transpose(image) or image
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is flattened onto white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image)), mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _to_uint8(values: np.ndarray) -> np.ndarray:
    is_float = values.dtype.kind == "f"
    values = values.astype(np.float64)
    if is_float and values.size and values.max() <= 1.0:
        scaled = values * 255.0  # float images in [0, 1]
    elif values.size and values.max() > 255:
        scaled = values / 257.0  # 16-bit range onto 8 bits
    else:
        scaled = values
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def check_paths_exist(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The paths, or one UsageError naming those that do not exist (checked before any model is loaded)."""
    paths = [Path(path) for path in paths]
    missing = [str(path) for path in paths if not os.path.lexists(path)]
    if missing:
        raise UsageError(f"not found: {', '.join(missing)}")
    return paths


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def find_images(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    """Expand files and folders (recursively, sorted, hidden entries skipped) into image paths.

    A file named explicitly is yielded whatever its extension; its content decides.
    """
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for folder, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for filename in sorted(filenames):
                    candidate = Path(folder, filename)
                    if is_image_path(candidate):
                        yield candidate
        else:
            yield path


def decode_in_batches(
    paths: Iterable[str | os.PathLike[str]],
    *,
    min_side: int,
    max_pixels: int,
    failed: list[dict[str, str]],
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Iterator[tuple[list[str], list[Image.Image]]]:
    """Query images under `paths` in batches of (names, images); unreadable ones are appended to `failed`."""
    names: list[str] = []
    images: list[Image.Image] = []
    for path in find_images(paths):
        try:
            images.append(load_image(path, max_pixels=max_pixels, min_side=min_side))
            names.append(str(path))
        except ImageDecodeError as error:
            failed.append({"path": str(path), "error": error.reason})
        if len(images) >= batch_size:
            yield names, images
            names, images = [], []
    if images:
        yield names, images


def file_pixels(path: Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Pixels of the image file at `path` (or in these bytes) from its header (first MiB); max_pixels when that
    cannot tell, so a caller budgeting memory assumes the worst."""
    try:
        if isinstance(path, bytes):
            return read_header(path[: 1 << 20], max_pixels=max_pixels, name="image")[0]
        with open(path, "rb") as handle:
            return read_header(handle.read(1 << 20), max_pixels=max_pixels, name=path.name)[0]
    except (ImageDecodeError, OSError):
        return max_pixels


def thumbnail_jpeg(path: Path | bytes, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """The image at `path` (or in these bytes) scaled to fit size × size, as JPEG bytes."""
    image = load_image(path, max_pixels=max_pixels, min_side=size)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()

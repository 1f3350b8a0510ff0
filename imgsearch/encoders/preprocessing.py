"""Resize, centre-crop and normalise with Pillow and numpy: the preprocessing the ONNX runtime runs without torch.

`ResizeCrop` is Lite0's own preprocessing in both runtimes. For other families it is derived from the library's
transforms (`from_transforms`) only where the two give the same numbers: Pillow-based transforms (timm, open_clip)
and torchvision's bilinear tensor resize, which matches Pillow exactly. torchvision's uint8 *bicubic* tensor resize
differs from Pillow's by up to 2 levels per pixel, so such a model keeps its torch preprocessing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class ResizeCrop:
    """Shorter side to `resize` (Pillow, antialiased; `shrink` filter when making it smaller, `enlarge` when making
    it larger), centre crop `crop`, scale to [0, 1], subtract `mean`, divide by `std`. Picklable: it runs in
    decode worker processes."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    shrink: str = "bicubic"
    enlarge: str = "bicubic"

    def __post_init__(self) -> None:
        if self.shrink not in FILTERS or self.enlarge not in FILTERS:
            raise ValueError(f"unknown resize filter in {self}")

    def resized(self, width: int, height: int) -> tuple[int, int, str] | None:
        """(width, height, filter) the resize makes of an image this size, or None when its shorter side already is
        `resize`. The one geometry of this preprocessing: Pillow here, torch in encoders/jpeg_decoder.py."""
        short, long = (width, height) if width <= height else (height, width)
        if short == self.resize:
            return None
        new_short, new_long = self.resize, int(self.resize * long / short)  # torchvision's rule: truncate, never round
        new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
        return new_width, new_height, self.shrink if short > self.resize else self.enlarge

    def crop_origin(self, width: int, height: int) -> tuple[int, int]:
        """(left, top) of the centre crop of a resized image this size."""
        if width < self.crop or height < self.crop:
            raise ValueError(f"resize {self.resize} is smaller than crop {self.crop}")
        return int(round((width - self.crop) / 2.0)), int(round((height - self.crop) / 2.0))

    def uint8(self, image: Image.Image) -> np.ndarray:
        """The resized and cropped pixels, [3, crop, crop] uint8: what is sent to a GPU, which normalises them."""
        image = image if image.mode == "RGB" else image.convert("RGB")
        if (resized := self.resized(*image.size)) is not None:
            width, height, filter_name = resized
            image = image.resize((width, height), FILTERS[filter_name])
        left, top = self.crop_origin(*image.size)
        pixels = np.asarray(image.crop((left, top, left + self.crop, top + self.crop)), dtype=np.uint8)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def __call__(self, image: Image.Image) -> np.ndarray:
        """[3, crop, crop] float32, normalised: the encoder's input."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        return (self.uint8(image).astype(np.float32) / np.float32(255.0) - mean) / std

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ResizeCrop:
        return cls(
            resize=int(values["resize"]), crop=int(values["crop"]), mean=tuple(map(float, values["mean"])),
            std=tuple(map(float, values["std"])), shrink=values["shrink"], enlarge=values["enlarge"],
        )


def from_transforms(preprocess: Any) -> ResizeCrop | None:
    """The ResizeCrop that computes what a torchvision/timm/open_clip transform pipeline computes, or None when the
    pipeline has another shape or a step Pillow would not reproduce exactly."""
    if isinstance(preprocess, ResizeCrop):
        return preprocess
    kind = type(preprocess).__name__
    if kind == "ImageClassification":  # torchvision weights' transforms: a tensor resize
        mode = _filter_name(preprocess.interpolation)
        if mode != "bilinear" or not getattr(preprocess, "antialias", True):
            return None
        return ResizeCrop(
            resize=_square(preprocess.resize_size), crop=_square(preprocess.crop_size), mean=tuple(preprocess.mean),
            std=tuple(preprocess.std), shrink=mode, enlarge=mode,
        )
    steps = [step for step in getattr(preprocess, "transforms", []) or [] if not _is_rgb_conversion(step)]
    names = [type(step).__name__ for step in steps]
    if names not in (["Resize", "CenterCrop", "ToTensor", "Normalize"], ["Resize", "CenterCrop", "MaybeToTensor", "Normalize"]):
        return None  # v2 tensor pipelines resize in torch, which Pillow does not match for bicubic
    resize, crop, _, normalize = steps
    mode = _filter_name(resize.interpolation)
    side = _shorter_side(resize.size)
    if mode is None or side is None or resize.max_size is not None:
        return None
    return ResizeCrop(
        resize=side, crop=_square(crop.size), mean=tuple(float(v) for v in normalize.mean),
        std=tuple(float(v) for v in normalize.std), shrink=mode, enlarge=mode,
    )


def _filter_name(interpolation: Any) -> str | None:
    name = str(getattr(interpolation, "value", interpolation)).lower()
    return name if name in FILTERS else None


def _shorter_side(size: Any) -> int | None:
    """A Resize size that means "shorter side to N" (an int or [N]); None for a fixed (height, width)."""
    if isinstance(size, int):
        return size
    if isinstance(size, (list, tuple)) and len(size) == 1:
        return int(size[0])
    return None


def _square(size: Any) -> int:
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        return int(size[0])
    side = _shorter_side(size)
    if side is None:
        raise ValueError(f"unsupported size {size!r}")
    return side


def _is_rgb_conversion(step: Any) -> bool:
    """open_clip's RGB conversion (`MaybeConvertMode`, or `_convert_to_rgb` in older versions): ResizeCrop converts
    to RGB itself, and load_image already yields RGB."""
    if type(step).__name__ == "MaybeConvertMode":
        return getattr(step, "mode", None) == "RGB"
    return getattr(step, "__name__", "") == "_convert_to_rgb"

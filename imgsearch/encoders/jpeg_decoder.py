"""JPEG decoding on the encoder's device: nvJPEG through torchvision on CUDA, then the ResizeCrop steps in torch.

Decode workers only read and hash a baseline JPEG and pass its bytes on (images.device_decodable_jpeg); this turns
a batch of them into the uint8 [N, 3, crop, crop] input the encoder normalises. The CPU path decodes a large JPEG at
1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, Pillow's draft mode); nvJPEG decodes at full size, so the same
reduction is made here by averaging s x s blocks before the antialiased resize: on 48 camera-size JPEGs (libjpeg on
the CPU), Lite0 vectors had min cosine 0.986 to the CPU path's without that step and 0.998 with it (docs/gpu.md).
On the CPU the same code runs with libjpeg, which is how the tests check it without a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from imgsearch.encoders.preprocessing import ResizeCrop
from imgsearch.images import draft_request

DECODE_PIXELS = 256_000_000  # decoded pixels per decode call, 768 MB on the device (about 21 camera-size photos)


class DeviceJpegDecoder:
    def __init__(self, spec: ResizeCrop, device: torch.device | str, min_side: int | None = None) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.min_side = min_side  # the encoder's input size: as load_image's, it decides the draft scale

    def decode(
        self, jpegs: list[torch.Tensor], orientations: list[int], pixels: list[int]
    ) -> tuple[torch.Tensor | None, list[int]]:
        """(uint8 [n, 3, crop, crop] on the device for the JPEGs that decoded, in order; the indices of those that did
        not, which the caller decodes on the CPU). `jpegs`: 1-d uint8 CPU tensors of file bytes; `pixels`: their
        sizes from the header, which bound the device memory one decode call takes (DECODE_PIXELS)."""
        images: list[torch.Tensor] = []
        failed: list[int] = []
        for chunk in _chunks(pixels, DECODE_PIXELS):
            for index, decoded in zip(chunk, self._decode_chunk([jpegs[i] for i in chunk])):
                try:
                    if decoded is None:
                        raise RuntimeError("not decoded")
                    images.append(self.resize_crop(orient(self.draft(decoded), orientations[index])))
                except RuntimeError:  # refused, or out of device memory for this one: the CPU decodes it
                    failed.append(index)
                del decoded
        return (torch.stack(images) if images else None), failed

    def _decode_chunk(self, jpegs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """A batched decode; when it refuses the batch (one corrupt file fails them all), each file alone."""
        try:
            return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            decoded: list[torch.Tensor | None] = []
            for data in jpegs:
                try:
                    decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    decoded.append(None)
            return decoded

    def draft(self, image: torch.Tensor) -> torch.Tensor:
        """What Pillow's draft mode does to a JPEG load_image decodes for `min_side`: the largest of 1/8, 1/4, 1/2
        that keeps the shorter side >= min_side (sides rounded up), here by averaging blocks of the full decode."""
        height, width = image.shape[-2:]
        requested = draft_request(width, height, self.min_side)
        if requested is None:
            return image
        most = min(width // requested[0], height // requested[1])  # Pillow's JPEG draft: the largest factor that fits
        factor = next(factor for factor in (8, 4, 2, 1) if most >= factor)
        if factor == 1:
            return image
        pooled = F.avg_pool2d(image[None].float(), factor, factor, ceil_mode=True)[0]
        return pooled.round_().clamp_(0, 255).to(torch.uint8)

    def resize_crop(self, image: torch.Tensor) -> torch.Tensor:
        """ResizeCrop.uint8 on a [3, H, W] uint8 tensor: shorter side to `resize` (antialiased, the longer side
        truncated as torchvision does), centre crop, uint8."""
        height, width = image.shape[-2:]
        if (resized := self.spec.resized(width, height)) is not None:
            width, height, mode = resized
            scaled = F.interpolate(image[None].float(), size=(height, width), mode=mode, antialias=True, align_corners=False)
            image = scaled[0].round_().clamp_(0, 255).to(torch.uint8)
        left, top = self.spec.crop_origin(width, height)
        crop = self.spec.crop
        return image[:, top : top + crop, left : left + crop]


def _chunks(pixels: list[int], budget: int) -> list[list[int]]:
    """Consecutive indices in groups whose pixels stay within `budget` (a larger image goes alone)."""
    chunks: list[list[int]] = []
    total = budget + 1
    for index, count in enumerate(pixels):
        if total + count > budget:
            chunks.append([])
            total = 0
        chunks[-1].append(index)
        total += count
    return chunks


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1-8) to a [C, H, W] tensor, as Pillow's ImageOps.exif_transpose does."""
    if orientation == 2:
        return image.flip(-1)  # mirrored
    if orientation == 3:
        return image.flip(-2, -1)  # upside down
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(-2, -1))  # shot with the camera turned right: turn it back
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(image, 1, dims=(-2, -1))
    return image


def nvjpeg_available(device: torch.device) -> bool:
    """Whether torchvision can decode JPEGs on `device` (a CUDA build with nvJPEG); tried on a tiny JPEG."""
    if device.type != "cuda":
        return False
    tiny = encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8))  # on the CPU
    try:
        decode_jpeg(tiny, mode=ImageReadMode.RGB, device=device)
        return True
    except (RuntimeError, NotImplementedError):
        return False


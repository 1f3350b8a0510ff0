"""The encoder protocol, free of torch: PIL image -> array (in workers), stacked batch -> L2-normalised vectors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from imgsearch.errors import TextNotSupportedError

Preprocess = Callable[[Image.Image], Any]  # an array, or a tensor for torch encoders


class Encoder(ABC):
    """What the rest of imgsearch knows about a model."""

    name: str
    dim: int
    input_size: int  # shorter side the model wants; lets JPEG decoding use draft mode
    preprocess_version: str  # stored with the collection; changes when preprocessing changes
    preprocess: Preprocess  # picklable: it runs in decode worker processes
    device_type: str = "cpu"  # "cuda" when batches run on a GPU
    supports_text: bool = False
    precision: str = "fp32"  # "int8" for the quantised ONNX runtime; recorded with a collection it creates
    weights_id: str = ""  # "" for the model's own weights; an adapted embedding's id (adapted.py): the model guard compares it
    tensor_batches: bool = False  # preprocess returns torch tensors: ingest reads with torch's DataLoader
    pin_memory: bool = False  # DataLoader pins batches for fast host-to-GPU copies
    # What decode workers run when it differs from `preprocess`: on CUDA, uint8 images (a quarter of the bytes
    # through shared memory, pinning and PCIe), scaled and normalised on the GPU by encode().
    transfer_preprocess: Preprocess | None = None
    # On CUDA, decodes baseline JPEGs' bytes on the GPU into transfer_preprocess's output (encoders/jpeg_decoder.py).
    jpeg_decoder: Any = None

    @abstractmethod
    def encode(self, batch: Any) -> np.ndarray:
        """Encode a preprocessed batch [N, 3, H, W] into float32 [N, dim], each row of unit length."""

    def stack(self, items: Sequence[Any]) -> Any:
        """Preprocessed images -> one batch for encode()."""
        return np.stack(items)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.encode(self.stack([self.preprocess(image) for image in images]))

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        raise TextNotSupportedError(f"model {self.name} has no text encoder; text search needs a CLIP model")

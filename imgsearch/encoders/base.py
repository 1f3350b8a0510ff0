"""The encoder protocol: PIL image -> tensor (in workers), tensor batch -> L2-normalised float32 vectors."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from imgsearch.errors import InvalidWeightsError, TextNotSupportedError

Preprocess = Callable[[Image.Image], torch.Tensor]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Encoder(ABC):
    """What the rest of imgsearch knows about a model."""

    name: str
    dim: int
    input_size: int  # shorter side the model wants; lets JPEG decoding use draft mode
    preprocess_version: str  # stored with the collection; changes when preprocessing changes
    preprocess: Preprocess  # picklable: it runs in DataLoader worker processes
    device: torch.device
    supports_text: bool = False
    pin_memory: bool = False  # DataLoader pins batches for fast host-to-GPU copies

    @abstractmethod
    def encode(self, batch: torch.Tensor) -> np.ndarray:
        """Encode a preprocessed batch [N, 3, H, W] into float32 [N, dim], each row of unit length."""

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.encode(torch.stack([self.preprocess(image) for image in images]))

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        raise TextNotSupportedError(f"model {self.name} has no text encoder; text search needs a CLIP model")


class TorchEncoder(Encoder):
    """An nn.Module whose forward returns pooled features."""

    def __init__(
        self,
        *,
        name: str,
        module: torch.nn.Module,
        preprocess: Preprocess,
        dim: int,
        input_size: int,
        preprocess_version: str,
        device: str | torch.device = "auto",
        channels_last: bool = True,
        weights_path: Path | None = None,
    ) -> None:
        self.name = name
        self.weights_path = weights_path  # keys the ONNX export cache
        self.dim = dim
        self.input_size = input_size
        self.preprocess_version = preprocess_version
        self.preprocess = preprocess
        self.device = resolve_device(str(device))
        self.channels_last = channels_last
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.module = module.eval().to(self.device, memory_format=memory_format)
        self.pin_memory = self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 (or fp16) autocast on CUDA; a no-op on the CPU."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def forward_features(self, batch: torch.Tensor) -> torch.Tensor:
        return self.module(batch)

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Features flattened and L2-normalised: what encode() returns and what the ONNX export computes."""
        return F.normalize(self.forward_features(batch).float().flatten(1), dim=-1)

    def encode(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), self.autocast():
            batch = batch.to(self.device, non_blocking=True)
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            features = self.embed(batch)
        return features.cpu().numpy()


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors or torch checkpoint and unwrap the common {'state_dict': ...} shapes."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InvalidWeightsError(f"cannot read weights file {path}: {error}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise InvalidWeightsError(f"weights file {path} holds no state dict")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, model_name: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[0]
        raise InvalidWeightsError(f"weights {source} do not fit model {model_name}: {first_line}") from None


def is_convnet(module: torch.nn.Module) -> bool:
    """channels_last helps networks made of convolutions, not transformers with one patch conv."""
    return sum(isinstance(layer, torch.nn.Conv2d) for layer in module.modules()) > 2

"""Encoder registry: a model name picks its family and builder."""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from imgsearch.config import RUNTIMES
from imgsearch.encoders.base import Encoder
from imgsearch.errors import UnknownModelError, UnsupportedRuntimeError

if TYPE_CHECKING:  # torch is imported only when a torch encoder is built
    from imgsearch.encoders.torch_encoder import TorchEncoder

__all__ = [
    "Encoder", "load_encoder", "load_torch_encoder", "encoder_from_settings", "canonical_model_name", "describe_families",
]

TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"
# Models whose int8 quantisation `auto` picks on a CPU, with their packaged weights: measured within 0.5 points of
# fp32 recognition accuracy at over 1.5x its speed (docs/benchmarks.md). Others run fp32 unless asked.
INT8_BY_DEFAULT = frozenset({"efficientnet_lite0"})


def load_encoder(
    name: str,
    *,
    weights: Path | str | None = None,
    device: str = "auto",
    runtime: str = "torch",
    onnx_cache: Path | None = None,
    cuda_graphs: bool = True,
    gpu_decode: bool = False,
    auto_int8: bool | None = None,
) -> Encoder:
    """The encoder `name`, run by `runtime`: torch, onnx (onnxruntime on the CPU), onnx-int8 (the ONNX export quantised
    to int8, on the CPU), or auto (torch on CUDA; on a CPU onnx-int8 for the INT8_BY_DEFAULT models where the CPU has
    int8 dot-product instructions, onnx otherwise: the fastest as measured by benchmarks/ingest.py and
    benchmarks/int8.py). The ONNX runtimes with a cached export import no torch. `auto_int8` is the precision a
    collection was filled with: False keeps auto at fp32, True at int8, None (a new collection) lets the CPU decide."""
    if runtime not in RUNTIMES:
        raise UnsupportedRuntimeError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    weights = Path(weights) if weights else None
    encoder = _load_encoder(name, weights, device, runtime, onnx_cache, cuda_graphs, gpu_decode, auto_int8)
    encoder.weights_id = weights_id(weights)
    return encoder


def weights_id(weights: Path | None) -> str:
    """What a collection records for `weights`: an adapted embedding's id, else "" (the model's own weights, or a
    checkpoint of its architecture given with --weights, as before adapted embeddings existed). Reads no tensors."""
    from imgsearch.encoders.adapted import is_adapted, read_card

    return read_card(weights).weights_id if is_adapted(weights) else ""


def _load_encoder(
    name: str, weights: Path | None, device: str, runtime: str, onnx_cache: Path | None, cuda_graphs: bool, gpu_decode: bool,
    auto_int8: bool | None,
) -> Encoder:
    if runtime in ("onnx", "onnx-int8") or (runtime == "auto" and not _on_cuda(device)):
        if runtime != "auto" and _on_cuda(device):
            raise UnsupportedRuntimeError(f"--runtime {runtime} runs on the CPU; use --device cpu, or --runtime torch on CUDA")
        int8 = runtime == "onnx-int8" or (runtime == "auto" and name in INT8_BY_DEFAULT and weights is None and _int8_for(auto_int8))
        load_torch = partial(load_torch_encoder, name, weights=weights, device="cpu")
        if int8:
            from imgsearch.encoders.int8 import int8_encoder

            return int8_encoder(name, weights, onnx_cache, load_torch, in_child=True)
        from imgsearch.encoders.onnx_runtime import onnx_encoder

        return onnx_encoder(name, weights, onnx_cache, load_torch, in_child=True)
    encoder = load_torch_encoder(name, weights=weights, device=device)
    encoder.cuda_graphs = cuda_graphs
    if gpu_decode:
        encoder.jpeg_decoder = device_jpeg_decoder(encoder)
    return encoder


def device_jpeg_decoder(encoder: TorchEncoder):
    """A DeviceJpegDecoder for a CUDA encoder whose preprocessing is a plain ResizeCrop on uint8 pixels (what the
    decoder reproduces) where torchvision has nvJPEG; None otherwise: the CPU workers decode everything."""
    from imgsearch.encoders.jpeg_decoder import DeviceJpegDecoder, nvjpeg_available
    from imgsearch.encoders.preprocessing import ResizeCrop

    if encoder.transfer_preprocess is None or not isinstance(encoder.spec, ResizeCrop) or not nvjpeg_available(encoder.device):
        return None
    return DeviceJpegDecoder(encoder.spec, encoder.device, encoder.input_size)


def _int8_for(collection_int8: bool | None) -> bool:
    if collection_int8 is not None:
        return collection_int8
    from imgsearch.encoders.int8 import cpu_has_int8_dot_product

    return cpu_has_int8_dot_product()


def _on_cuda(device: str) -> bool:
    """Whether `device` means a GPU. For "auto", torch is asked only where an NVIDIA driver could be present."""
    if device != "auto":
        return device.startswith("cuda")
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    if sys.platform.startswith("linux") and not any(
        os.path.exists(path) for path in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/dxg")
    ):
        return False
    if sys.platform == "darwin":
        return False
    import torch

    return torch.cuda.is_available()


def encoder_from_settings(settings, *, auto_int8: bool | None = None) -> Encoder:
    """The encoder the settings name: the one way the CLI and the API load it."""
    return load_encoder(
        settings.model, weights=settings.weights, device=settings.device, runtime=settings.runtime,
        onnx_cache=settings.onnx_cache, cuda_graphs=settings.cuda_graphs, gpu_decode=settings.gpu_decode, auto_int8=auto_int8,
    )


def load_torch_encoder(name: str, *, weights: Path | str | None = None, device: str = "auto") -> TorchEncoder:
    """Build the encoder called `name` with real weights, or raise a clear error; never random weights.

    The encoder's `name` is canonical (`torchvision:resnet50`, `timm:convnext_tiny`) and is what
    collections record. Order for a bare name: efficientnet_lite0/1/2, then torchvision, then timm. Prefixes
    `torchvision:`, `timm:` and `open_clip:` (or an `ARCH/TAG` name) force a family.
    """
    weights = Path(weights) if weights else None
    from imgsearch.encoders import lite, open_clip_family, timm_family, torchvision_family

    if name in lite.MODELS:
        return lite.build_lite(name, weights, device)
    if open_clip_family.is_open_clip_name(name):
        return open_clip_family.build_open_clip(name, weights, device)
    if name.startswith(TORCHVISION_PREFIX):
        return torchvision_family.build_torchvision(name.removeprefix(TORCHVISION_PREFIX), weights, device)
    if name.startswith(TIMM_PREFIX):
        bare = name.removeprefix(TIMM_PREFIX)
        if not timm_family.is_timm_model(bare):
            raise UnknownModelError(f"timm has no model {bare!r}")
        return timm_family.build_timm(bare, weights, device)
    if torchvision_family.is_torchvision_model(name):
        return torchvision_family.build_torchvision(name, weights, device)
    if timm_family.is_timm_model(name):
        return timm_family.build_timm(name, weights, device)
    raise UnknownModelError(f"unknown model {name!r}; {describe_families()}")


def canonical_model_name(name: str) -> str:
    """The name a collection records for `name` (what load_torch_encoder would build), without loading weights:
    a bare torchvision or timm name gains its family prefix."""
    from imgsearch.encoders import lite, open_clip_family, timm_family, torchvision_family

    if name in lite.MODELS or open_clip_family.is_open_clip_name(name) or name.startswith((TORCHVISION_PREFIX, TIMM_PREFIX)):
        return name
    if torchvision_family.is_torchvision_model(name):
        return TORCHVISION_PREFIX + name
    if timm_family.is_timm_model(name):
        return TIMM_PREFIX + name
    return name


def describe_families() -> str:
    return (
        "known families: efficientnet_lite0 (offline default), efficientnet_lite1 and efficientnet_lite2 (offline); torchvision names (resnet50, vgg16, "
        "efficientnet_b0, ...); any timm name (or timm:NAME); open_clip ARCH/TAG (e.g. ViT-B-32/laion2b_s34b_b79k)"
    )

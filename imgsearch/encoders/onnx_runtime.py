"""CPU fast path: the same encoder exported to ONNX and run by onnxruntime.

The ONNX graph computes exactly the torch encoder's features (checked in tests: cosine >= 0.999),
so it shares the torch encoder's name, dim and preprocessing, and the same collection.
The export is cached next to the weights (or in the user cache when that folder is read-only),
keyed by model, preprocessing, weights content, torch version and opset.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from imgsearch.encoders.base import Encoder, TorchEncoder
from imgsearch.errors import ImgsearchError

log = logging.getLogger(__name__)

OPSET = 17
EXPORT_VERSION = "1"


class OnnxExportError(ImgsearchError):
    """The model could not be exported to ONNX; use --runtime torch."""


class _Embed(torch.nn.Module):
    """What gets exported: the torch encoder's own embed()."""

    def __init__(self, encoder: TorchEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.module = encoder.module  # registered, so the exporter sees the weights

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.embed(images)


def default_cache_dir(weights_path: Path | None) -> Path:
    if weights_path is not None and os.access(weights_path.parent, os.W_OK):
        return weights_path.parent
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imgsearch" / "onnx"


def cache_key(encoder: TorchEncoder) -> str:
    digest = hashlib.sha256()
    for part in (encoder.name, encoder.preprocess_version, torch.__version__, str(OPSET), EXPORT_VERSION):
        digest.update(part.encode() + b"\0")
    if encoder.weights_path is not None and encoder.weights_path.is_file():
        with open(encoder.weights_path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    else:  # weights from a library cache: hash the tensors themselves
        for name, tensor in encoder.module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    safe_name = "".join(c if c.isalnum() else "_" for c in encoder.name)
    return f"{safe_name}-{digest.hexdigest()[:16]}.onnx"


def export_onnx(encoder: TorchEncoder, cache_dir: Path | None = None) -> Path:
    """Export once; later calls find the cached file."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir(encoder.weights_path)
    path = folder / cache_key(encoder)
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, encoder.input_size, encoder.input_size)
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    log.info("exporting %s to ONNX at %s", encoder.name, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter warns about its own deprecation
            torch.onnx.export(
                _Embed(encoder).eval().cpu(),
                (example,),
                str(temporary),
                input_names=["images"],
                output_names=["features"],
                dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
    except Exception as error:
        temporary.unlink(missing_ok=True)
        raise OnnxExportError(f"cannot export {encoder.name} to ONNX ({type(error).__name__}); use --runtime torch") from None
    os.replace(temporary, path)  # atomic: a concurrent run never sees half a file
    return path


class OnnxEncoder(Encoder):
    def __init__(self, torch_encoder: TorchEncoder, model_path: Path) -> None:
        import onnxruntime

        self.torch_encoder = torch_encoder
        self.name = torch_encoder.name
        self.dim = torch_encoder.dim
        self.input_size = torch_encoder.input_size
        self.preprocess_version = torch_encoder.preprocess_version
        self.preprocess = torch_encoder.preprocess
        self.device = torch.device("cpu")
        self.supports_text = torch_encoder.supports_text
        self.model_path = model_path
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])

    def encode(self, batch: torch.Tensor) -> np.ndarray:
        images = np.ascontiguousarray(batch.numpy(), dtype=np.float32)
        return self.session.run(["features"], {"images": images})[0].astype(np.float32, copy=False)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        return self.torch_encoder.encode_text(texts)  # text towers stay in torch


def to_onnx(encoder: TorchEncoder, cache_dir: Path | None = None) -> OnnxEncoder:
    return OnnxEncoder(encoder, export_onnx(encoder, cache_dir))

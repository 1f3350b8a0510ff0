"""Encoders that run a torch nn.Module: PIL image -> tensor (in workers), tensor batch -> unit float32 vectors."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T1
from torchvision.transforms import v2 as T2

from imgsearch.encoders.base import Encoder
from imgsearch.encoders.preprocessing import ResizeCrop, from_transforms
from imgsearch.errors import InvalidWeightsError

Preprocess = Callable[[Image.Image], torch.Tensor]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Tensors:
    """A numpy preprocessing step, its output as a tensor (the same numbers). Picklable, for worker processes."""

    def __init__(self, step: Callable[[Image.Image], np.ndarray]) -> None:
        self.step = step

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(self.step(image))


class TorchEncoder(Encoder):
    """An nn.Module whose forward returns pooled features."""

    tensor_batches = True

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
    ) -> None:
        self.name = name
        self.dim = dim
        self.input_size = input_size
        self.preprocess_version = preprocess_version
        # the same preprocessing without torch, for the ONNX runtime; None where it cannot be reproduced exactly
        self.spec = from_transforms(preprocess)
        self.preprocess = Tensors(preprocess) if isinstance(preprocess, ResizeCrop) else preprocess
        self.device = resolve_device(str(device))
        self.channels_last = channels_last
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.module = module.eval().to(self.device, memory_format=memory_format)
        self.pin_memory = self.device.type == "cuda"
        self._graphs: dict = {}  # (shape, dtype) -> (CUDAGraph, static input, static output)
        split = split_normalization(preprocess)
        self.mean = self.std = None
        if split is not None:
            uint8_preprocess, mean, std = split
            self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
            self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
            if self.device.type == "cuda":
                self.transfer_preprocess = uint8_preprocess

    cuda_graphs: bool = True  # on CUDA, replay full batches as one captured graph
    GRAPH_MIN_BATCH = 64  # smaller batches (queries, a catalog's last batch) run eagerly
    MAX_GRAPHS = 4

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 (or fp16) autocast on CUDA; a no-op on the CPU."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # no autocast weight cache: a CUDA graph must not capture casts cached outside it
        return torch.autocast("cuda", dtype=dtype, cache_enabled=False)

    def forward_features(self, batch: torch.Tensor) -> torch.Tensor:
        return self.module(batch)

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Features flattened and L2-normalised: what encode() returns and what the ONNX export computes."""
        return F.normalize(self.forward_features(batch).float().flatten(1), dim=-1)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Device-resident batch (float, or uint8 from `transfer_preprocess`) -> unit vectors on the device."""
        with torch.inference_mode(), self.autocast():
            if batch.dtype == torch.uint8:
                if self.mean is None:
                    raise TypeError(f"{self.name} takes preprocessed float batches, not uint8")
                batch = (batch.float().div_(255.0) - self.mean) / self.std
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            return self.embed(batch)

    @property
    def device_type(self) -> str:
        return self.device.type

    def stack(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(items))

    def encode(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """`batch` is preprocessed float, or uint8 from `transfer_preprocess` (scaled and normalised here)."""
        batch = torch.as_tensor(batch)
        if self._use_graph(batch):
            return self._replay(batch)
        return self._forward(batch.to(self.device, non_blocking=True)).cpu().numpy()

    # --- CUDA graphs: a Lite0 forward is hundreds of kernel launches, each needing the GIL, which Milvus Lite's
    # in-process writes hold for milliseconds at a time; a captured graph is one launch per batch.
    def _use_graph(self, batch: torch.Tensor) -> bool:
        return self.cuda_graphs and self.device.type == "cuda" and len(batch) >= self.GRAPH_MIN_BATCH

    def _replay(self, batch: torch.Tensor) -> np.ndarray:
        key = (tuple(batch.shape), batch.dtype)
        if key not in self._graphs:
            if len(self._graphs) >= self.MAX_GRAPHS:
                return self._forward(batch.to(self.device, non_blocking=True)).cpu().numpy()
            self._graphs[key] = self._capture(batch)
        graph, static_input, static_output = self._graphs[key]
        static_input.copy_(batch, non_blocking=True)
        graph.replay()
        return static_output.cpu().numpy()

    def _capture(self, batch: torch.Tensor):
        static_input = torch.empty(batch.shape, dtype=batch.dtype, device=self.device)
        static_input.copy_(batch)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up runs pick kernels and allocate outside the capture
                self._forward(static_input)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_output = self._forward(static_input)
        return graph, static_input, static_output


def split_normalization(preprocess: Preprocess) -> tuple[Preprocess, tuple, tuple] | None:
    """(the steps before scaling, mean, std) when `preprocess` ends by scaling uint8 to [0, 1] and normalising;
    None for any other shape, which then runs whole on the CPU."""
    if isinstance(preprocess, Tensors):
        preprocess = preprocess.step
    if isinstance(preprocess, ResizeCrop):
        return Tensors(preprocess.uint8), preprocess.mean, preprocess.std
    steps = list(getattr(preprocess, "transforms", []) or [])
    if len(steps) < 3 or type(steps[-1]).__name__ != "Normalize":
        return None
    scale, normalize = steps[-2], steps[-1]
    if isinstance(scale, T2.ToDtype) and getattr(scale, "scale", False):
        head = T2.Compose(steps[:-2])  # ends in a uint8 image tensor
    elif type(scale).__name__ in ("ToTensor", "MaybeToTensor"):  # torchvision v1 (open_clip)
        head = T1.Compose([*steps[:-2], T1.PILToTensor()])
    else:
        return None
    return head, tuple(float(v) for v in normalize.mean), tuple(float(v) for v in normalize.std)


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


def backbone_stages(backbone: torch.nn.Module) -> list[torch.nn.Module]:
    """The backbone's stages in order. timm CNNs: the stem, each of `blocks`, then the layers after them
    (conv_head, bn2) as one stage; other models: their children."""
    children = list(backbone.children())
    blocks = getattr(backbone, "blocks", None)
    if isinstance(blocks, torch.nn.Sequential) and blocks in children:
        index = children.index(blocks)
        return [torch.nn.ModuleList(children[:index]), *blocks, torch.nn.ModuleList(children[index + 1 :])]
    return children

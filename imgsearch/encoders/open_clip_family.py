"""open_clip models: image and text towers in one embedding space.

Names are `ARCH/PRETRAINED_TAG` (e.g. `ViT-B-32/laion2b_s34b_b79k`) or `open_clip:ARCH` with --weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imgsearch.encoders.torch_encoder import TorchEncoder
from imgsearch.errors import UnknownModelError, WeightsNotFoundError

PREFIX = "open_clip:"


def is_open_clip_name(name: str) -> bool:
    return name.startswith(PREFIX) or "/" in name


def split_name(name: str) -> tuple[str, str | None]:
    arch, _, tag = name.removeprefix(PREFIX).partition("/")
    return arch, (tag or None)


class OpenClipEncoder(TorchEncoder):
    supports_text = True

    def __init__(self, *, clip_model: torch.nn.Module, tokenizer, **kwargs) -> None:
        super().__init__(module=clip_model, **kwargs)
        self.tokenizer = tokenizer

    def forward_features(self, batch: torch.Tensor) -> torch.Tensor:
        return self.module.encode_image(batch)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenizer(list(texts)).to(self.device)
        with torch.inference_mode(), self.autocast():
            features = F.normalize(self.module.encode_text(tokens).float(), dim=-1)
        return features.cpu().numpy()


def build_open_clip(name: str, weights: Path | None = None, device: str = "auto") -> OpenClipEncoder:
    import open_clip

    arch, tag = split_name(name)
    if arch not in open_clip.list_models():
        raise UnknownModelError(f"open_clip has no architecture {arch!r}; see open_clip.list_models()")
    if weights is None and tag is None:
        raise WeightsNotFoundError(
            f"open_clip model {arch} needs a pretrained tag (e.g. {arch}/laion2b_s34b_b79k) or --weights FILE; "
            "random weights are never used"
        )
    if weights is not None and not Path(weights).is_file():
        raise WeightsNotFoundError(f"weights file not found: {weights}")
    pretrained = str(weights) if weights is not None else tag
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
    except Exception as error:
        raise WeightsNotFoundError(
            f"no weights for open_clip {arch}/{pretrained}: pass --weights FILE (open_clip_model.safetensors), "
            f"or fetch them once online into the Hugging Face cache; loading failed: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}"
        ) from None
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return OpenClipEncoder(
        name=name,
        clip_model=model,
        tokenizer=open_clip.get_tokenizer(arch),
        preprocess=preprocess,
        dim=int(model.visual.output_dim),
        input_size=size,
        preprocess_version=f"open_clip-{arch}-{size}-v1",
        device=device,
        channels_last=False,
    )

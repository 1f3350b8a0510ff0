"""Any timm model, pooled features (num_classes=0)."""

from __future__ import annotations

from pathlib import Path

import timm
from timm.data import create_transform, resolve_data_config

from imgsearch.encoders.torch_encoder import TorchEncoder, is_convnet
from imgsearch.errors import InvalidWeightsError, WeightsNotFoundError


def is_timm_model(name: str) -> bool:
    return timm.is_model(name)


def build_timm(name: str, weights: Path | None = None, device: str = "auto") -> TorchEncoder:
    if weights is not None:
        if not Path(weights).is_file():
            raise WeightsNotFoundError(f"weights file not found: {weights}")
        try:
            model = timm.create_model(
                name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(weights)}
            )
        except Exception as error:
            raise InvalidWeightsError(f"weights {weights} do not fit timm model {name}: {error}") from None
    else:
        try:  # timm looks in the Hugging Face cache, and downloads when online
            model = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as error:
            from huggingface_hub.constants import HF_HUB_CACHE

            raise WeightsNotFoundError(
                f"no weights for timm model {name}: pass --weights FILE (.safetensors or .pth state dict), "
                f"or fetch them once online into the Hugging Face cache ({HF_HUB_CACHE}); "
                f"loading failed: {type(error).__name__}"
            ) from None
    config = resolve_data_config({}, model=model)
    size = int(config["input_size"][-1])
    return TorchEncoder(
        name=f"timm:{name}",  # unambiguous: torchvision has models of the same bare names
        module=model,
        preprocess=create_transform(**config),
        dim=model.num_features,
        input_size=size,
        preprocess_version=(
            f"timm-{size}-{config['interpolation']}-{config['crop_pct']}-{config['mean']}-{config['std']}-v1"
        ),
        device=device,
        channels_last=is_convnet(model),
    )

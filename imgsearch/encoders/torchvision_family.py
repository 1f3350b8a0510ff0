"""torchvision classification models with their final Linear layer removed."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision

from imgsearch.encoders.torch_encoder import TorchEncoder, is_convnet, load_into, load_state_dict_file
from imgsearch.errors import UnknownModelError, WeightsNotFoundError


def is_torchvision_model(name: str) -> bool:
    return name in torchvision.models.list_models(module=torchvision.models)


def _default_weights(name: str):
    try:
        return torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError):
        raise UnknownModelError(f"torchvision model {name} has no pretrained weights") from None


def _pretrained_state(name: str, weights_enum, weights: Path | None) -> tuple[dict[str, torch.Tensor], str]:
    if weights is not None:
        if not Path(weights).is_file():
            raise WeightsNotFoundError(f"weights file not found: {weights}")
        return load_state_dict_file(Path(weights)), str(weights)
    filename = os.path.basename(weights_enum.url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.is_file():
        return load_state_dict_file(cached), str(cached)
    try:  # online users: torchvision's own cache fills itself
        state = torch.hub.load_state_dict_from_url(weights_enum.url, map_location="cpu", progress=False)
    except Exception as error:
        raise WeightsNotFoundError(
            f"no weights for torchvision model {name}: put {filename} at {cached} "
            f"(from {weights_enum.url}) or pass --weights FILE; download failed: {type(error).__name__}"
        ) from None
    return state, weights_enum.url


def _drop_last_linear(model: torch.nn.Module) -> int:
    """Replace the classifier's final Linear with Identity; return the feature width it consumed."""
    last_name, last_layer = None, None
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            last_name, last_layer = module_name, module
    if last_layer is None:
        raise UnknownModelError("model has no Linear classifier to remove")
    parent_name, _, child = last_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, torch.nn.Identity())
    return last_layer.in_features


def build_torchvision(name: str, weights: Path | None = None, device: str = "auto") -> TorchEncoder:
    weights_enum = _default_weights(name)
    model = torchvision.models.get_model(name, weights=None)
    state, source = _pretrained_state(name, weights_enum, weights)
    load_into(model, state, source, name)
    dim = _drop_last_linear(model)
    preprocess = weights_enum.transforms(antialias=True)
    crop = preprocess.crop_size[0]
    return TorchEncoder(
        name=f"torchvision:{name}",  # unambiguous: timm has models of the same bare names
        module=model,
        preprocess=preprocess,
        dim=dim,
        input_size=crop,
        preprocess_version=f"torchvision-{weights_enum}-{preprocess.resize_size}-{crop}-v1",
        device=device,
        channels_last=is_convnet(model),
    )

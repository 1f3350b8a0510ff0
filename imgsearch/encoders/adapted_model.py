"""The adapted embedding as a torch module (`imgsearch adapt` trains it; lite.py loads it), and its files."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from imgsearch.encoders.adapted import KIND, AdaptedCard, adapted_paths, file_digest, read_card
from imgsearch.errors import InvalidWeightsError


class AdaptedEmbedding(torch.nn.Module):
    """backbone (pooled features) -> linear projection; the encoder L2-normalises the output. The projection starts
    as the identity, so before training the embedding is the base model's."""

    def __init__(self, backbone: torch.nn.Module, features: int, dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = torch.nn.Linear(features, dim, bias=False)
        with torch.no_grad():
            self.projection.weight.copy_(torch.eye(dim, features))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone(images).float().flatten(1))


def save_adapted(path: Path, module: AdaptedEmbedding, card: AdaptedCard) -> tuple[Path, Path]:
    """Write the tensors, then the card with their digest; returns both paths."""
    from safetensors.torch import save_file

    weights_path, card_path = adapted_paths(path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in module.state_dict().items()}
    save_file(state, str(weights_path), metadata={"kind": KIND, "base_model": card.base_model})
    card.digest = file_digest(weights_path)
    card_path.write_text(json.dumps(asdict(card), indent=2) + "\n", encoding="utf-8")
    return weights_path, card_path


def load_adapted(weights: Path | str, backbone: torch.nn.Module, features: int, model_name: str) -> tuple[AdaptedEmbedding, AdaptedCard]:
    """The adapted module on `backbone` (the base architecture, its classifier removed) and its card."""
    from imgsearch.encoders.torch_encoder import load_into, load_state_dict_file

    card = read_card(weights)
    if card.base_model != model_name:
        raise InvalidWeightsError(f"{weights} adapts {card.base_model}, not {model_name}; use --model {card.base_model}")
    module = AdaptedEmbedding(backbone, features, card.dim)
    load_into(module, load_state_dict_file(adapted_paths(Path(weights))[0]), str(weights), model_name)
    return module.eval(), card

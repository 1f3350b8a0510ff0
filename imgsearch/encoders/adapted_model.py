"""The adapted embedding as a torch module (`imgsearch adapt` trains it; lite.py loads it), and its files."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from imgsearch.encoders.adapted import KIND, AdaptedCard, adapted_paths, file_digest, read_card
from imgsearch.encoders.torch_encoder import backbone_stages
from imgsearch.errors import InvalidWeightsError


class AdaptedEmbedding(torch.nn.Module):
    """backbone (pooled features) -> linear projection; the encoder L2-normalises the output. The projection starts
    as the identity, so before training the embedding is the base model's.

    With a frozen share w > 0 (with_frozen_tail) the vector is [sqrt(w) * frozen, sqrt(1 - w) * adapted], each half
    unit length: the frozen stages run once, then the base model's own last `stages` beside the trained ones. The
    frozen half is power-transformed here, as recognition scores the model's own vectors, so the collection is scored
    without the transform (recognition/scoring.py). It keeps what the base model tells apart, photo edits among
    products of one type above all, which the margin loss trades away (docs/recognition.md)."""

    def __init__(
        self, backbone: torch.nn.Module, features: int, dim: int, frozen_share: float = 0.0, stages: int = 0, frozen_power: float = 1.0
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = torch.nn.Linear(features, dim, bias=False)
        with torch.no_grad():
            self.projection.weight.copy_(torch.eye(dim, features))
        self.frozen_share, self.stages, self.frozen_power = 0.0, stages, 1.0
        if frozen_share > 0:
            self.with_frozen_tail(copy.deepcopy(backbone), frozen_share, stages, frozen_power)

    def with_frozen_tail(self, frozen_backbone: torch.nn.Module, share: float, stages: int, power: float) -> AdaptedEmbedding:
        """Run `frozen_backbone`'s last `stages` (the base model's, untrained) beside the adapted ones; the frozen half
        is raised to `power` (sign kept), the card records it."""
        if not 0 < share < 1:
            raise InvalidWeightsError(f"the frozen share must be between 0 and 1, not {share}")
        self.frozen_tail = torch.nn.ModuleList(split_stages(frozen_backbone, stages)[1])
        for parameter in self.frozen_tail.parameters():
            parameter.requires_grad_(False)
        self.frozen_share, self.stages, self.frozen_power = float(share), stages, float(power)
        return self

    def without_frozen_tail(self) -> AdaptedEmbedding:
        """The adapted embedding alone."""
        if self.frozen_share:
            del self.frozen_tail
        self.frozen_share, self.frozen_power = 0.0, 1.0
        return self

    @property
    def output_dim(self) -> int:
        return self.projection.out_features + (self.projection.in_features if self.frozen_share else 0)

    def adapted(self, images: torch.Tensor) -> torch.Tensor:
        """The trained half alone: what `imgsearch adapt` trains and scores its epochs by."""
        return self.projection(self.backbone(images).float().flatten(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.frozen_share:
            return self.adapted(images)
        trunk, tail = split_stages(self.backbone, self.stages)
        shared = run_stages(trunk, images)
        adapted = F.normalize(self.projection(run_stages(tail, shared).float().flatten(1)), dim=1)
        frozen = F.normalize(run_stages(self.frozen_tail, shared).float().flatten(1), dim=1)
        frozen = F.normalize(torch.sign(frozen) * frozen.abs().pow(self.frozen_power), dim=1)
        return torch.cat([math.sqrt(self.frozen_share) * frozen, math.sqrt(1 - self.frozen_share) * adapted], dim=1)


def split_stages(backbone: torch.nn.Module, stages: int) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """(the frozen stages, the last `stages` that have parameters and any after them): as backbone_stages counts them."""
    if not isinstance(getattr(backbone, "blocks", None), torch.nn.Sequential):
        raise InvalidWeightsError(f"a frozen share needs a backbone of stages in `blocks` (timm CNNs), not {type(backbone).__name__}")
    all_stages = backbone_stages(backbone)
    with_parameters = [index for index, stage in enumerate(all_stages) if any(True for _ in stage.parameters())]
    split = with_parameters[len(with_parameters) - stages] if 0 < stages <= len(with_parameters) else len(all_stages)
    return all_stages[:split], all_stages[split:]


def run_stages(stages, images: torch.Tensor) -> torch.Tensor:
    """The stages in order (a ModuleList is a stage of several layers), as the backbone's own forward runs them."""
    for stage in stages:
        for layer in stage if isinstance(stage, torch.nn.ModuleList) else [stage]:
            images = layer(images)
    return images


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
    projection_dim = card.dim - features if card.frozen_share else card.dim
    module = AdaptedEmbedding(backbone, features, projection_dim, card.frozen_share, card.stages, card.frozen_power)
    load_into(module, load_state_dict_file(adapted_paths(Path(weights))[0]), str(weights), model_name)
    return module.eval(), card

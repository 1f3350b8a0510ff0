"""An embedding adapted to a catalog (`imgsearch adapt`): the base model's backbone, its last stages fine-tuned with a
metric-learning loss, and a projection, saved as PATH.safetensors (every tensor) plus PATH.json (the card: base
model, loss, labels seen, epochs, validation figures, the weights' digest).

It loads like any weights file (`--weights PATH.safetensors`), and collections record its digest, so the model
guard refuses a query encoder with other weights (store/schema.py). This module reads cards without torch (the ONNX
runtimes run without it); adapted_model.py holds the module."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgsearch.errors import InvalidWeightsError

ADAPTED_FORMAT = "1"
KIND = "imgsearch adapted embedding"


@dataclass
class AdaptedCard:
    base_model: str
    dim: int
    loss: str
    labels: dict[str, int]  # label -> references trained on (held-out validation ones not counted)
    epochs: int  # asked for
    epochs_run: int
    stages: int  # last backbone stages trained
    validation: dict[str, Any]  # frozen and adapted figures on the held-out references
    collection: str = ""
    digest: str = ""  # sha256 of the .safetensors file
    history: list[dict[str, Any]] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)  # seconds, device, seed, batch size, images
    # the share of the vector given to the base model's own embedding, and the power its half is raised to
    # (adapted_model.AdaptedEmbedding); 0: the adapted embedding alone (cards written before it existed)
    frozen_share: float = 0.0
    frozen_power: float = 1.0
    kind: str = KIND
    format: str = ADAPTED_FORMAT

    @property
    def weights_id(self) -> str:
        """What a collection records for these weights."""
        return f"adapted:{self.digest[:16]}"


def adapted_paths(path: Path) -> tuple[Path, Path]:
    """(PATH.safetensors, PATH.json) for a stem or either file."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def unused_stem(path: Path) -> Path:
    """`path`, or `path`-2, -3, ...: the first stem whose files do not exist. An adapted embedding a collection was
    reindexed with must never be overwritten: its vectors would no longer match the file (the guard refuses them)."""
    stem, number = Path(path), 1
    while any(file.exists() for file in adapted_paths(stem)):
        number += 1
        stem = Path(path).with_name(f"{Path(path).name}-{number}")
    return stem


def is_adapted(weights: Path | str | None) -> bool:
    """Whether a weights path is an adapted embedding (its card beside it), without reading the tensors."""
    if weights is None:
        return False
    weights_path, card_path = adapted_paths(Path(weights))
    if Path(weights).suffix not in (".safetensors", ".json") or not card_path.is_file():
        return False
    try:
        return json.loads(card_path.read_text(encoding="utf-8")).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_card(weights: Path | str) -> AdaptedCard:
    """The card of an adapted embedding; InvalidWeightsError when it is unreadable or the weights file is not the
    one it describes (another file under the same name would silently change every vector)."""
    weights_path, card_path = adapted_paths(Path(weights))
    try:
        data = json.loads(card_path.read_text(encoding="utf-8"))
        card = AdaptedCard(**{key: value for key, value in data.items() if key in AdaptedCard.__dataclass_fields__})
    except (OSError, ValueError, TypeError) as error:
        raise InvalidWeightsError(f"cannot read the adapted embedding's card {card_path}: {error}") from None
    if card.format != ADAPTED_FORMAT:
        raise InvalidWeightsError(f"{card_path} is format {card.format!r}; this imgsearch reads {ADAPTED_FORMAT!r}")
    if not weights_path.is_file():
        raise InvalidWeightsError(f"{weights_path} is missing (its card {card_path} is there)")
    if file_digest(weights_path) != card.digest:
        raise InvalidWeightsError(f"{weights_path} is not the file its card {card_path.name} describes (digest differs)")
    return card

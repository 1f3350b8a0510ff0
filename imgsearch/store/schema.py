"""What a collection is: its fields, the properties that record what made its vectors, the rows going in and the
hits coming out, filter expressions over its fields, and the one guard against mixing incomparable vectors."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imgsearch.errors import ModelMismatchError
from imgsearch.storage import shown_uri

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
FIELDS = ("id", "vector", "label", "path", "metadata")  # as created (collection.py) and exported (transfer.py)
MODEL_PROPERTY = "imgsearch.model"
DIM_PROPERTY = "imgsearch.dim"
PREPROCESS_PROPERTY = "imgsearch.preprocess"
PRECISION_PROPERTY = "imgsearch.precision"  # the encoder's: one of PRECISIONS
PRECISIONS = ("fp32", "int8")
# A collection made before precision was recorded holds fp32 vectors: int8 did not exist yet.
UNRECORDED_PRECISION = "fp32"
SCHEMA_PROPERTY = "imgsearch.schema"
# "" (or absent: made before adapted embeddings) for the model's own weights; else an adapted embedding's id
# (encoders/adapted.py): vectors of other weights are not comparable, so the guard refuses them
WEIGHTS_PROPERTY = "imgsearch.weights"
# What makes vectors comparable: carried with every export and restored by its import (transfer.py).
IDENTITY_PROPERTIES = (MODEL_PROPERTY, DIM_PROPERTY, PREPROCESS_PROPERTY, PRECISION_PROPERTY, WEIGHTS_PROPERTY)
RECOGNITION_PROPERTY = "imgsearch.recognition"  # the abstention threshold `imgsearch eval` calibrated
SELF_CALIBRATION_PROPERTY = "imgsearch.self_calibration"  # the one the references calibrate (recognition/abstention.py)
REFERENCE_COUNTS_PROPERTY = "imgsearch.reference_counts"  # references per label, as of that calibration
ROOTS_PROPERTY = "imgsearch.roots"  # the folders ingested or enrolled from: the only files the API serves

LABELED = 'label != ""'  # the references recognition votes with


@dataclass
class ImageRecord:
    id: str
    vector: np.ndarray | list[float]
    path: str
    label: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        vector = self.vector.tolist() if isinstance(self.vector, np.ndarray) else list(self.vector)
        return {"id": self.id, "vector": vector, "path": self.path, "label": self.label, "metadata": self.metadata}


@dataclass
class Hit:
    id: str
    score: float
    path: str
    label: str
    metadata: dict[str, Any]
    vector: np.ndarray | None = None  # only when asked for (recognition re-scores neighbours)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "score": self.score, "path": self.path, "label": self.label, "metadata": self.metadata}


def string_literal(text: str) -> str:
    """`text` as a string in a Milvus filter expression. Milvus reads \\ and \" but not JSON's \\uXXXX, so
    json.dumps broke every label outside ASCII ("café"); labels hold no control characters (validation)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def label_is(label: str) -> str:
    return f"label == {string_literal(label)}"


def labeled_except(label: str) -> str:
    """The references of every label but `label`: what a query of a class never enrolled would be recognised among."""
    return f"{LABELED} and label != {string_literal(label)}"


def check_identity(
    properties: dict[str, str], collection: str, uri: str, *, model: str, dim: int | None = None,
    preprocess_version: str = "", precision: str = "", weights: str | None = None,
) -> None:
    """The model guard: ModelMismatchError when the collection was not made by imgsearch, or records another model
    (a name as given is compared canonically, so it can be checked before that model is loaded) or, when `dim` is
    given, another dim, or, when `weights` is given, other weights (an adapted embedding's id, "" for the model's
    own). Another preprocessing or precision only shifts scores a little: a warning."""
    stored_model = properties.get(MODEL_PROPERTY)
    stored_dim = properties.get(DIM_PROPERTY)
    if not stored_model:
        raise ModelMismatchError(
            f"collection {collection} at {shown_uri(uri)} was not created by imgsearch (no model recorded); choose another --collection"
        )
    if stored_model != model:
        from imgsearch.encoders import canonical_model_name  # loads torch: only when the names differ

        if stored_model != canonical_model_name(model):
            raise _model_mismatch(collection, stored_model, stored_dim, canonical_model_name(model), dim)
    if dim is not None and stored_dim != str(dim):
        raise _model_mismatch(collection, stored_model, stored_dim, model, dim)
    stored_weights = properties.get(WEIGHTS_PROPERTY, "")
    if weights is not None and stored_weights != weights:
        raise ModelMismatchError(
            f"collection {collection} holds vectors of {_weights_shown(stored_weights)} and this encoder has "
            f"{_weights_shown(weights)}: their vectors are not comparable; "
            + ("pass the --weights the collection was made with (`imgsearch info` shows them)" if stored_weights
               else "use another --collection, or reindex this one with these weights")
        )
    stored_preprocess = properties.get(PREPROCESS_PROPERTY, "")
    if preprocess_version and stored_preprocess != preprocess_version:
        log.warning(
            "collection %s was filled with preprocessing %r, this encoder uses %r; scores may shift", collection, stored_preprocess, preprocess_version
        )
    stored_precision = properties.get(PRECISION_PROPERTY, UNRECORDED_PRECISION)
    if precision and stored_precision != precision:
        log.warning(
            "collection %s was filled by the %s encoder, this one is %s: scores shift by about 0.01 (--runtime %s matches it)",
            collection, stored_precision, precision, "onnx-int8" if stored_precision == "int8" else "onnx",
        )


def _weights_shown(weights: str) -> str:
    return f"the adapted embedding {weights}" if weights else "the model's own weights"


def _model_mismatch(collection: str, stored_model: str, stored_dim: str | None, model: str, dim: int | None) -> ModelMismatchError:
    asked = f"model {model}" + (f" (dim {dim})" if dim is not None else "")
    return ModelMismatchError(
        f"collection {collection} holds vectors of model {stored_model} (dim {stored_dim}), but {asked} was asked for; "
        f"use --model {stored_model}, or another --collection"
    )

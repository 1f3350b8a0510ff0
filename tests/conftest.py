"""Shared fixtures: the real offline Lite0 encoder, real photos, fresh Milvus Lite stores."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast instead of retrying an unreachable hub

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgsearch.encoders import load_encoder
from imgsearch.store import MilvusStore

FASHION_DIR = Path(__file__).resolve().parent.parent / "examples" / "catalog"
PHOTO_NAMES = ("chelsea", "coffee", "astronaut", "rocket", "camera", "coins", "hubble_deep_field", "immunohistochemistry")


@pytest.fixture(scope="session")
def encoder():
    return load_encoder("efficientnet_lite0", device="cpu")


@pytest.fixture(scope="session")
def onnx_encoder(tmp_path_factory, encoder):
    """The same model through onnxruntime: what users get on a CPU, and five times faster than torch eager."""
    from imgsearch.encoders.onnx_runtime import to_onnx

    return to_onnx(encoder, tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    from skimage import data

    return {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTO_NAMES}


@pytest.fixture
def make_store(tmp_path, encoder):
    stores: list[MilvusStore] = []

    def make(uri: str | None = None, collection: str = "test_images") -> MilvusStore:
        store = MilvusStore(
            uri or str(tmp_path / "milvus.db"),
            collection,
            model=encoder.name,
            dim=encoder.dim,
            preprocess_version=encoder.preprocess_version,
        )
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def fashion_images(per_class: int = 2) -> list[Path]:
    """Real Fashion-MNIST product photos from the bundled sample catalog."""
    picked = []
    for folder in sorted(p for p in FASHION_DIR.iterdir() if p.is_dir()):
        picked.extend(sorted(folder.glob("*.png"))[:per_class])
    return picked


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))

"""The Milvus store on real Milvus Lite: schema, model guard, lock."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from imgsearch.errors import ModelMismatchError
from imgsearch.store import ImageRecord, MilvusStore

pytestmark = pytest.mark.slow  # Milvus Lite



def _unit(seed: int, dim: int) -> np.ndarray:
    vector = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def test_schema_and_round_trip(make_store):
    store = make_store()
    fields = {field["name"]: field for field in store.client.describe_collection(store.collection)["fields"]}
    assert set(fields) == {"id", "vector", "label", "path", "metadata"}
    assert fields["id"]["is_primary"] and fields["vector"]["params"]["dim"] == 1280
    store.upsert([ImageRecord(id="a" * 64, vector=_unit(1, 1280), path="/x/a.png", label="bag", metadata={"sku": 7})])
    store.upsert([ImageRecord(id="b" * 64, vector=_unit(2, 1280), path="/x/b.png")])
    assert store.count() == 2
    hits = store.search(np.stack([_unit(1, 1280)]), k=2)[0]
    assert hits[0].id == "a" * 64 and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].label == "bag" and hits[0].metadata == {"sku": 7}
    assert [hit.id for hit in store.search(np.stack([_unit(1, 1280)]), k=2, filter='label == ""')[0]] == ["b" * 64]
    # upsert of the same id replaces, never duplicates
    store.upsert([ImageRecord(id="a" * 64, vector=_unit(1, 1280), path="/y/a.png", label="bag")])
    assert store.count() == 2
    assert store.get(["a" * 64])["a" * 64]["path"] == "/y/a.png"


def test_opening_with_another_model_names_both(make_store):
    guarded = make_store(collection="guarded")
    with pytest.raises(ModelMismatchError) as caught:
        MilvusStore(guarded.uri, guarded.collection, model="resnet50", dim=2048)
    message = str(caught.value)
    assert "efficientnet_lite0" in message and "1280" in message and "resnet50" in message and "2048" in message


def test_second_process_gets_a_clear_lock_error(tmp_path):
    store = MilvusStore(str(tmp_path / "locked.db"), "test_images", model="efficientnet_lite0", dim=1280)
    code = (
        "from imgsearch.store import MilvusStore\n"
        f"MilvusStore({str(store.uri)!r}, 'test_images', model='efficientnet_lite0', dim=1280)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    store.close()
    assert "StoreLockedError" in result.stderr and "milvus-lite server" in result.stderr

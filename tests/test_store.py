"""The Milvus store on real Milvus Lite: schema, model guard, lock."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import CuttableProxy, free_port
from imgsearch.errors import ModelMismatchError, StoreUnavailableError
from imgsearch.session import check_collection_exists, collection_properties
from imgsearch.store import PRECISION_PROPERTY, PRECISIONS, ImageRecord, MilvusStore, lite

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


def test_a_collection_records_the_precision_it_is_made_for_and_none_is_guessed(tmp_path):
    uri = str(tmp_path / "precision.db")
    for precision in PRECISIONS:
        with MilvusStore(uri, f"made_{precision}", model="efficientnet_lite0", dim=4, precision=precision) as store:
            assert store.properties()[PRECISION_PROPERTY] == precision
    with pytest.raises(ValueError, match="give its precision"):
        MilvusStore(uri, "unsaid", model="efficientnet_lite0", dim=4)
    with MilvusStore(uri, "made_int8", model="efficientnet_lite0", dim=4, create=False) as opened:  # opening needs none
        assert opened.properties()[PRECISION_PROPERTY] == "int8"


def test_second_process_gets_a_clear_lock_error(tmp_path):
    store = MilvusStore(str(tmp_path / "locked.db"), "test_images", model="efficientnet_lite0", dim=1280, precision="fp32")
    code = (
        "from imgsearch.store import MilvusStore\n"
        f"MilvusStore({str(store.uri)!r}, 'test_images', model='efficientnet_lite0', dim=1280, precision='fp32')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    store.close()
    assert "StoreLockedError" in result.stderr and "milvus-lite server" in result.stderr
    assert f"(pid {os.getpid()})" in result.stderr


def test_a_lock_this_process_holds_is_not_blamed_on_another_process(tmp_path):
    """A Lite start that fails half-way (out of file descriptors, say) leaves this process holding the lock; the
    error must then be the start's own, not "in use by another process"."""
    database = tmp_path / "own.db"
    database.mkdir()
    with open(database / "LOCK", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        lite.check_lock(str(database))  # this process's own lock: nothing to report
        code = f"from imgsearch.store import lite\nlite.check_lock({str(database)!r})\n"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and f"in use by another process (pid {os.getpid()})" in result.stderr
    unlocked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert unlocked.returncode == 0, unlocked.stderr


def test_every_store_call_says_milvus_is_unreachable_when_it_is(tmp_path):
    """The API answers 503 (not 500, not a 400 blaming the request) only for StoreUnavailableError: every call the
    store makes to Milvus must raise it when the server cannot be reached. The server here is the gRPC server of
    an in-process Milvus Lite, reached through a proxy that the test cuts."""
    lite = MilvusStore(str(tmp_path / "reachable.db"), "cut", model="efficientnet_lite0", dim=4, precision="fp32")
    proxy = CuttableProxy(int(lite.writer_uri().rsplit(":", 1)[1]))
    uri = f"http://127.0.0.1:{proxy.port}"
    store = MilvusStore(uri, "cut", model="efficientnet_lite0", dim=4, precision="fp32")
    record = ImageRecord(id="a" * 64, vector=_unit(1, 4), path="/x/a.png", label="bag")
    store.upsert([record])
    proxy.close()
    calls = {
        "upsert": lambda: store.upsert([record]),
        "delete": lambda: store.delete(["a" * 64]),
        "flush": store.flush,
        "get": lambda: store.get(["a" * 64]),
        "ids_starting_with": lambda: store.ids_starting_with("aa"),
        "count": store.count,
        "label_counts": lambda: store.label_counts(["bag"]),
        "iter_rows": lambda: list(store.iter_rows()),
        "search": lambda: store.search(np.stack([_unit(1, 4)])),
        "resolved_name": store.resolved_name,
        "check_serving": store.check_serving,
        "check_embedding_unchanged": store.check_embedding_unchanged,
        "point_alias": lambda: store.point_alias("cut_alias"),
        "properties": store.properties,
        "roots": store.roots,
        "add_roots": lambda: store.add_roots(["/catalog"]),
        "set_properties": lambda: store.set_properties({"x": "1"}),
    }
    # every public method that talks to Milvus is here: a new one must be added (and routed through milvus_errors)
    without_a_call = {"open_existing", "writer_uri", "wait_for_index", "index_coverage", "close"}
    public = {name for name in vars(MilvusStore) if not name.startswith("_")} - without_a_call
    assert public == calls.keys()
    for name, call in calls.items():
        with pytest.raises(StoreUnavailableError, match="unreachable"):
            call()
            pytest.fail(f"{name} answered with Milvus unreachable")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(StoreUnavailableError):
        MilvusStore(dead, "cut", model="efficientnet_lite0", dim=4, precision="fp32")
    with pytest.raises(StoreUnavailableError):
        MilvusStore.open_existing(dead, "cut")
    with pytest.raises(StoreUnavailableError):
        collection_properties(dead, "cut")
    with pytest.raises(StoreUnavailableError):
        check_collection_exists(dead, "cut")
    lite.close()


def test_the_index_setting_builds_ivf_sq8_for_millions_of_rows_on_a_server():
    from imgsearch.store.search_params import IVF_NLIST, chosen_index, index_for

    assert [chosen_index("auto"), chosen_index("auto", 999_999), chosen_index("auto", 1_000_000)] == ["hnsw", "hnsw", "ivf_sq8"]
    assert chosen_index("hnsw", 5_000_000) == "hnsw" and chosen_index("ivf_sq8", 10) == "ivf_sq8"
    assert index_for("http://milvus:19530", "ivf_sq8") == ("IVF_SQ8", {"nlist": IVF_NLIST})
    assert index_for("http://milvus:19530", "hnsw") == ("AUTOINDEX", {})
    assert index_for("images.db", "ivf_sq8") == ("AUTOINDEX", {})  # Milvus Lite builds its own
    with pytest.raises(ValueError, match="index must be one of"):
        index_for("http://milvus:19530", "flat")


@pytest.mark.server
def test_an_ivf_sq8_collection_on_the_server_finds_each_stored_vector(milvus_server_uri):
    import uuid

    store = MilvusStore(milvus_server_uri, f"ivf_{uuid.uuid4().hex[:8]}", model="m", dim=64, precision="fp32", index="ivf_sq8")
    try:
        vectors = np.stack([_unit(seed, 64) for seed in range(3000)])
        store.upsert([ImageRecord(id=f"{i:064x}", vector=vector, path=f"/p/{i}.jpg") for i, vector in enumerate(vectors)])
        store.flush()
        assert store.client.describe_index(store.collection, "vector")["index_type"] == "IVF_SQ8"
        found = store.search(vectors[::100], k=1, fields=("path",))
        assert [hits[0].id for hits in found] == [f"{i:064x}" for i in range(0, 3000, 100)]
    finally:
        store.client.drop_collection(store.collection)
        store.close()


def test_opening_a_store_settles_pymilvus_lazy_scipy_check_before_any_request_thread(tmp_path):
    """pymilvus checks for scipy.sparse on the first call carrying vectors, unguarded: concurrent first searches of the
    service failed (two 400s in a CI soak). Opening a store makes that check once, so no request thread makes it."""
    script = f"""
import sys
from pymilvus.client.utils import SciPyHelper
from imgsearch.store import MilvusStore
assert not SciPyHelper._checked and "scipy.sparse" not in sys.modules
MilvusStore({str(tmp_path / "lazy.db")!r}, "lazy", model="m", dim=4, precision="fp32")
assert SciPyHelper._checked and "scipy.sparse" in sys.modules, (SciPyHelper._checked, "scipy.sparse" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_collection_opened_without_comparing_weights_knows_the_embedding_it_holds(tmp_path):
    """Commands that encode nothing open a collection with weights=None; recognition still has to score an adapted
    collection as adapted (recognition/scoring.py scoring_power)."""
    uri, adapted = str(tmp_path / "adapted.db"), "adapted:0123456789abcdef"
    with MilvusStore(uri, "shop", model="efficientnet_lite0", dim=8, precision=PRECISIONS[0], weights=adapted) as store:
        assert store.weights == adapted
    with MilvusStore(uri, "shop", model="efficientnet_lite0", dim=8, weights=None, create=False) as store:
        assert store.weights == adapted
    with MilvusStore(uri, "own", model="efficientnet_lite0", dim=8, precision=PRECISIONS[0]) as store:
        pass
    with MilvusStore(uri, "own", model="efficientnet_lite0", dim=8, create=False) as store:
        assert store.weights == ""

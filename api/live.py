"""The service on a free loopback port in a background thread, for tests and benchmarks/api.py."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request

from imgsearch.config import Settings


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# No proxy for a loopback health check. urlopen's shared opener keeps the proxy settings of the moment it was first
# used, so an *_proxy variable set then (a test of the offline download path sets one) would capture it for good.
LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def wait_until_healthy(base_url: str, process=None, timeout: float = 180) -> None:
    """Return once GET /health answers 200; fail early if `process` (a Popen) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the service exited: {process.stderr.read() if process.stderr else ''}")
        try:
            with LOOPBACK.open(f"{base_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the service at {base_url} did not become healthy within {timeout:.0f} s")


class LiveServer:
    """`with LiveServer(settings) as base_url:` runs uvicorn with the app until the block ends."""

    def __init__(self, settings: Settings) -> None:
        import uvicorn

        from imgsearch.api.app import create_app  # the model stack: only when a server is really started

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        wait_until_healthy(self.base_url)
        return self.base_url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

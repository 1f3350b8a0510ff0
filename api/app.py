"""The REST service: a thin FastAPI shell over the same core functions the CLI calls.

The encoder and the store are loaded once, in the lifespan; encoding runs off the event loop, and concurrent
requests share forward passes through the micro-batcher. Routes are in routes.py.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from imgsearch.api import routes
from imgsearch.api.limits import BodyLimit, IdleTrim, heap_bytes, use_mmap_for_large_buffers
from imgsearch.api.service import Metrics, Service
from imgsearch.config import Settings, load_settings
from imgsearch.errors import (
    CollectionNotFoundError,
    EmbeddingMovedError,
    ImageDecodeError,
    ImageNotFoundError,
    ImgsearchError,
    InvalidInputError,
    StorageFullError,
    StoreUnavailableError,
)

__all__ = ["STATIC", "Service", "create_app"]

STATIC = Path(__file__).parent / "static"
PUBLIC_PATHS = {
    "docs": ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"),
    "metrics": ("/metrics",),
}


def page_paths() -> tuple[str, ...]:
    return ("/",) + tuple(f"/{item.name}" for item in STATIC.iterdir() if item.is_file()) if STATIC.is_dir() else ()


def status_of(error: ImgsearchError) -> int:
    """The one mapping of core errors to HTTP: what the client sent is 4xx; a Milvus outage is 503."""
    if isinstance(error, (StoreUnavailableError, EmbeddingMovedError)):  # not the request's fault: another replica may serve it
        return 503
    if isinstance(error, StorageFullError):
        return 507
    if isinstance(error, (CollectionNotFoundError, ImageNotFoundError)):
        return 404
    if isinstance(error, (InvalidInputError, ImageDecodeError)):
        return 422
    return 400


def create_app(settings: Settings | None = None, service: Service | None = None) -> FastAPI:
    """The app; `service` is passed when the caller loaded it already (`imgsearch serve` does, to report a locked
    store or missing weights as one line before the server starts)."""
    settings = service.settings if service else (settings or load_settings())
    metrics = Metrics()
    idle_trim = IdleTrim()
    metrics.in_flight.set_function(lambda: idle_trim.in_flight)
    if heap_bytes() is not None:  # glibc 2.33+
        for state in ("in_use", "free"):
            metrics.heap.labels(state).set_function(lambda state=state: heap_bytes()[state])

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        use_mmap_for_large_buffers()
        loaded = service or await asyncio.to_thread(Service, settings)
        loaded.start(metrics)
        app.state.service = loaded
        trimming = asyncio.create_task(idle_trim.watch())
        yield
        trimming.cancel()
        app.state.service = None
        await loaded.stop()

    app = FastAPI(title="imgsearch", version="0.1.0", lifespan=lifespan)
    app.state.settings, app.state.metrics = settings, metrics
    for router in (routes.system, routes.search, routes.images):
        app.include_router(router)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"])
    # Whole request bodies are bounded too (multipart framing included), before any part is parsed.
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes * settings.max_images_per_request + (1 << 20))
    open_paths = {"/health"}
    for part in settings.public:
        open_paths.update(page_paths() if part == "page" else PUBLIC_PATHS[part])
    expected_key = (settings.api_key or "").encode()

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        """Every path but /health (and the parts opened by IMGSEARCH_PUBLIC) needs the key: API routes, the
        docs, the schema, metrics, the page and any path that does not exist."""
        preflight = request.method == "OPTIONS" and settings.cors_origins
        if expected_key and not preflight and request.url.path not in open_paths:
            given = request.headers.get("x-api-key", "").encode("latin-1", errors="replace")
            if not hmac.compare_digest(given, expected_key):
                return JSONResponse(status_code=401, content={"detail": "missing or wrong X-API-Key header"})
        return await call_next(request)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.perf_counter()
        async with idle_trim.request():
            response = await call_next(request)
        endpoint = getattr(request.scope.get("route"), "path", "other")
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(ImgsearchError)
    async def user_error(request: Request, error: ImgsearchError):
        status = status_of(error)
        headers = {"Retry-After": "5"} if status == 503 else None  # not the request's fault: retry later
        return JSONResponse(status_code=status, content={"detail": str(error)}, headers=headers)

    if STATIC.is_dir():
        app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
    return app


def run_service(service: Service, host: str, port: int) -> None:
    """`imgsearch serve`: uvicorn on the app. On SIGTERM or Ctrl-C uvicorn stops accepting and waits for the
    requests in flight (at most settings.stop_wait_seconds, then cancels them); the service refuses the writes and
    scans still queued from that moment (503), so the wait is for work running, not for a queue."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            service.stopping = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        create_app(service=service), host=host, port=port, log_level="warning",
        timeout_graceful_shutdown=service.settings.stop_wait_seconds,
    )
    Server(config).run()

"""The REST service: a thin FastAPI shell over the same core functions the CLI calls.

The encoder and the store are loaded once, in the lifespan; encoding runs off the event loop, and concurrent
requests share forward passes through the micro-batcher.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field

from imgsearch.api.batching import MicroBatcher
from imgsearch.api.limits import BodyLimit, PixelBudget, use_mmap_for_large_buffers
from imgsearch.config import Settings, load_settings
from imgsearch.errors import (
    CollectionNotFoundError, ImageDecodeError, ImgsearchError, InvalidInputError, StoreUnavailableError,
    TextNotSupportedError,
)
from imgsearch.images import FORMAT_SUFFIXES, load_image, read_header
from imgsearch.validation import validate_id, validate_label

STATIC = Path(__file__).parent / "static"


# --- request and response models -------------------------------------------------------------------
class SearchHit(BaseModel):
    id: str
    score: float
    path: str
    label: str
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    results: list[SearchHit]


class TextQuery(BaseModel):
    text: str = Field(min_length=1, max_length=1000)
    k: int = Field(10, ge=1, le=1000)


class NeighbourOut(BaseModel):
    id: str
    label: str
    score: float
    path: str


class RecognitionOut(BaseModel):
    path: str
    label: str | None
    confidence: float
    neighbours: list[NeighbourOut]


class StoredImages(BaseModel):
    ids: list[str]
    label: str
    indexed: int
    updated: int
    skipped: int


class Health(BaseModel):
    status: str


class Info(BaseModel):
    collection: str
    uri: str
    exists: bool
    count: int
    model: str | None
    dim: int | None
    preprocess: str | None = None
    recognition: dict[str, Any] | None = None
    supports_text: bool


class Deleted(BaseModel):
    deleted: str
    file_removed: bool = Field(description="whether the file the service stored at upload was removed too (catalog files never are)")


# --- the service -----------------------------------------------------------------------------------
class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("imgsearch_requests_total", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("imgsearch_request_seconds", "Request latency", ["endpoint"], registry=self.registry)
        self.encode = Histogram("imgsearch_encode_seconds", "Time of one batched forward pass", registry=self.registry)
        self.batch = Histogram(
            "imgsearch_batch_size", "Images per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry
        )

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch.observe(size)
        self.encode.observe(seconds)


class ServedFiles:
    """Which stored paths the service may read, and how answers show them.

    Only files whose real location (symlinks and `..` resolved) lies under a root are served: the folders that
    were ingested or enrolled, recorded with the collection, and the upload directory. A path recorded in any
    other way (an imported Parquet file, say) is data, never a licence to read that file."""

    REFRESH_SECONDS = 5.0  # roots recorded by a concurrent `imgsearch ingest` are seen within this

    def __init__(self, store, upload_dir: Path, answer_paths: str) -> None:
        self.store = store
        self.upload_dir = os.path.abspath(upload_dir)
        self.absolute = answer_paths == "absolute"
        self.roots: list[str] = []
        self.real_roots: list[Path] = []
        self.loaded_at = -float("inf")
        self.refresh()

    def refresh(self) -> None:
        self.roots = sorted({*self.store.roots(), self.upload_dir}, key=len, reverse=True)  # innermost first
        self.real_roots = [Path(root).resolve() for root in self.roots]
        self.loaded_at = time.monotonic()

    def _root_of(self, path: str) -> str | None:
        for attempt in range(2):
            for root in self.roots:  # a folder, or one file enrolled or ingested by itself
                if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
                    return root
            if attempt == 0 and time.monotonic() - self.loaded_at > self.REFRESH_SECONDS:
                self.refresh()
            else:
                break
        return None

    def shown(self, path: str) -> str:
        """The path an answer carries: relative to its root (or only the file name outside every root), or as
        stored when answer_paths is absolute."""
        if self.absolute or not path:
            return path
        root = self._root_of(path)
        return os.path.relpath(path, root) if root and root != path else os.path.basename(path)

    def servable(self, path: str) -> Path | None:
        if not path or "\0" in path:
            return None
        if self._root_of(path) is None and time.monotonic() - self.loaded_at > self.REFRESH_SECONDS:
            self.refresh()
        real = Path(path).resolve()
        if any(real.is_relative_to(root) for root in self.real_roots) and real.is_file():
            return real
        return None

    def is_upload(self, path: str) -> bool:
        return Path(path).resolve().is_relative_to(Path(self.upload_dir).resolve())


class Service:
    """What the lifespan loads once: settings, encoder, store, batcher."""

    def __init__(self, settings: Settings) -> None:
        from imgsearch.encoders import encoder_from_settings
        from imgsearch.store import open_store

        self.settings = settings
        self.encoder = encoder_from_settings(settings)
        self.store = open_store(settings, self.encoder)
        self.files = ServedFiles(self.store, settings.upload_dir, settings.answer_paths)
        self.batcher: MicroBatcher | None = None
        self.write_lock: asyncio.Lock | None = None
        self.budget: PixelBudget | None = None


@dataclass
class Upload:
    name: str  # as the client sent it: shown back, never used as a path
    data: bytes
    image_format: str
    tensor: Any  # the encoder's input; the decoded image is freed as soon as this exists


PUBLIC_PATHS = {
    "docs": ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"),
    "metrics": ("/metrics",),
}


def page_paths() -> tuple[str, ...]:
    return ("/",) + tuple(f"/{item.name}" for item in STATIC.iterdir() if item.is_file()) if STATIC.is_dir() else ()


def service_of(request: Request) -> Service:
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise HTTPException(503, "the service is still loading")
    return service


# Module level, so FastAPI can resolve it from these (string) annotations.
ServiceDep = Annotated[Service, Depends(service_of)]


def create_app(settings: Settings | None = None, service: Service | None = None) -> FastAPI:
    """The app; `service` is passed when the caller loaded it already (`imgsearch serve` does, to report a locked
    store or missing weights as one line before the server starts)."""
    settings = service.settings if service else (settings or load_settings())
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        use_mmap_for_large_buffers()
        loaded = service or await asyncio.to_thread(Service, settings)
        loaded.batcher = MicroBatcher(
            loaded.encoder, max_batch=settings.batch_size, max_wait=settings.batch_wait_ms / 1000, observe=metrics.observe_batch
        )
        loaded.write_lock = asyncio.Lock()  # uploads and enrolments are written one at a time
        loaded.budget = PixelBudget(settings.decode_pixel_budget, settings.decode_wait_seconds)
        loaded.batcher.start()
        app.state.service = loaded
        yield
        app.state.service = None
        await loaded.batcher.stop()
        loaded.store.close()

    app = FastAPI(title="imgsearch", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
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
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "other")
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(ImgsearchError)
    async def user_error(request: Request, error: ImgsearchError):
        if isinstance(error, StoreUnavailableError):  # not the request's fault: retry later
            return JSONResponse(status_code=503, content={"detail": str(error)}, headers={"Retry-After": "5"})
        status = 404 if isinstance(error, CollectionNotFoundError) else 422 if isinstance(error, InvalidInputError) else 400
        return JSONResponse(status_code=status, content={"detail": str(error)})

    async def read_images(uploads: list[UploadFile], service: Service) -> list[Upload]:
        """Read, check and preprocess the uploads, one image at a time under the shared pixel budget: the decoded
        image exists only while it is turned into the encoder's input, so memory is bounded by the budget, not by
        how many large images arrive at once."""
        if not uploads:
            raise HTTPException(422, "send at least one image")
        if len(uploads) > settings.max_images_per_request:
            raise HTTPException(413, f"{len(uploads)} images in one request; the limit is {settings.max_images_per_request}")
        prepared = []
        for upload in uploads:
            name = upload.filename or "upload"
            data = await upload.read(settings.max_upload_bytes + 1)
            if len(data) > settings.max_upload_bytes:
                raise HTTPException(413, f"{name} is larger than {settings.max_upload_bytes} bytes")
            try:
                pixels, image_format = await asyncio.to_thread(read_header, data, max_pixels=settings.max_image_pixels, name=name)
                async with service.budget.hold(pixels):
                    tensor = await asyncio.to_thread(preprocess_upload, service, data, name)
            except ImageDecodeError as error:
                raise HTTPException(422, f"{name}: {error.reason}") from None
            prepared.append(Upload(name, data, image_format, tensor))
        return prepared

    def preprocess_upload(service: Service, data: bytes, name: str):
        image = load_image(data, max_pixels=settings.max_image_pixels, min_side=service.encoder.input_size, name=name)
        return service.encoder.preprocess(image)

    def hit_out(service: Service, hit) -> SearchHit:
        return SearchHit(**{**hit.to_dict(), "path": service.files.shown(hit.path)})

    @app.get("/health", response_model=Health)
    async def health(request: Request):
        if getattr(request.app.state, "service", None) is None:
            raise HTTPException(503, "loading")
        return Health(status="ok")

    @app.get("/info", response_model=Info)
    async def info(service: ServiceDep):
        from imgsearch.store import describe_collection

        described = await asyncio.to_thread(describe_collection, settings.milvus_uri, settings.collection_name, settings.milvus_token)
        return Info(**described, supports_text=service.encoder.supports_text)

    @app.post("/search", response_model=SearchResponse)
    async def search(
        service: ServiceDep,
        image: Annotated[UploadFile, File(description="The query image")],
        k: Annotated[int, Form(ge=1, le=1000)] = 10,
        filter: Annotated[str, Form(max_length=2000)] = "",
    ):
        [upload] = await read_images([image], service)
        vectors = await service.batcher.encode([upload.tensor])
        hits = (await asyncio.to_thread(service.store.search, vectors, k, filter))[0]
        return SearchResponse(results=await asyncio.to_thread(lambda: [hit_out(service, hit) for hit in hits]))

    @app.post("/search/text", response_model=SearchResponse)
    async def search_text(service: ServiceDep, query: TextQuery):
        if not service.encoder.supports_text:
            raise HTTPException(400, f"model {service.encoder.name} has no text encoder; text search needs a CLIP model")
        try:
            vectors = await asyncio.to_thread(service.encoder.encode_text, [query.text])
        except TextNotSupportedError as error:
            raise HTTPException(400, str(error)) from None
        hits = (await asyncio.to_thread(service.store.search, vectors, query.k))[0]
        return SearchResponse(results=await asyncio.to_thread(lambda: [hit_out(service, hit) for hit in hits]))

    @app.post("/recognize", response_model=list[RecognitionOut])
    async def recognize(
        service: ServiceDep,
        image: Annotated[list[UploadFile], File(description="One or more images")],
        k: Annotated[int, Form(ge=1, le=1024)] = 100,
        threshold: Annotated[float | None, Form(allow_inf_nan=False)] = None,
    ):
        from imgsearch.recognize import recognize_vectors, resolve_threshold

        uploads = await read_images(image, service)
        vectors = await service.batcher.encode([upload.tensor for upload in uploads])
        used, _ = await asyncio.to_thread(resolve_threshold, service.store, threshold if threshold is not None else settings.threshold)
        results = await asyncio.to_thread(recognize_vectors, service.store, vectors, k=k, threshold=used)

        def answers() -> list[RecognitionOut]:  # showing paths may re-read the recorded folders: off the loop
            return [
                RecognitionOut(
                    path=upload.name, label=label, confidence=confidence,
                    neighbours=[NeighbourOut(**{**vars(n), "path": service.files.shown(n.path)}) for n in neighbours],
                )
                for upload, (label, confidence, neighbours) in zip(uploads, results)
            ]

        return await asyncio.to_thread(answers)

    def save_upload(upload: Upload, digest: str) -> Path:
        """Content-addressed: uploads/ab/abcdef….png, whatever the label or the client's file name says."""
        path = settings.upload_dir.resolve() / digest[:2] / f"{digest}{FORMAT_SUFFIXES.get(upload.image_format, '.img')}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")  # concurrent uploads of one content
            partial.write_bytes(upload.data)
            partial.replace(path)  # a crash never leaves a half-written file under the final name
        return path

    async def store_uploads(service: Service, uploads: list[UploadFile], label: str, relabel: bool) -> StoredImages:
        from imgsearch.ingest.catalog import CatalogEntry, bytes_sha256
        from imgsearch.ingest.pipeline import ingest_entries

        prepared = await read_images(uploads, service)
        entries, ids = [], []
        for upload in prepared:
            digest = bytes_sha256(upload.data)
            entries.append(CatalogEntry(path=await asyncio.to_thread(save_upload, upload, digest), label=label))
            ids.append(digest)
        async with service.write_lock:
            await asyncio.to_thread(service.store.add_roots, [service.files.upload_dir])
            report = await asyncio.to_thread(
                ingest_entries, entries, service.encoder, service.store, relabel_duplicates=relabel, workers=0,
                batch_size=settings.batch_size, max_pixels=settings.max_image_pixels,
            )
        if report.failed:
            raise HTTPException(422, "; ".join(f"{service.files.shown(f['path'])}: {f['error']}" for f in report.failed))
        return StoredImages(ids=ids, label=label, indexed=report.indexed, updated=report.updated, skipped=report.skipped)

    @app.post("/enroll", response_model=StoredImages)
    async def enroll(
        service: ServiceDep,
        label: Annotated[str, Form(min_length=1, max_length=2000, description="validated like every label: at most 512 bytes of UTF-8, no control characters")],
        image: Annotated[list[UploadFile], File(description="Reference images of the class")],
    ):
        return await store_uploads(service, image, validate_label(label, required=True), relabel=True)

    @app.post("/images", response_model=StoredImages)
    async def upload_images(
        service: ServiceDep,
        image: Annotated[list[UploadFile], File(description="Images to add to the catalog")],
        label: Annotated[str, Form(max_length=2000)] = "",
    ):
        return await store_uploads(service, image, validate_label(label), relabel=False)

    def stored_row(service: Service, image_id: str) -> dict:
        try:
            validate_id(image_id)
        except InvalidInputError:
            raise HTTPException(404, "no stored image with that id") from None
        row = service.store.get([image_id]).get(image_id)
        if row is None:
            raise HTTPException(404, "no stored image with that id")
        return row

    @app.delete("/images/{image_id}", response_model=Deleted)
    async def delete_image(service: ServiceDep, image_id: str):
        row = await asyncio.to_thread(stored_row, service, image_id)
        path = Path(row["path"]).resolve()
        uploaded = service.files.is_upload(row["path"])  # the service wrote it; catalog files are the user's
        async with service.write_lock:  # row and file go together, never while an upload is being ingested
            await asyncio.to_thread(service.store.delete, [image_id])
            removed = uploaded and path.is_file()  # content-named: no other row shares an uploaded file
            if removed:
                path.unlink()
        return Deleted(deleted=image_id, file_removed=removed)

    @app.get("/images/{image_id}", response_class=Response)
    async def get_image(service: ServiceDep, image_id: str, size: Annotated[int | None, Query(ge=16, le=1024)] = None):
        row = await asyncio.to_thread(stored_row, service, image_id)
        path = await asyncio.to_thread(service.files.servable, row["path"])
        if path is None:  # gone, or outside every folder that was ingested, enrolled or uploaded to
            raise HTTPException(404, "the file of this image is not available")
        if size is None:
            return FileResponse(path)

        def thumbnail() -> bytes:
            image = load_image(path, max_pixels=settings.max_image_pixels, min_side=size)
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=85)
            return buffer.getvalue()

        def header_pixels() -> int:
            try:
                with open(path, "rb") as handle:
                    return read_header(handle.read(1 << 20), max_pixels=settings.max_image_pixels, name=path.name)[0]
            except (ImageDecodeError, OSError):
                return settings.max_image_pixels  # unreadable from its first MiB: budget for the worst case

        try:
            async with service.budget.hold(await asyncio.to_thread(header_pixels)):
                return Response(await asyncio.to_thread(thumbnail), media_type="image/jpeg")
        except ImageDecodeError as error:
            raise HTTPException(422, f"stored file cannot be decoded: {error.reason}") from None

    @app.get("/metrics", response_class=Response)
    async def metrics_endpoint():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if STATIC.is_dir():
        app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
    return app


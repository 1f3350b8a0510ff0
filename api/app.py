"""The REST service: a thin FastAPI shell over the same core functions the CLI calls.

The encoder and the store are loaded once, in the lifespan; encoding runs off the event loop, and concurrent
requests share forward passes through the micro-batcher.
"""

from __future__ import annotations

import asyncio
import io
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field

from api.batching import MicroBatcher
from imgsearch.config import Settings, load_settings
from imgsearch.errors import CollectionNotFoundError, ImageDecodeError, ImgsearchError, TextNotSupportedError
from imgsearch.images import IMAGE_EXTENSIONS, load_image

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


class Service:
    """What the lifespan loads once: settings, encoder, store, batcher."""

    def __init__(self, settings: Settings) -> None:
        from imgsearch.encoders import encoder_from_settings
        from imgsearch.store import open_store

        self.settings = settings
        self.encoder = encoder_from_settings(settings)
        self.store = open_store(settings, self.encoder)
        self.batcher: MicroBatcher | None = None
        self.write_lock: asyncio.Lock | None = None


def check_key(request: Request) -> None:
    key = request.app.state.settings.api_key
    if key and request.headers.get("x-api-key") != key:
        raise HTTPException(401, "missing or wrong X-API-Key header")


def service_of(request: Request) -> Service:
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise HTTPException(503, "the service is still loading")
    return service


# Module level, so FastAPI can resolve them from these (string) annotations.
Guarded = Annotated[None, Depends(check_key)]
ServiceDep = Annotated[Service, Depends(service_of)]


def create_app(settings: Settings | None = None, service: Service | None = None) -> FastAPI:
    """The app; `service` is passed when the caller loaded it already (`imgsearch serve` does, to report a locked
    store or missing weights as one line before the server starts)."""
    settings = service.settings if service else (settings or load_settings())
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loaded = service or await asyncio.to_thread(Service, settings)
        loaded.batcher = MicroBatcher(
            loaded.encoder, max_batch=settings.batch_size, max_wait=settings.batch_wait_ms / 1000, observe=metrics.observe_batch
        )
        loaded.write_lock = asyncio.Lock()  # uploads and enrolments are written one at a time
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
        status = 404 if isinstance(error, CollectionNotFoundError) else 400
        return JSONResponse(status_code=status, content={"detail": str(error)})

    async def read_images(uploads: list[UploadFile], service: Service) -> list[tuple[str, Image.Image, bytes]]:
        decoded = []
        for upload in uploads:
            data = await upload.read(settings.max_upload_bytes + 1)
            if len(data) > settings.max_upload_bytes:
                raise HTTPException(413, f"{upload.filename or 'upload'} is larger than {settings.max_upload_bytes} bytes")
            if not data:
                raise HTTPException(422, f"{upload.filename or 'upload'} is empty")
            try:
                image = load_image(
                    data, max_pixels=settings.max_image_pixels, min_side=service.encoder.input_size, name=upload.filename or "upload"
                )
            except ImageDecodeError as error:
                raise HTTPException(422, f"{upload.filename or 'upload'}: {error.reason}") from None
            decoded.append((upload.filename or "upload", image, data))
        if not decoded:
            raise HTTPException(422, "send at least one image")
        return decoded

    @app.get("/health", response_model=Health)
    async def health(request: Request):
        if getattr(request.app.state, "service", None) is None:
            raise HTTPException(503, "loading")
        return Health(status="ok")

    @app.get("/info", response_model=Info)
    async def info(_: Guarded, service: ServiceDep):
        from imgsearch.store import describe_collection

        described = await asyncio.to_thread(describe_collection, settings.milvus_uri, settings.collection_name, settings.milvus_token)
        return Info(**described, supports_text=service.encoder.supports_text)

    @app.post("/search", response_model=SearchResponse)
    async def search(
        _: Guarded,
        service: ServiceDep,
        image: Annotated[UploadFile, File(description="The query image")],
        k: Annotated[int, Form(ge=1, le=1000)] = 10,
        filter: Annotated[str, Form(max_length=2000)] = "",
    ):
        [(_, decoded, _)] = await read_images([image], service)
        vectors = await service.batcher.encode([decoded])
        hits = (await asyncio.to_thread(service.store.search, vectors, k, filter))[0]
        return SearchResponse(results=[SearchHit(**hit.to_dict()) for hit in hits])

    @app.post("/search/text", response_model=SearchResponse)
    async def search_text(_: Guarded, service: ServiceDep, query: TextQuery):
        if not service.encoder.supports_text:
            raise HTTPException(400, f"model {service.encoder.name} has no text encoder; text search needs a CLIP model")
        try:
            vectors = await asyncio.to_thread(service.encoder.encode_text, [query.text])
        except TextNotSupportedError as error:
            raise HTTPException(400, str(error)) from None
        hits = (await asyncio.to_thread(service.store.search, vectors, query.k))[0]
        return SearchResponse(results=[SearchHit(**hit.to_dict()) for hit in hits])

    @app.post("/recognize", response_model=list[RecognitionOut])
    async def recognize(
        _: Guarded,
        service: ServiceDep,
        image: Annotated[list[UploadFile], File(description="One or more images")],
        k: Annotated[int, Form(ge=1, le=1024)] = 100,
        threshold: Annotated[float | None, Form()] = None,
    ):
        from imgsearch.recognize import recognize_vectors, resolve_threshold

        decoded = await read_images(image, service)
        vectors = await service.batcher.encode([item[1] for item in decoded])
        used, _ = await asyncio.to_thread(resolve_threshold, service.store, threshold if threshold is not None else settings.threshold)
        results = await asyncio.to_thread(recognize_vectors, service.store, vectors, k=k, threshold=used)
        return [
            RecognitionOut(path=name, label=label, confidence=confidence, neighbours=[NeighbourOut(**vars(n)) for n in neighbours])
            for (name, _, _), (label, confidence, neighbours) in zip(decoded, results)
        ]

    async def store_uploads(service: Service, uploads: list[UploadFile], label: str, relabel: bool) -> StoredImages:
        from ingest.catalog import CatalogEntry, bytes_sha256
        from ingest.pipeline import ingest_entries

        decoded = await read_images(uploads, service)
        folder = settings.upload_dir / (label or "_unlabeled")
        entries, ids = [], []
        for name, _, data in decoded:
            digest = bytes_sha256(data)
            suffix = Path(name).suffix.lower() if Path(name).suffix.lower() in IMAGE_EXTENSIONS else ".img"
            path = (folder / f"{digest[:16]}{suffix}").resolve()  # content-named: the client never picks a path
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                path.write_bytes(data)
            entries.append(CatalogEntry(path=path, label=label))
            ids.append(digest)
        async with service.write_lock:
            report = await asyncio.to_thread(
                ingest_entries, entries, service.encoder, service.store, relabel_duplicates=relabel, workers=0,
                batch_size=settings.batch_size, max_pixels=settings.max_image_pixels,
            )
        if report.failed:
            raise HTTPException(422, "; ".join(f"{Path(f['path']).name}: {f['error']}" for f in report.failed))
        return StoredImages(ids=ids, label=label, indexed=report.indexed, updated=report.updated, skipped=report.skipped)

    @app.post("/enroll", response_model=StoredImages)
    async def enroll(
        _: Guarded,
        service: ServiceDep,
        label: Annotated[str, Form(min_length=1, max_length=500)],
        image: Annotated[list[UploadFile], File(description="Reference images of the class")],
    ):
        if not label.strip():
            raise HTTPException(422, "label must not be blank")
        return await store_uploads(service, image, label.strip(), relabel=True)

    @app.post("/images", response_model=StoredImages)
    async def upload_images(
        _: Guarded,
        service: ServiceDep,
        image: Annotated[list[UploadFile], File(description="Images to add to the catalog")],
        label: Annotated[str, Form(max_length=500)] = "",
    ):
        return await store_uploads(service, image, label.strip(), relabel=False)

    def stored_row(service: Service, image_id: str) -> dict:
        if len(image_id) != 64 or any(c not in "0123456789abcdef" for c in image_id):
            raise HTTPException(404, f"no stored image {image_id}")
        row = service.store.get([image_id]).get(image_id)
        if row is None:
            raise HTTPException(404, f"no stored image {image_id}")
        return row

    @app.delete("/images/{image_id}", response_model=Deleted)
    async def delete_image(_: Guarded, service: ServiceDep, image_id: str):
        row = await asyncio.to_thread(stored_row, service, image_id)
        path = Path(row["path"]).resolve()
        uploaded = path.is_relative_to(settings.upload_dir.resolve())  # the service wrote it; catalog files are the user's
        async with service.write_lock:  # row and file go together, never while an upload is being ingested
            await asyncio.to_thread(service.store.delete, [image_id])
            removed = uploaded and path.is_file()
            if removed:
                path.unlink()
        return Deleted(deleted=image_id, file_removed=removed)

    @app.get("/images/{image_id}", response_class=Response)
    async def get_image(_: Guarded, service: ServiceDep, image_id: str, size: Annotated[int | None, Query(ge=16, le=1024)] = None):
        row = await asyncio.to_thread(stored_row, service, image_id)
        path = Path(row["path"])  # only paths recorded in the store are ever served
        if not path.is_file():
            raise HTTPException(404, f"the file of image {image_id} is gone: {path.name}")
        if size is None:
            return FileResponse(path)

        def thumbnail() -> bytes:
            image = load_image(path, max_pixels=settings.max_image_pixels, min_side=size)
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=85)
            return buffer.getvalue()

        try:
            return Response(await asyncio.to_thread(thumbnail), media_type="image/jpeg")
        except ImageDecodeError as error:
            raise HTTPException(422, f"stored file cannot be decoded: {error.reason}") from None

    @app.get("/metrics", response_class=Response)
    async def metrics_endpoint():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if STATIC.is_dir():
        app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
    return app


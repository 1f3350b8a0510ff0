"""The endpoints, grouped in routers; each is a few lines over a core function. Errors the core raises are mapped
to status codes in one place (app.py)."""

from __future__ import annotations

import asyncio
import logging
import mimetypes
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from imgsearch.api.models import (
    Deleted,
    DuplicateGroups,
    Health,
    Info,
    NeighbourOut,
    RecognitionOut,
    ReviewEnroll,
    ReviewEnrolled,
    ReviewGroup,
    SearchHit,
    SearchResponse,
    StoredImages,
    TextQuery,
)
from imgsearch.api.service import Service, refuse_when_stopping, service_of, service_of_its_embedding
from imgsearch.config import DUPLICATES_THRESHOLD_HELP, RECOGNITION_K, RECOGNITION_K_MAX
from imgsearch.errors import ImageDecodeError, ObjectStoreUnavailableError, StorageFullError
from imgsearch.validation import validate_label

log = logging.getLogger(__name__)

ServiceDep = Annotated[Service, Depends(service_of)]
EncodingServiceDep = Annotated[Service, Depends(service_of_its_embedding)]  # routes that encode or compare vectors
ImagesField = Annotated[list[UploadFile], File(description="One or more images")]
LabelField = Annotated[str, Form(max_length=2000, description="At most 512 bytes of UTF-8, no control characters")]

system = APIRouter(tags=["service"])
search = APIRouter(tags=["search and recognition"])
images = APIRouter(tags=["stored images"])


@system.get("/health", response_model=Health)
async def health(request: Request):
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise HTTPException(503, "loading")
    await service.check_store()  # Milvus down or restarting: 503 with Retry-After, like every other route
    await service.check_embedding()  # the alias moved to another embedding: this replica must restart
    return Health(status="ok")


@system.get("/info", response_model=Info)
async def info(service: ServiceDep):
    from imgsearch.session import describe_store

    described = await asyncio.to_thread(describe_store, service.settings)
    return Info(**described, supports_text=service.encoder.supports_text)


@system.get("/metrics", response_class=Response)
async def metrics(request: Request):
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def hits_out(service: Service, hits) -> SearchResponse:
    return SearchResponse(results=[SearchHit(**{**hit.to_dict(), "path": service.files.shown(hit.path)}) for hit in hits])


@search.post("/search", response_model=SearchResponse)
async def search_image(
    service: EncodingServiceDep,
    image: Annotated[UploadFile, File(description="The query image")],
    k: Annotated[int, Form(ge=1, le=1000)] = 10,
    filter: Annotated[str, Form(max_length=2000)] = "",
    label: Annotated[str, Form(max_length=2000, description="Only images with this label (the page's filter box)")] = "",
):
    from imgsearch.search import with_label

    [upload] = await service.read_images([image])
    vectors = await service.batcher.encode([upload.tensor])
    hits = (await asyncio.to_thread(service.store.search, vectors, k, with_label(filter, validate_label(label))))[0]
    return await asyncio.to_thread(hits_out, service, hits)  # showing paths may re-read the recorded folders


@search.post("/search/text", response_model=SearchResponse)
async def search_text(service: EncodingServiceDep, query: TextQuery):
    from imgsearch.search import search_text as search_by_text

    [result] = await asyncio.to_thread(search_by_text, service.encoder, service.store, [query.text], k=query.k)
    return await asyncio.to_thread(hits_out, service, result.results)


@search.post("/recognize", response_model=list[RecognitionOut])
async def recognize(
    service: EncodingServiceDep,
    image: ImagesField,
    k: Annotated[int, Form(ge=1, le=RECOGNITION_K_MAX)] = RECOGNITION_K,
    threshold: Annotated[float | None, Form(allow_inf_nan=False)] = None,
    keep_unknown: Annotated[bool, Form(description='keep the images answered "unknown" for GET /review')] = False,
):
    from imgsearch.recognition.abstention import resolve_abstention
    from imgsearch.recognition.knn import recognize_vectors

    uploads = await service.read_images(image)
    vectors = await service.batcher.encode([upload.tensor for upload in uploads])
    given = threshold if threshold is not None else service.settings.threshold
    rule = await asyncio.to_thread(resolve_abstention, service.store, given)
    results = await asyncio.to_thread(
        recognize_vectors, service.store, vectors, k=k, threshold=rule.threshold, margin=rule.margin, reference_counts=rule.reference_counts
    )
    unknown = {i: (upload, vector, result) for i, (upload, vector, result) in enumerate(zip(uploads, vectors, results)) if result[0] is None and result[2]}
    kept: dict[int, bool] = {}  # by upload's index: kept for review, or not (the review is full)
    if keep_unknown and unknown:
        async with service.write_lock:
            kept = await asyncio.to_thread(keep_uploads, service, unknown)

    def answers() -> list[RecognitionOut]:
        return [
            RecognitionOut(
                path=upload.name, label=label, confidence=confidence, **rule.to_dict(), kept_for_review=kept.get(i),
                neighbours=[NeighbourOut(**{**vars(n), "path": service.files.shown(n.path)}) for n in neighbours],
            )
            for i, (upload, (label, confidence, neighbours)) in enumerate(zip(uploads, results))
        ]

    return await asyncio.to_thread(answers)


def keep_uploads(service: Service, unknown: dict[int, tuple]) -> dict[int, bool]:
    """Unknown uploads (by index: upload, vector, answer) are saved like uploads (content-named) and kept for review
    with their vector, while the review holds fewer than IMGSEARCH_REVIEW_MAX; the others are not saved. Returns
    kept or not, by index."""
    from imgsearch.ingest.catalog import absolute, bytes_sha256
    from imgsearch.recognition.review import Kept, admit, store_admitted
    from imgsearch.uploads import save_upload

    limit = service.settings.review_max
    digests = {i: bytes_sha256(upload.data) for i, (upload, _, _) in unknown.items()}
    admitted = admit(service.review(), list(digests.values()), limit)
    kept = []
    for i, (upload, vector, (_, confidence, neighbours)) in unknown.items():
        if (digest := digests[i]) in admitted:
            try:
                path, _ = save_upload(upload.data, upload.image_format, service.settings.upload_dir)
            except StorageFullError as error:  # the answer matters more than keeping the image for review
                log.warning("an unknown upload was not kept for review: %s", error)
                admitted.discard(digest)
                continue
            kept.append(Kept(digest, str(path), vector, confidence, neighbours[0].label, upload=True))
    if kept:
        service.store.add_roots([absolute(service.settings.upload_dir)])
        store_admitted(service.review(), kept)
    return {i: digest in admitted for i, digest in digests.items()}


@images.get("/review", response_model=list[ReviewGroup])
async def review(service: ServiceDep):
    """The kept "unknown" queries in groups of similar images, as `imgsearch review` lists them."""
    from imgsearch.recognition.review import review_groups

    def answer() -> list[ReviewGroup]:
        groups = review_groups(service.review(create=False))
        return [ReviewGroup(group=g.number, key=g.key, members=[{**m, "path": service.files.shown(m["path"])} for m in g.members]) for g in groups]

    return await asyncio.to_thread(answer)


@images.post("/review/enroll", response_model=ReviewEnrolled)
async def enroll_from_review(service: EncodingServiceDep, body: ReviewEnroll):
    """Kept queries (group keys from GET /review, or ids) become references of `label`; nothing is encoded again."""
    from imgsearch.recognition.review import enroll_from_review as enroll

    label = validate_label(body.label, required=True)
    async with service.writing():
        enrolled = await asyncio.to_thread(  # opening the review collection may wait for Milvus: not on the loop
            lambda: enroll(service.store, label, body.select, service.review(create=False), recalibrate=False)
        )
    enrolled["calibration"], enrolled["calibration_pending"] = await service.recalibrate()
    return enrolled


@search.get("/duplicates", response_model=DuplicateGroups)
async def duplicates(
    service: EncodingServiceDep,
    threshold: Annotated[float | None, Query(ge=0, le=1, description=DUPLICATES_THRESHOLD_HELP)] = None,
    similar: Annotated[bool, Query(description="Also list unverified look-alikes (`similar`), apart from the groups")] = False,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many groups (and look-alike groups), closest first")] = 100,
):
    """Duplicate groups in the collection (identical content, or the same picture edited: checked on the pixels), as
    `imgsearch duplicates --json` gives them (paths as shown)."""
    from imgsearch.duplicates import ScanStopped, find_duplicates

    def scan():  # the CLI's defaults too: one place (config.py); given up when the service stops (a read: nothing lost)
        return find_duplicates(service.store, threshold=threshold, include_similar=similar, stop=lambda: service.stopping)

    try:
        report = await service.scans.run(("duplicates", threshold, similar), scan)
    except ScanStopped:
        refuse_when_stopping(True)

    def answer() -> DuplicateGroups:  # showing paths may re-read the recorded folders: off the loop
        def shown(item: dict) -> dict:
            copy_of = {"copy_of": service.files.shown(item["copy_of"])} if item.get("copy_of") else {}
            return {**item, "path": service.files.shown(item["path"]), **copy_of}

        def listed(groups: list) -> list[dict]:
            return [{"representative": shown(g.representative), "members": [shown(m.to_dict()) for m in g.members]} for g in groups[:limit]]

        lookalikes = None if report.lookalikes is None else listed(report.lookalikes)
        return DuplicateGroups(groups=listed(report.groups), total=len(report.groups), rows=report.rows, similar=lookalikes)

    return await asyncio.to_thread(answer)


async def store_uploads(service: Service, files: list[UploadFile], label: str, *, relabel: bool) -> StoredImages:
    from imgsearch.ingest.enroll import store_uploads as store

    uploads = [(upload.data, upload.image_format) for upload in await service.read_images(files)]
    async with service.writing(references=bool(label)):
        ids, report = await asyncio.to_thread(store, uploads, label, service.encoder, service.store, service.settings, relabel=relabel)
    calibration, pending = await service.recalibrate() if report.references_changed else (None, False)
    if report.failed:
        raise HTTPException(422, "; ".join(f"{service.files.shown(f['path'])}: {f['error']}" for f in report.failed))
    return StoredImages(
        ids=ids, label=label, indexed=report.indexed, updated=report.updated, skipped=report.skipped,
        check=report.enrolment_check, calibration=calibration, calibration_pending=pending,
    )


@images.post("/enroll", response_model=StoredImages)
async def enroll(service: EncodingServiceDep, label: Annotated[str, Form(min_length=1, max_length=2000)], image: ImagesField):
    """Reference images of a class; recognised from the next request on."""
    return await store_uploads(service, image, validate_label(label, required=True), relabel=True)


@images.post("/images", response_model=StoredImages)
async def add_images(service: EncodingServiceDep, image: ImagesField, label: LabelField = ""):
    return await store_uploads(service, image, validate_label(label), relabel=False)


@images.delete("/images/{image_id}", response_model=Deleted)
async def delete_image(service: ServiceDep, image_id: str):
    from imgsearch.deletion import delete_images, stored_image

    await asyncio.to_thread(stored_image, service.store, image_id)  # 404 for an unknown or malformed id
    async with service.writing():  # row and file go together, never while an upload is being ingested
        report = await asyncio.to_thread(
            lambda: delete_images(service.store, [image_id], service.settings.upload_dir, recalibrate=False, review=service.review(create=False))
        )
    if not report.deleted:  # deleted by someone else meanwhile
        raise HTTPException(404, "no stored image with that id")
    if report.deleted[0]["label"]:  # a reference went: recalibrate "unknown" in the background
        service.recalibration.request_in_background()
    return Deleted(deleted=report.deleted[0]["id"], file_removed=report.deleted[0]["file_removed"])


MAX_THUMBNAIL_SOURCE_BYTES = 100 << 20  # an object read whole to make a thumbnail (memory per request stays bounded)


async def object_response(location: str) -> StreamingResponse:
    """An object's bytes in blocks; a missing object is 404, an unreachable store 503 (before any byte is sent)."""
    from imgsearch import storage

    try:
        size, blocks = await asyncio.to_thread(storage.open_blocks, location)
    except FileNotFoundError:
        raise HTTPException(404, "the file of this image is not available") from None
    media_type = mimetypes.guess_type(location.rsplit("/", 1)[-1])[0] or "application/octet-stream"
    return StreamingResponse(blocks, media_type=media_type, headers={"Content-Length": str(size)})


def read_object_for_thumbnail(location: str) -> bytes:
    from imgsearch import storage

    try:
        if storage.stat(location).size > MAX_THUMBNAIL_SOURCE_BYTES:
            raise HTTPException(422, f"stored file is over {MAX_THUMBNAIL_SOURCE_BYTES >> 20} MiB: no thumbnail")
        return storage.read_bytes(location)[0]
    except FileNotFoundError:
        raise HTTPException(404, "the file of this image is not available") from None
    except storage.transport_errors() as error:
        raise ObjectStoreUnavailableError(f"cannot reach the object store: {storage.describe_error(error)}") from None


@images.get("/images/{image_id}", response_class=Response)
async def get_image(service: ServiceDep, image_id: str, size: Annotated[int | None, Query(ge=16, le=1024)] = None):
    from imgsearch.deletion import stored_image
    from imgsearch.images import file_pixels, thumbnail_jpeg

    row = await asyncio.to_thread(stored_image, service.store, image_id)
    path = await asyncio.to_thread(service.files.servable, row["path"])
    if path is None:  # gone, or outside every folder that was ingested, enrolled or uploaded to
        raise HTTPException(404, "the file of this image is not available")
    max_pixels = service.settings.max_image_pixels
    if isinstance(path, str):  # an object: streamed in blocks, or read whole (up to a bound) for a thumbnail
        if size is None:
            return await object_response(path)
        source = await asyncio.to_thread(read_object_for_thumbnail, path)
    else:
        if size is None:
            return FileResponse(path)
        source = path
    try:
        async with service.budget.hold(await asyncio.to_thread(file_pixels, source, max_pixels=max_pixels)):
            return Response(await asyncio.to_thread(thumbnail_jpeg, source, size, max_pixels=max_pixels), media_type="image/jpeg")
    except ImageDecodeError as error:  # the reason only: the message would carry the server's path
        raise HTTPException(422, f"stored file cannot be decoded: {error.reason}") from None

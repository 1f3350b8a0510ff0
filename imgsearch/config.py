"""Settings: flags override IMGSEARCH_* environment variables, which override these defaults."""

from __future__ import annotations

import json
import os
import re
from enum import Enum
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from imgsearch.errors import CollectionNotFoundError, UsageError
from imgsearch.storage import configure as configure_storage
from imgsearch.storage import is_url, secret_option

# Defaults the settings share with the library functions they feed (one place for each).
DEFAULT_REVIEW_MAX = 10_000  # queries kept for review (recognize --keep-unknown)
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_PIXELS = 64_000_000  # a larger image is refused before it is decoded (decompression bombs)
DEFAULT_UPSERT_CHUNK = 512
Runtime = Literal["auto", "torch", "onnx", "onnx-int8"]
RUNTIMES = get_args(Runtime)
WriterPlace = Literal["auto", "process", "thread"]
VectorIndex = Literal["auto", "hnsw", "ivf_sq8"]
LARGE_COLLECTION_ROWS = 1_000_000  # from here `auto` builds IVF_SQ8 on a server (docs/scaling.md, benchmarks/scale.py)
# Recognition: the labeled neighbours scored per query (why 100: recognition/scoring.py), and the most a request may ask.
RECOGNITION_K = 100
RECOGNITION_K_MAX = 1024
# Duplicates: pairs at or above CANDIDATES have their pixels checked (verification.py); unverified pairs at or above
# SIMILAR are the opt-in "similar" look-alikes (why these values: docs/duplicates.md).
CANDIDATES = 0.50
SIMILAR = 0.85
DUPLICATES_THRESHOLD_HELP = f"Least similarity of any pair checked or listed [default: pairs from {CANDIDATES} are checked, look-alikes listed from {SIMILAR}]"


class RecognitionMethod(str, Enum):
    knn = "knn"  # the labeled neighbours in Milvus
    head = "head"  # a classifier head from train-head


class HeadMode(str, Enum):
    linear = "linear"  # softmax regression on the stored vectors (seconds)
    finetune = "finetune"  # the last backbone stages and a new final layer, from the image files


HEAD_EPOCHS = {HeadMode.linear: 300, HeadMode.finetune: 10}
HEAD_STAGES = 3  # finetune: the last backbone stages unfrozen
ADAPT_EPOCHS = 6  # `imgsearch adapt`: epochs at most (the best on the held-out references is kept)
ADAPT_STAGES = 2  # its last backbone stages trained, with the projection (Lite0 has 9)
# its pull of each image towards its own frozen embedding, weighed against the margin loss: keeps what the base model
# knew about labels and photo edits it never trained on (docs/recognition.md)
ADAPT_DISTILL = 4.0
ADAPT_DISTILL_MAX = 100.0  # beyond this the margin loss no longer moves anything; infinity would train to NaN
# its pull of each pair of same-label images towards their frozen cosine: the margin loss alone makes different
# products of one type look like copies of each other (near-duplicate recall, 5-shot on unseen labels)
ADAPT_PAIR_DISTILL = 20.0
# the share of an adapted vector that is the base model's own embedding (the rest is the trained one): what the base
# model tells apart, photo edits above all, survives the margin loss (docs/recognition.md); 0 saves the adapted alone
ADAPT_FROZEN_SHARE = 0.7


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMGSEARCH_", extra="ignore")

    milvus_uri: str = Field("./imgsearch.db", description="Milvus Lite path (*.db) or server URI (http://host:19530)")
    milvus_token: str = Field("", description="Token or user:password for a secured Milvus server")
    store_retry_seconds: float = Field(
        60.0, ge=0, description="How long ingest, enroll, reindex, import and delete retry a Milvus server that is down or restarting "
        "(queries and the service answer at once: 503)"
    )
    collection: str | None = Field(None, description="Collection name; default: one per model, imgsearch_<model>")
    model: str = Field("efficientnet_lite0", description="Encoder name: efficientnet_lite0, torchvision/timm names, open_clip ARCH/TAG")
    weights: Path | None = Field(None, description="Local weights file for the encoder")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    runtime: Runtime = Field(
        "auto", description="auto: onnxruntime on a CPU (int8 for efficientnet_lite0 where the CPU has VNNI or dotprod, "
        "measured faster there), torch on CUDA"
    )
    cuda_graphs: bool = Field(True, description="On CUDA, run each full batch as one captured CUDA graph")
    onnx_cache: Path | None = Field(None, description="Where ONNX exports are cached; default ~/.cache/imgsearch/onnx")
    hash_cache: Path | None = Field(
        None, description="SQLite file of content hashes by path, size and mtime, so a re-ingest reads only changed files; "
        "default ~/.cache/imgsearch/file-hashes.sqlite",
    )
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, le=4096, description="Images per forward pass")
    workers: int | None = Field(None, ge=0, description="Decode worker processes; default: automatic (lanes, or workers, from the cores)")
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="Refuse images larger than this (decompression bombs)")
    upsert_chunk: int = Field(DEFAULT_UPSERT_CHUNK, ge=1, description="Rows per Milvus upsert call")
    writer: WriterPlace = Field(
        "auto", description="Where ingest upserts run: a child process with its own Milvus client, or a thread (auto: a thread, "
        "measured as fast on a CPU and on a GPU)"
    )
    index: VectorIndex = Field(
        "auto", description="The vector index a new collection on a Milvus server is built with: hnsw, or ivf_sq8 for millions "
        f"of rows (a quarter of HNSW's memory: 1M Lite0 vectors held in 3.1 GB); auto: ivf_sq8 for an import of {LARGE_COLLECTION_ROWS:,} rows "
        "or more, else hnsw. Milvus Lite builds its own",
    )
    ray_address: str = Field(
        "", description='ingest --ray: the Ray cluster ("auto": the one running on this machine, or host:port); '
        "default: start one on this machine for the run",
    )
    # off: on a 16-core H200 machine the CPU workers decoded faster than nvJPEG in the encoding process (docs/gpu.md)
    gpu_decode: bool = Field(False, description="On CUDA, decode baseline RGB JPEGs on the GPU (nvJPEG) during ingest")
    # The REST service (imgsearch serve)
    api_key: str | None = Field(None, description="When set, requests must send it in the X-API-Key header")
    cors_origins: list[str] = Field(default_factory=list, description='Origins allowed by CORS, e.g. ["https://shop.example"]')
    max_upload_bytes: int = Field(20_000_000, ge=1, description="Larger uploads are refused with 413")
    max_images_per_request: int = Field(16, ge=1, le=1000, description="More image fields in one request get 413")
    decode_pixel_budget: int = Field(
        64_000_000, ge=1,
        description="Pixels the service decodes at once across all requests; others wait (memory stays bounded)",
    )
    decode_wait_seconds: float = Field(30.0, ge=0, description="How long a request waits for decode budget before 503")
    calibration_wait_seconds: float = Field(
        5.0, ge=0, description='How long an enrolment request waits for the recalibrated "unknown" threshold; the rest runs on in the background'
    )
    stop_wait_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM, how long serve lets requests in flight finish before it cancels them and exits"
    )
    answer_paths: Literal["relative", "absolute"] = Field(
        "relative", description="REST answers show paths relative to their catalog folder, or absolute server paths"
    )
    public: list[Literal["docs", "metrics", "page"]] = Field(
        default_factory=list, description='With an API key set, parts served without it, e.g. ["page", "metrics"]'
    )
    upload_dir: str = Field(
        "./uploads", description="Where POST /images and /enroll store uploaded files: a folder, or an object-store URL shared by replicas (s3://bucket/uploads)"
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description='JSON handed to fsspec for s3:// locations, e.g. {"endpoint_url": "http://127.0.0.1:8333"}; '
        "credentials come from the standard chain (AWS_* variables, profile, instance role), never from here",
    )
    batch_wait_ms: float = Field(
        0.0, ge=0, description="How long the service waits for more requests to fill a batch; requests that queue "
        "during a forward pass join the next one anyway",
    )
    threshold: float | None = Field(
        None, allow_inf_nan=False, description="Recognition abstains below this confidence; default: the one `imgsearch eval` stored"
    )
    review_max: int = Field(
        DEFAULT_REVIEW_MAX, ge=0, description='Queries kept for review ("unknown" answers) at most; beyond it none are kept until some are enrolled or deleted',
    )

    @field_validator("storage_options", mode="before")
    @classmethod
    def _options_from_json(cls, value: Any) -> Any:
        """The flag gives JSON text, as the environment variable does."""
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except ValueError as error:
                raise ValueError(f"not JSON ({error})") from None
        if not isinstance(value, dict):
            raise ValueError("must be a JSON object")
        if key := secret_option(value):
            raise ValueError(
                f"holds credentials ({key!r}): they come from the standard chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, or the instance role), never from a setting"
            )
        return value

    @field_validator("upload_dir", mode="before")
    @classmethod
    def _absolute_upload_dir(cls, location: Any) -> Any:
        """A folder is made absolute once (the service serves and removes files under exactly it); a URL stays."""
        if isinstance(location, os.PathLike):
            location = os.fspath(location)
        if not isinstance(location, str):
            return location
        return location.rstrip("/") if is_url(location) else os.path.abspath(location)

    @field_validator("milvus_uri")
    @classmethod
    def _lite_path_without_trailing_slash(cls, uri: str) -> str:
        """`imgsearch.db/` (what tab completion gives: Lite's database is a folder) is the database imgsearch.db."""
        stripped = uri.rstrip("/")
        return stripped if "://" not in uri and stripped.endswith(".db") else uri

    @property
    def collection_name(self) -> str:
        return self.collection or default_collection_name(self.model)


def is_lite_uri(uri: str) -> bool:
    """A path ending in .db is an embedded Milvus Lite database; anything with a scheme is a server."""
    return uri.endswith(".db") and "://" not in uri


def check_lite_database_exists(uri: str) -> None:
    """Opening a missing Lite path would create an empty database: read-only commands stop here instead, before
    pymilvus is even imported."""
    if is_lite_uri(uri) and not Path(uri).exists():
        raise CollectionNotFoundError(f"no Milvus Lite database at {uri}; check --uri, or run `imgsearch ingest` first")


def default_collection_name(model: str, weights_id: str = "") -> str:
    """imgsearch_<model>, and an adapted embedding's id after it (reindex's default target); Milvus names allow
    letters, digits and underscores only."""
    return "imgsearch_" + re.sub(r"[^0-9A-Za-z_]", "_", model + (f"_{weights_id}" if weights_id else "")).lower()


def load_settings(**flags: Any) -> Settings:
    """Flags that were given (not None) are init arguments, which pydantic-settings ranks above the environment.
    A value that does not fit (a flag or an IMGSEARCH_* variable) is a UsageError naming the setting."""
    try:
        settings = Settings(**{key: value for key, value in flags.items() if value is not None})
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors())
        raise UsageError(f"invalid setting ({problems})") from None
    configure_storage(settings.storage_options)  # fsspec's filesystems are process-wide, and so are their options
    return settings

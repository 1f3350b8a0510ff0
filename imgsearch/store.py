"""MilvusStore: one collection per encoder, keyed by the SHA-256 of each image file's bytes.

A URI ending in `.db` is an embedded Milvus Lite directory; `http://host:port` is a server or cluster.
The collection's properties record the model, dim and preprocessing, and opening it with
another model is an error rather than a silent mix of incomparable vectors.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient  # noqa: E402
from pymilvus.exceptions import (  # noqa: E402
    ConnectError,
    ConnectionNotExistException,
    MilvusException,
    MilvusUnavailableException,
)

from imgsearch.config import check_lite_database_exists, is_lite_uri, shown_uri  # noqa: E402
from imgsearch.errors import (  # noqa: E402
    CollectionNotFoundError,
    ModelMismatchError,
    StoreError,
    StoreLockedError,
    StoreUnavailableError,
)
from imgsearch.validation import ID_LENGTH, LABEL_BYTES, PATH_BYTES, user_metadata  # noqa: E402

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
MODEL_PROPERTY = "imgsearch.model"
DIM_PROPERTY = "imgsearch.dim"
PREPROCESS_PROPERTY = "imgsearch.preprocess"
PRECISION_PROPERTY = "imgsearch.precision"  # the encoder's, "int8" or "fp32" (absent: fp32, made before int8 existed)
SCHEMA_PROPERTY = "imgsearch.schema"
# What makes vectors comparable: carried with every export and restored by its import (transfer.py).
IDENTITY_PROPERTIES = (MODEL_PROPERTY, DIM_PROPERTY, PREPROCESS_PROPERTY, PRECISION_PROPERTY)
RECOGNITION_PROPERTY = "imgsearch.recognition"  # the abstention threshold `imgsearch eval` calibrated
SELF_CALIBRATION_PROPERTY = "imgsearch.self_calibration"  # the one the references calibrate (abstention.py)
REFERENCE_COUNTS_PROPERTY = "imgsearch.reference_counts"  # references per label, as of that calibration
ROOTS_PROPERTY = "imgsearch.roots"  # the folders ingested or enrolled from: the only files the API serves
QUERY_CHUNK = 1000  # ids per `id in [...]` filter
# Searches read with Session consistency: a client sees its own writes (the API enrols and recognises through one
# client), and a server answers in ~2 ms instead of waiting ~200 ms for the next time tick as Strong does
# (measured on the 2.3.5 server). Counts and gets keep the collection's Strong level.
SEARCH_CONSISTENCY = "Session"
# HNSW (what AUTOINDEX builds on Lite and on a server) returns at most `ef` hits; Lite's default ef is 64, so a
# search for k = 300 gave 227 rows. Every search asks for ef >= k, and at least LITE_EF or SERVER_EF. On 100k
# clustered vectors, photo queries far from every cluster had recall@10 0.933 through the service at ef 256 and
# 0.950 at 512 on Lite, for a p50 of 111.8 -> 116.3 ms (Lite's per-search overhead dwarfs the graph walk); on the
# 2.3.5 server ef 512 added ~6-8 ms to a ~32 ms p50 (benchmarks/api.py --efs; docs/benchmarks.md).
LITE_EF = 512
SERVER_EF = 256


# pymilvus's code for "Fail connecting to server": the server is down or unreachable, not the request wrong.
CONNECT_FAILED = 2
UNREACHABLE_GRPC = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


@contextlib.contextmanager
def milvus_errors(action: str) -> Iterator[None]:
    """Milvus's refusals (a bad filter, an oversized value) become one StoreError line; a server that cannot be
    reached becomes StoreUnavailableError, so the API can answer 503 instead of blaming the request."""
    try:
        yield
    except (ConnectError, MilvusUnavailableException, ConnectionNotExistException) as error:
        raise StoreUnavailableError(f"{action} failed: Milvus is unreachable ({error.message})") from None
    except MilvusException as error:
        if error.code == CONNECT_FAILED:
            raise StoreUnavailableError(f"{action} failed: Milvus is unreachable ({error.message})") from None
        raise StoreError(f"{action} failed: {error.message}") from None
    except grpc.RpcError as error:  # a call cut off mid-flight can surface as gRPC's own error
        code = getattr(error, "code", lambda: None)()
        if code is not None and code.name in UNREACHABLE_GRPC:
            raise StoreUnavailableError(f"{action} failed: Milvus is unreachable ({code.name})") from None
        raise StoreError(f"{action} failed: {code.name if code else error}") from None


def upsert_rows(client: MilvusClient, collection: str, records: Sequence[ImageRecord]) -> None:
    """The one upsert, for MilvusStore and for ingest's writer process (its own client)."""
    if records:
        with milvus_errors("writing to Milvus"):
            client.upsert(collection, [record.to_row() for record in records])


@dataclass
class ImageRecord:
    id: str
    vector: np.ndarray | list[float]
    path: str
    label: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        vector = self.vector.tolist() if isinstance(self.vector, np.ndarray) else list(self.vector)
        return {"id": self.id, "vector": vector, "path": self.path, "label": self.label, "metadata": self.metadata}


@dataclass
class Hit:
    id: str
    score: float
    path: str
    label: str
    metadata: dict[str, Any]
    vector: np.ndarray | None = None  # only when asked for (recognition re-scores neighbours)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "score": self.score, "path": self.path, "label": self.label, "metadata": self.metadata}


def _check_lite_lock(uri: str) -> None:
    """Milvus Lite allows one process per data directory; say so in one line instead of a traceback."""
    lock_path = Path(uri) / "LOCK"
    if not lock_path.is_file():
        return
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLockedError(
                f"{uri} is in use by another process (Milvus Lite allows one process per .db). Stop that process, "
                f"or share the data through a server: `milvus-lite server --data-dir {uri} --port 19540` and "
                "IMGSEARCH_MILVUS_URI=http://127.0.0.1:19540, or a Milvus server URI"
            ) from None
        fcntl.flock(handle, fcntl.LOCK_UN)


class MilvusStore:
    def __init__(
        self,
        uri: str,
        collection: str,
        *,
        model: str,
        dim: int,
        preprocess_version: str = "",
        precision: str = "",
        token: str = "",
        create: bool = True,
    ) -> None:
        self.uri = uri
        self.collection = collection
        self.model = model
        self.dim = dim
        self.preprocess_version = preprocess_version
        self.precision = precision
        self.token = token
        self.client = self._connect(uri, token, create)
        with milvus_errors(f"opening collection {collection}"):
            exists = self.client.has_collection(collection)
            if exists:
                self._check_model(self.client.describe_collection(collection))
                self.client.load_collection(collection)
            elif create:
                self._create()
        if not exists and not create:
            raise _collection_not_found(collection, uri)

    @classmethod
    def open_existing(cls, uri: str, collection: str, token: str = "") -> MilvusStore:
        """Open a collection as the model it records, without loading an encoder (info, export)."""
        client = cls._connect(uri, token, create=False)
        try:
            with milvus_errors(f"opening collection {collection}"):
                exists = client.has_collection(collection)
                properties = (client.describe_collection(collection).get("properties") or {}) if exists else {}
            if not exists:
                raise _collection_not_found(collection, uri)
        finally:
            client.close()
        # A collection imgsearch did not create records no model; the constructor's guard says so.
        return cls(
            uri,
            collection,
            model=properties.get(MODEL_PROPERTY, ""),
            dim=int(properties.get(DIM_PROPERTY, 0)),
            preprocess_version=properties.get(PREPROCESS_PROPERTY, ""),
            token=token,
            create=False,
        )

    @staticmethod
    def _connect(uri: str, token: str, create: bool = True) -> MilvusClient:
        quiet_milvus_logs()
        if not create:
            check_lite_database_exists(uri)
        if is_lite_uri(uri):
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            return MilvusClient(uri=uri, token=token)
        except MilvusException as error:
            if is_lite_uri(uri):
                _check_lite_lock(uri)  # within one process pymilvus shares the database; only others are locked out
            raise StoreError(f"cannot open Milvus at {shown_uri(uri)}: {error.message}") from None

    def _create(self) -> None:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_LENGTH)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("label", DataType.VARCHAR, max_length=LABEL_BYTES)
        schema.add_field("path", DataType.VARCHAR, max_length=PATH_BYTES)
        schema.add_field("metadata", DataType.JSON)
        index_params = self.client.prepare_index_params()
        # Built as data arrives (Lite ignores build parameters; a server needs them for HNSW).
        index_params.add_index("vector", index_type="AUTOINDEX", metric_type="COSINE")
        self.client.create_collection(
            self.collection,
            schema=schema,
            index_params=index_params,
            consistency_level="Strong",
            properties={
                MODEL_PROPERTY: self.model,
                DIM_PROPERTY: str(self.dim),
                PREPROCESS_PROPERTY: self.preprocess_version,
                PRECISION_PROPERTY: self.precision or "fp32",
                SCHEMA_PROPERTY: SCHEMA_VERSION,
            },
        )
        log.info("created collection %s for %s (dim %d)", self.collection, self.model, self.dim)

    def _check_model(self, description: dict[str, Any]) -> None:
        properties = description.get("properties") or {}
        stored_model = properties.get(MODEL_PROPERTY)
        stored_dim = properties.get(DIM_PROPERTY)
        if not stored_model:
            raise ModelMismatchError(
                f"collection {self.collection} at {shown_uri(self.uri)} was not created by imgsearch (no model recorded); "
                "choose another --collection"
            )
        if stored_model != self.model or stored_dim != str(self.dim):
            raise _model_mismatch(self.collection, stored_model, stored_dim, self.model, self.dim)
        stored_preprocess = properties.get(PREPROCESS_PROPERTY, "")
        if self.preprocess_version and stored_preprocess != self.preprocess_version:
            log.warning(
                "collection %s was filled with preprocessing %r, this encoder uses %r; scores may shift",
                self.collection,
                stored_preprocess,
                self.preprocess_version,
            )
        stored_precision = properties.get(PRECISION_PROPERTY, "fp32")
        if self.precision and stored_precision != self.precision:
            log.warning(
                "collection %s was filled by the %s encoder, this one is %s: scores shift by about 0.01 (--runtime %s matches it)",
                self.collection, stored_precision, self.precision, "onnx-int8" if stored_precision == "int8" else "onnx",
            )

    # --- writes -------------------------------------------------------------------------------
    def upsert(self, records: Sequence[ImageRecord]) -> None:
        upsert_rows(self.client, self.collection, records)

    def writer_uri(self) -> str | None:
        """Where another process can write to this collection: the server URI, or for Milvus Lite the loopback
        address of the gRPC server pymilvus started for the file in this process; None if there is none."""
        if not is_lite_uri(self.uri):
            return self.uri
        entry = self._lite_server()
        return f"http://127.0.0.1:{entry[2]}" if entry else None

    def delete(self, ids: Sequence[str]) -> int:
        deleted = 0
        for start in range(0, len(ids), QUERY_CHUNK):
            chunk = list(ids[start : start + QUERY_CHUNK])
            with milvus_errors("delete"):
                result = self.client.delete(self.collection, ids=chunk)
            deleted += result.get("delete_count", len(chunk)) if isinstance(result, dict) else len(chunk)
        return deleted

    def flush(self) -> None:
        """Seal what was written so a crash after this returns loses nothing on a server."""
        with milvus_errors("flush"):
            self.client.flush(self.collection)

    # --- Milvus Lite's index ---------------------------------------------------------------------
    # Milvus Lite 3.2 (read in its engine/collection.py, and measured: docs/scaling.md) keeps new rows in a memtable
    # searched by brute force, until 128 MB of them are flushed to a segment; a background thread then compacts
    # segments (up to 100k rows each) and builds each new segment's HNSW index. A segment is searched by brute
    # force until its index is built, and the process waits for the builds at exit. There is no public call for
    # this, so these two reach the in-process Lite collection; on a server, or a Lite they do not recognise, they
    # do nothing.
    def wait_for_index(self) -> float:
        """Block until Milvus Lite's background index builds are done; the seconds waited (0 on a server)."""
        collection = self._lite_collection()
        if collection is None or not hasattr(collection, "_wait_for_bg"):
            return 0.0
        started = time.perf_counter()
        collection._wait_for_bg()
        return time.perf_counter() - started

    def index_coverage(self) -> tuple[int, int] | None:
        """(rows that searches reach through an index, all rows, deleted included) on Milvus Lite; None elsewhere."""
        collection = self._lite_collection()
        try:
            segments = collection._segments_snapshot()
            indexed = sum(segment.num_rows for segment in segments if "vector" in segment.indexes)
            return indexed, sum(segment.num_rows for segment in segments) + collection._memtable.size()
        except AttributeError:
            return None

    def _lite_collection(self) -> Any:
        entry = self._lite_server()
        try:
            return entry[1].get_collection(self.collection) if entry else None
        except Exception:  # another Lite's internals: no waiting, no coverage, nothing else changes
            return None

    def _lite_server(self) -> tuple | None:
        """(gRPC server, database, port) that pymilvus started in this process for a Lite file, or None."""
        if not is_lite_uri(self.uri):
            return None
        try:
            from milvus_lite.server_manager import server_manager_instance

            entry = server_manager_instance._servers.get(os.path.abspath(self.uri))
            return entry if isinstance(entry, tuple) and len(entry) == 3 else None
        except Exception:  # another Lite's internals
            return None

    # --- reads --------------------------------------------------------------------------------
    def get(self, ids: Sequence[str], fields: Sequence[str] = ("id", "path", "label", "metadata")) -> dict[str, dict]:
        """Rows by id (missing ids are absent from the result)."""
        found: dict[str, dict] = {}
        for start in range(0, len(ids), QUERY_CHUNK):
            chunk = list(ids[start : start + QUERY_CHUNK])
            with milvus_errors("reading rows"):
                rows = self.client.get(self.collection, ids=chunk, output_fields=list(fields))
            for row in rows:
                found[row["id"]] = dict(row)
        return found

    def ids_starting_with(self, prefix: str, limit: int = 2) -> list[str]:
        """Up to `limit` stored ids that start with `prefix` (hex: the caller checks it)."""
        with milvus_errors("reading rows"):
            rows = self.client.query(self.collection, filter=f"id like {string_literal(prefix + '%')}", output_fields=["id"], limit=limit)
        return [row["id"] for row in rows]

    def count(self) -> int:
        with milvus_errors("count"):
            result = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(result[0]["count(*)"])

    def label_counts(self, labels: Iterable[str]) -> dict[str, int]:
        """How many rows carry each of `labels`."""
        counts = {}
        for label in labels:
            with milvus_errors("count"):
                result = self.client.query(
                    self.collection, filter=f"label == {string_literal(label)}", output_fields=["count(*)"]
                )
            counts[label] = int(result[0]["count(*)"])
        return counts

    def iter_rows(self, fields: Sequence[str] = ("id", "path"), batch_size: int = 1000, filter: str = "") -> Iterator[dict]:
        with milvus_errors("reading rows"):
            iterator = self.client.query_iterator(
                self.collection, batch_size=batch_size, filter=filter, output_fields=list(fields)
            )
        try:
            while True:
                with milvus_errors("reading rows"):
                    batch = iterator.next()
                if not batch:
                    break
                yield from batch
        finally:
            iterator.close()

    def search(
        self,
        vectors: np.ndarray,
        k: int = 10,
        filter: str = "",
        search_params: dict | None = None,
        with_vectors: bool = False,
        fields: Sequence[str] = ("path", "label", "metadata"),
    ) -> list[list[Hit]]:
        """The k nearest rows to each vector, best first. `fields`: what each hit carries besides id and score
        (fewer is faster: near-duplicate search asks only for paths; an empty list makes Milvus return every
        field, vectors included)."""
        fields = list(fields) + (["vector"] if with_vectors else [])
        params = dict(search_params or {})
        params["params"] = {**params.get("params", {})}
        default_ef = LITE_EF if is_lite_uri(self.uri) else SERVER_EF
        params["params"]["ef"] = max(k, int(params["params"].get("ef", default_ef)))
        with milvus_errors("search"):
            results = self.client.search(
                self.collection,
                data=[np.asarray(vector, dtype=np.float32).tolist() for vector in vectors],
                limit=k,
                filter=filter,
                output_fields=fields,
                search_params=params,
                consistency_level=SEARCH_CONSISTENCY,
            )
        return [
            [
                Hit(
                    id=hit["id"],
                    score=float(hit["distance"]),
                    path=hit["entity"].get("path", ""),
                    label=hit["entity"].get("label", ""),
                    metadata=user_metadata(hit["entity"].get("metadata")),
                    vector=np.asarray(hit["entity"]["vector"], dtype=np.float32) if with_vectors else None,
                )
                for hit in hits
            ]
            for hits in results
        ]

    def resolved_name(self) -> str:
        """The collection behind this store's name (an alias resolves to its collection)."""
        with milvus_errors("describe collection"):
            return self.client.describe_collection(self.collection).get("collection_name", self.collection)

    def point_alias(self, alias: str) -> None:
        """Make `alias` name this collection, atomically moving it if it named another."""
        try:
            existing = alias in self.client.list_aliases().get("aliases", [])
            if existing:
                self.client.alter_alias(self.collection, alias)
            else:
                self.client.create_alias(self.collection, alias)
        except MilvusException as error:
            hint = " (Milvus Lite has no aliases: use a Milvus server)" if is_lite_uri(self.uri) else ""
            raise StoreError(f"cannot point alias {alias} at {self.collection}: {error.message}{hint}") from None

    def properties(self) -> dict[str, str]:
        with milvus_errors("describe collection"):
            return dict(self.client.describe_collection(self.collection).get("properties") or {})

    def roots(self) -> list[str]:
        """The folders images were ingested or enrolled from (absolute, as walked)."""
        try:
            roots = json.loads(self.properties().get(ROOTS_PROPERTY) or "[]")
        except ValueError:
            return []
        return [root for root in roots if isinstance(root, str)]

    def add_roots(self, folders: Iterable[str | os.PathLike[str]]) -> None:
        """Record catalog folders (or single files); one inside a root already recorded adds nothing."""
        roots = self.roots()
        changed = False
        for folder in folders:
            folder = os.path.abspath(folder)
            if any(_is_within(folder, root) for root in roots):
                continue
            roots = [root for root in roots if not _is_within(root, folder)] + [folder]
            changed = True
        if changed:
            self.set_properties({ROOTS_PROPERTY: json.dumps(sorted(roots))})

    def set_properties(self, properties: dict[str, str]) -> None:
        try:
            self.client.alter_collection_properties(self.collection, properties=properties)
        except MilvusException as error:
            raise StoreError(f"cannot update collection {self.collection} properties: {error.message}") from None

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> MilvusStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(settings, encoder, *, create: bool = True, encodes_images: bool = True) -> MilvusStore:
    """The store for `settings` with `encoder`'s identity; the one way CLI and API open it. `encodes_images=False`
    (a text-only search): the encoder's precision is not the collection's business."""
    return MilvusStore(
        settings.milvus_uri,
        settings.collection_name,
        model=encoder.name,
        dim=encoder.dim,
        preprocess_version=encoder.preprocess_version,
        precision=encoder.precision if encodes_images else "",
        token=settings.milvus_token,
        create=create,
    )


def collection_properties(uri: str, collection: str, token: str = "") -> dict[str, str] | None:
    """The properties `collection` was stored with, None if it does not exist yet; creates nothing."""
    if is_lite_uri(uri) and not Path(uri).exists():
        return None
    client = MilvusStore._connect(uri, token, create=False)
    try:
        with milvus_errors("describe collection"):
            if not client.has_collection(collection):
                return None
            return dict(client.describe_collection(collection).get("properties") or {})
    finally:
        client.close()


def check_model_name(properties: dict[str, str], model: str, collection: str) -> None:
    """ModelMismatchError when the collection records another model than `model` (a name as given): checked
    before that model is loaded (or exported), so the mistake is one line at once."""
    stored_model = properties.get(MODEL_PROPERTY)
    if stored_model and stored_model != model:
        from imgsearch.encoders import canonical_model_name

        if stored_model != canonical_model_name(model):
            raise _model_mismatch(collection, stored_model, properties.get(DIM_PROPERTY), canonical_model_name(model))


def _model_mismatch(collection: str, stored_model: str, stored_dim: str | None, model: str, dim: int | None = None) -> ModelMismatchError:
    asked = f"model {model}" + (f" (dim {dim})" if dim is not None else "")
    return ModelMismatchError(
        f"collection {collection} holds vectors of model {stored_model} (dim {stored_dim}), but {asked} was asked for; "
        f"use --model {stored_model}, or another --collection"
    )


def string_literal(text: str) -> str:
    """`text` as a string in a Milvus filter expression. Milvus reads \\ and \" but not JSON's \\uXXXX, so
    json.dumps broke every label outside ASCII ("café"); labels hold no control characters (validation)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def quiet_milvus_logs() -> None:
    """pymilvus logs every refused call with a traceback before raising; imgsearch reports the error itself
    in one line. `imgsearch -v` turns them back on."""
    verbose = logging.getLogger().level <= logging.INFO
    for noisy in ("pymilvus", "milvus_lite", "grpc._server"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.CRITICAL)


def _collection_not_found(collection: str, uri: str) -> CollectionNotFoundError:
    return CollectionNotFoundError(f"collection {collection} does not exist at {shown_uri(uri)}; run `imgsearch ingest` first")


def check_collection_exists(uri: str, collection: str, token: str = "") -> None:
    """CollectionNotFoundError unless `collection` exists at `uri`; creates nothing (no Lite file either)."""
    client = MilvusStore._connect(uri, token, create=False)
    try:
        with milvus_errors("listing collections"):
            exists = client.has_collection(collection)
    finally:
        client.close()
    if not exists:
        raise _collection_not_found(collection, uri)


def describe_collection(uri: str, collection: str, token: str = "") -> dict[str, Any]:
    """What is stored, without loading an encoder (for `imgsearch info`)."""
    try:
        store = MilvusStore.open_existing(uri, collection, token)
    except CollectionNotFoundError:
        return {"collection": collection, "uri": shown_uri(uri), "exists": False, "count": 0, "model": None, "dim": None}
    with store:
        properties = store.properties()
        return {
            "collection": collection,
            "uri": shown_uri(uri),
            "exists": True,
            "count": store.count(),
            "model": store.model,
            "dim": store.dim,
            "preprocess": store.preprocess_version,
            "precision": properties.get(PRECISION_PROPERTY, "fp32"),
            "recognition": _json_property(properties, RECOGNITION_PROPERTY),
            "self_calibration": _json_property(properties, SELF_CALIBRATION_PROPERTY),
        }


def _json_property(properties: dict[str, str], key: str) -> Any:
    try:
        return json.loads(properties.get(key) or "null")
    except ValueError:
        return None

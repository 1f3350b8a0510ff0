"""MilvusStore: one collection per encoder, keyed by the SHA-256 of each image file's bytes.

A URI ending in `.db` is an embedded Milvus Lite directory; `http://host:port` is a server or cluster.
The collection's properties record the model, dim and preprocessing, and opening it with
another model is an error rather than a silent mix of incomparable vectors.
"""

from __future__ import annotations

import fcntl
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pymilvus import DataType, MilvusClient  # noqa: E402
from pymilvus.exceptions import MilvusException  # noqa: E402

from imgsearch.errors import CollectionNotFoundError, ModelMismatchError, StoreError, StoreLockedError  # noqa: E402

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
MODEL_PROPERTY = "imgsearch.model"
DIM_PROPERTY = "imgsearch.dim"
PREPROCESS_PROPERTY = "imgsearch.preprocess"
SCHEMA_PROPERTY = "imgsearch.schema"
RECOGNITION_PROPERTY = "imgsearch.recognition"  # the abstention threshold `imgsearch eval` calibrated
ID_LENGTH = 64  # hex SHA-256
LABEL_LENGTH = 512
PATH_LENGTH = 4096
QUERY_CHUNK = 1000  # ids per `id in [...]` filter
# Searches read with Session consistency: a client sees its own writes (the API enrols and recognises through one
# client), and a server answers in ~2 ms instead of waiting ~200 ms for the next time tick as Strong does
# (measured on the 2.3.5 server). Counts and gets keep the collection's Strong level.
SEARCH_CONSISTENCY = "Session"


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


def is_lite_uri(uri: str) -> bool:
    return uri.endswith(".db") and "://" not in uri


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
        token: str = "",
        create: bool = True,
    ) -> None:
        self.uri = uri
        self.collection = collection
        self.model = model
        self.dim = dim
        self.preprocess_version = preprocess_version
        self.client = self._connect(uri, token)
        if self.client.has_collection(collection):
            self._check_model(self.client.describe_collection(collection))
            self.client.load_collection(collection)
        elif create:
            self._create()
        else:
            raise _collection_not_found(collection, uri)

    @classmethod
    def open_existing(cls, uri: str, collection: str, token: str = "") -> "MilvusStore":
        """Open a collection as the model it records, without loading an encoder (info, export)."""
        client = cls._connect(uri, token)
        try:
            if not client.has_collection(collection):
                raise _collection_not_found(collection, uri)
            properties = client.describe_collection(collection).get("properties") or {}
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
    def _connect(uri: str, token: str) -> MilvusClient:
        if is_lite_uri(uri):
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            # The embedded server logs handled errors as tracebacks; imgsearch reports them itself.
            logging.getLogger("milvus_lite").setLevel(logging.CRITICAL)
            logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
        try:
            return MilvusClient(uri=uri, token=token)
        except MilvusException as error:
            if is_lite_uri(uri):
                _check_lite_lock(uri)  # within one process pymilvus shares the database; only others are locked out
            raise StoreError(f"cannot open Milvus at {uri}: {error.message}") from None

    def _create(self) -> None:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_LENGTH)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("label", DataType.VARCHAR, max_length=LABEL_LENGTH)
        schema.add_field("path", DataType.VARCHAR, max_length=PATH_LENGTH)
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
                f"collection {self.collection} at {self.uri} was not created by imgsearch (no model recorded); "
                "choose another --collection"
            )
        if stored_model != self.model or stored_dim != str(self.dim):
            raise ModelMismatchError(
                f"collection {self.collection} holds vectors of model {stored_model} (dim {stored_dim}), "
                f"but model {self.model} (dim {self.dim}) was asked for; use --model {stored_model}, "
                "or another --collection"
            )
        stored_preprocess = properties.get(PREPROCESS_PROPERTY, "")
        if self.preprocess_version and stored_preprocess != self.preprocess_version:
            log.warning(
                "collection %s was filled with preprocessing %r, this encoder uses %r; scores may shift",
                self.collection,
                stored_preprocess,
                self.preprocess_version,
            )

    # --- writes -------------------------------------------------------------------------------
    def upsert(self, records: Sequence[ImageRecord]) -> None:
        if records:
            self.client.upsert(self.collection, [record.to_row() for record in records])

    def delete(self, ids: Sequence[str]) -> int:
        deleted = 0
        for start in range(0, len(ids), QUERY_CHUNK):
            chunk = list(ids[start : start + QUERY_CHUNK])
            result = self.client.delete(self.collection, ids=chunk)
            deleted += result.get("delete_count", len(chunk)) if isinstance(result, dict) else len(chunk)
        return deleted

    def flush(self) -> None:
        """Seal what was written so a crash after this returns loses nothing on a server."""
        self.client.flush(self.collection)

    # --- reads --------------------------------------------------------------------------------
    def get(self, ids: Sequence[str], fields: Sequence[str] = ("id", "path", "label", "metadata")) -> dict[str, dict]:
        """Rows by id (missing ids are absent from the result)."""
        found: dict[str, dict] = {}
        for start in range(0, len(ids), QUERY_CHUNK):
            chunk = list(ids[start : start + QUERY_CHUNK])
            for row in self.client.get(self.collection, ids=chunk, output_fields=list(fields)):
                found[row["id"]] = dict(row)
        return found

    def count(self) -> int:
        result = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(result[0]["count(*)"])

    def label_counts(self, labels: Iterable[str]) -> dict[str, int]:
        """How many rows carry each of `labels`."""
        counts = {}
        for label in labels:
            result = self.client.query(self.collection, filter=f"label == {json.dumps(label)}", output_fields=["count(*)"])
            counts[label] = int(result[0]["count(*)"])
        return counts

    def iter_rows(self, fields: Sequence[str] = ("id", "path"), batch_size: int = 1000, filter: str = "") -> Iterator[dict]:
        iterator = self.client.query_iterator(
            self.collection, batch_size=batch_size, filter=filter, output_fields=list(fields)
        )
        try:
            while batch := iterator.next():
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
    ) -> list[list[Hit]]:
        fields = ["path", "label", "metadata"] + (["vector"] if with_vectors else [])
        try:
            results = self.client.search(
                self.collection,
                data=[np.asarray(vector, dtype=np.float32).tolist() for vector in vectors],
                limit=k,
                filter=filter,
                output_fields=fields,
                search_params=search_params or {},
                consistency_level=SEARCH_CONSISTENCY,
            )
        except MilvusException as error:
            raise StoreError(f"search failed: {error.message}") from None
        return [
            [
                Hit(
                    id=hit["id"],
                    score=float(hit["distance"]),
                    path=hit["entity"].get("path", ""),
                    label=hit["entity"].get("label", ""),
                    metadata=hit["entity"].get("metadata") or {},
                    vector=np.asarray(hit["entity"]["vector"], dtype=np.float32) if with_vectors else None,
                )
                for hit in hits
            ]
            for hits in results
        ]

    def resolved_name(self) -> str:
        """The collection behind this store's name (an alias resolves to its collection)."""
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
        return dict(self.client.describe_collection(self.collection).get("properties") or {})

    def set_properties(self, properties: dict[str, str]) -> None:
        try:
            self.client.alter_collection_properties(self.collection, properties=properties)
        except MilvusException as error:
            raise StoreError(f"cannot update collection {self.collection} properties: {error.message}") from None

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "MilvusStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(settings, encoder, *, create: bool = True) -> MilvusStore:
    """The store for `settings` with `encoder`'s identity; the one way CLI and API open it."""
    return MilvusStore(
        settings.milvus_uri,
        settings.collection_name,
        model=encoder.name,
        dim=encoder.dim,
        preprocess_version=encoder.preprocess_version,
        token=settings.milvus_token,
        create=create,
    )


def _collection_not_found(collection: str, uri: str) -> CollectionNotFoundError:
    return CollectionNotFoundError(f"collection {collection} does not exist at {uri}; run `imgsearch ingest` first")


def describe_collection(uri: str, collection: str, token: str = "") -> dict[str, Any]:
    """What is stored, without loading an encoder (for `imgsearch info`)."""
    try:
        store = MilvusStore.open_existing(uri, collection, token)
    except CollectionNotFoundError:
        return {"collection": collection, "uri": uri, "exists": False, "count": 0, "model": None, "dim": None}
    with store:
        return {
            "collection": collection,
            "uri": uri,
            "exists": True,
            "count": store.count(),
            "model": store.model,
            "dim": store.dim,
            "preprocess": store.preprocess_version,
            "recognition": json.loads(store.properties().get(RECOGNITION_PROPERTY, "null") or "null"),
        }

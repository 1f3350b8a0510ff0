"""MilvusStore: one collection per encoder, keyed by the SHA-256 of each image file's bytes.

A URI ending in `.db` is an embedded Milvus Lite directory; `http://host:port` is a server or cluster. Every call to
the client goes through `milvus_errors`, so an unreachable server is always StoreUnavailableError (503 in the API).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.client.types import LoadState
from pymilvus.client.utils import mkts_from_unixtime

from imgsearch.config import check_lite_database_exists, is_lite_uri
from imgsearch.errors import CollectionNotFoundError, EmbeddingMovedError, ModelMismatchError, StoreError, StoreUnavailableError
from imgsearch.storage import is_url, shown_uri
from imgsearch.store import lite, retry
from imgsearch.store import search_params as index_rules
from imgsearch.store.errors import milvus_errors
from imgsearch.store.schema import (
    DIM_PROPERTY,
    MODEL_PROPERTY,
    PRECISION_PROPERTY,
    PRECISIONS,
    PREPROCESS_PROPERTY,
    ROOTS_PROPERTY,
    SCHEMA_PROPERTY,
    SCHEMA_VERSION,
    WEIGHTS_PROPERTY,
    Hit,
    ImageRecord,
    check_identity,
    label_is,
    string_literal,
)
from imgsearch.validation import ID_LENGTH, LABEL_BYTES, PATH_BYTES, user_metadata

log = logging.getLogger(__name__)

QUERY_CHUNK = 1000  # ids per `id in [...]` filter
# Searches read with Session consistency: a client sees its own writes (the API enrols and recognises through one
# client), and a server answers in ~2 ms instead of waiting ~200 ms for the next time tick as Strong does
# (measured on the 2.3.5 server). Counts and gets keep the collection's Strong level.
SEARCH_CONSISTENCY = "Session"
HEALTH_TIMEOUT_SECONDS = 2.0
# Reads hand vectors over as numpy views of one float32 array per call, not lists of Python floats: those
# (1,280 objects a row) fragmented a long-running service's heap, whose RSS a duplicates scan then raised for good
VECTORS_AS_ARRAYS = {"strict_float32": True}


def upsert_rows(client: MilvusClient, collection: str, records: Sequence[ImageRecord]) -> None:
    """The one upsert, for MilvusStore and for ingest's writer process (its own client)."""
    if records:
        with milvus_errors("writing to Milvus"):
            client.upsert(collection, [record.to_row() for record in records])


def connect(uri: str, token: str, create: bool = True, retry_window: float | None = None) -> MilvusClient:
    """A client for `uri`; with create=False a missing Lite path is refused instead of made. On a server its calls
    (and this connection) are retried while Milvus is down or restarting, for `retry_window` seconds (default: the
    process's, store/retry.py)."""
    quiet_milvus_logs()
    if not create:
        check_lite_database_exists(uri)
    window = 0.0 if is_lite_uri(uri) else retry.retry_window() if retry_window is None else retry_window
    if is_lite_uri(uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    try:
        with milvus_errors(f"opening Milvus at {shown_uri(uri)}"):
            client = retry.call_with_retry(lambda: MilvusClient(uri=uri, token=token), "connecting to Milvus", window)
    except StoreError:
        if is_lite_uri(uri):
            lite.check_lock(uri)  # another process's lock is the likely cause; this process's is not
        raise
    return retry.RetryingClient(client, window) if window > 0 else client


def quiet_milvus_logs() -> None:
    """pymilvus logs every refused call with a traceback before raising; imgsearch reports the error itself
    in one line. `imgsearch -v` turns them back on."""
    verbose = logging.getLogger().level <= logging.INFO
    for noisy in ("pymilvus", "milvus_lite", "grpc._server"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.CRITICAL)


def collection_not_found(collection: str, uri: str) -> CollectionNotFoundError:
    return CollectionNotFoundError(f"collection {collection} does not exist at {shown_uri(uri)}; run `imgsearch ingest` first")


_LAZY_IMPORTS = threading.Lock()


def settle_pymilvus_lazy_imports() -> None:
    """Run pymilvus's one-time check for scipy.sparse now, in one thread. pymilvus makes it on the first call that
    carries vectors, executing scipy.sparse's module outside the import lock and unguarded: the service's first
    concurrent searches failed one with "Unexpected error, message=<'scipy.sparse'>" or "partially initialized
    module … (most likely due to a circular import)" (two 400s in a CI soak). Harmless without scipy, or if pymilvus
    moves the check (then there is nothing to settle)."""
    with _LAZY_IMPORTS:
        try:
            from pymilvus.client.utils import SciPyHelper

            SciPyHelper.is_scipy_sparse(None)
        except (ImportError, AttributeError):
            pass


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
        weights: str | None = None,
        token: str = "",
        create: bool = True,
        index: str = "auto",
    ) -> None:
        """`precision`: the encoder's, which a new collection records (there is no default to guess it from: a
        collection made without it is refused); "" opens an existing collection without comparing it. `weights`:
        the encoder's weights_id, compared with the collection's and recorded by a new one; None compares nothing
        (and a new collection records the model's own weights)."""
        self.uri = uri
        self.collection = collection
        self.model = model
        self.dim = dim
        self.preprocess_version = preprocess_version
        self.precision = precision
        self.weights = weights
        self.token = token
        self.index = index  # the vector index a new collection is built with (search_params.index_for)
        settle_pymilvus_lazy_imports()  # before any thread of ours sends vectors
        self.client = connect(uri, token, create)
        with milvus_errors(f"opening collection {collection}"):
            exists = self.client.has_collection(collection)
            if exists:
                properties = self.client.describe_collection(collection).get("properties") or {}
                check_identity(
                    properties, collection, uri,
                    model=model, dim=dim, preprocess_version=preprocess_version, precision=precision, weights=weights,
                )
                self.weights = properties.get(WEIGHTS_PROPERTY, "")  # what it holds, also when opened without comparing
                self.client.load_collection(collection)
            elif create:
                self._create()
        if not exists and not create:
            raise collection_not_found(collection, uri)

    @classmethod
    def open_existing(cls, uri: str, collection: str, token: str = "") -> MilvusStore:
        """Open a collection as the model it records, without loading an encoder (info, export)."""
        client = connect(uri, token, create=False)
        try:
            with milvus_errors(f"opening collection {collection}"):
                exists = client.has_collection(collection)
                properties = (client.describe_collection(collection).get("properties") or {}) if exists else {}
            if not exists:
                raise collection_not_found(collection, uri)
        finally:
            client.close()
        # A collection imgsearch did not create records no model; the constructor's guard says so.
        return cls(
            uri,
            collection,
            model=properties.get(MODEL_PROPERTY, ""),
            dim=int(properties.get(DIM_PROPERTY, 0)),
            preprocess_version=properties.get(PREPROCESS_PROPERTY, ""),
            weights=properties.get(WEIGHTS_PROPERTY, ""),
            token=token,
            create=False,
        )

    def _create(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"collection {self.collection} is made for an encoder: give its precision ({' or '.join(PRECISIONS)}), not {self.precision!r}"
            )
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_LENGTH)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("label", DataType.VARCHAR, max_length=LABEL_BYTES)
        schema.add_field("path", DataType.VARCHAR, max_length=PATH_BYTES)
        schema.add_field("metadata", DataType.JSON)
        index_params = self.client.prepare_index_params()
        index_type, build = index_rules.index_for(self.uri, self.index)
        index_params.add_index("vector", index_type=index_type, metric_type="COSINE", params=build)
        self.client.create_collection(
            self.collection,
            schema=schema,
            index_params=index_params,
            consistency_level="Strong",
            properties={
                MODEL_PROPERTY: self.model,
                DIM_PROPERTY: str(self.dim),
                PREPROCESS_PROPERTY: self.preprocess_version,
                PRECISION_PROPERTY: self.precision,
                WEIGHTS_PROPERTY: self.weights or "",
                SCHEMA_PROPERTY: SCHEMA_VERSION,
            },
        )
        log.info("created collection %s for %s (dim %d)", self.collection, self.model, self.dim)

    # --- writes -------------------------------------------------------------------------------
    def upsert(self, records: Sequence[ImageRecord]) -> None:
        upsert_rows(self.client, self.collection, records)

    def writer_uri(self) -> str | None:
        """Where another process can write to this collection: the server URI, or for Milvus Lite the loopback
        address of the gRPC server pymilvus started for the file in this process; None if there is none."""
        return lite.grpc_address(self.uri) if is_lite_uri(self.uri) else self.uri

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

    def wait_for_index(self) -> float:
        """Block until Milvus Lite's background index builds are done (lite.py); the seconds waited (0 on a server)."""
        return lite.wait_for_index(self.uri, self.collection)

    def index_coverage(self) -> tuple[int, int] | None:
        """(rows that searches reach through an index, all rows, deleted included) on Milvus Lite; None elsewhere."""
        return lite.index_coverage(self.uri, self.collection)

    # --- reads --------------------------------------------------------------------------------
    def get(self, ids: Sequence[str], fields: Sequence[str] = ("id", "path", "label", "metadata"), as_of: float | None = None) -> dict[str, dict]:
        """Rows by id (missing ids are absent from the result). `as_of` (a time.time()): on a server, every row written
        before then is seen, and the read need not wait, as Strong reads do, for the server's next time tick (200-470 ms
        measured on the 2.3.5 server; ingest settles each batch this way)."""
        consistency = {}
        if as_of is not None and not is_lite_uri(self.uri):
            consistency = {"consistency_level": "Customized", "guarantee_timestamp": mkts_from_unixtime(as_of)}
        found: dict[str, dict] = {}
        for start in range(0, len(ids), QUERY_CHUNK):
            chunk = list(ids[start : start + QUERY_CHUNK])
            with milvus_errors("reading rows"):
                rows = self.client.get(
                    self.collection, ids=chunk, output_fields=list(fields), **consistency, **VECTORS_AS_ARRAYS
                )
            for row in rows:
                found[row["id"]] = dict(row)
        return found

    def ids_starting_with(self, prefix: str, limit: int = 2) -> list[str]:
        """Up to `limit` stored ids that start with `prefix` (hex: the caller checks it)."""
        with milvus_errors("reading rows"):
            rows = self.client.query(self.collection, filter=f"id like {string_literal(prefix + '%')}", output_fields=["id"], limit=limit)
        return [row["id"] for row in rows]

    def count(self, filter: str = "") -> int:
        """Rows, or the rows `filter` selects."""
        with milvus_errors("count"):
            result = self.client.query(self.collection, filter=filter, output_fields=["count(*)"])
        return int(result[0]["count(*)"])

    def label_counts(self, labels: Iterable[str]) -> dict[str, int]:
        """How many rows carry each of `labels`."""
        counts = {}
        for label in labels:
            with milvus_errors("count"):
                result = self.client.query(
                    self.collection, filter=label_is(label), output_fields=["count(*)"]
                )
            counts[label] = int(result[0]["count(*)"])
        return counts

    def iter_rows(self, fields: Sequence[str] = ("id", "path"), batch_size: int = 1000, filter: str = "") -> Iterator[dict]:
        with milvus_errors("reading rows"):
            iterator = self.client.query_iterator(
                self.collection, batch_size=batch_size, filter=filter, output_fields=list(fields), **VECTORS_AS_ARRAYS
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
        field, vectors included). `search_params`: Milvus's, e.g. from store/search_params.py."""
        fields = list(fields) + (["vector"] if with_vectors else [])
        params = dict(search_params or {})
        params["params"] = {**params.get("params", {})}
        params["params"]["ef"] = index_rules.ef(self.uri, k, params["params"].get("ef"))
        params["params"].setdefault("nprobe", index_rules.SERVER_NPROBE)
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

    def check_serving(self) -> None:
        """StoreUnavailableError unless Milvus can search this collection now: reachable, and loaded (a restarted
        server answers before it has loaded its collections again)."""
        with milvus_errors("health check"):
            state = self.client.get_load_state(self.collection, timeout=HEALTH_TIMEOUT_SECONDS)
        if state.get("state") != LoadState.Loaded:
            raise StoreUnavailableError(f"health check failed: Milvus has not loaded collection {self.collection} ({state.get('state')})")

    def check_embedding_unchanged(self) -> None:
        """EmbeddingMovedError when this store's name (an alias `reindex` moves) now names a collection of another
        model, dim or weights than the one opened: this process's encoder no longer makes vectors comparable with it."""
        with milvus_errors("describe collection"):
            description = self.client.describe_collection(self.collection)
        try:
            check_identity(description.get("properties") or {}, description.get("collection_name", self.collection), self.uri,
                           model=self.model, dim=self.dim, weights=self.weights)
        except ModelMismatchError as error:
            raise EmbeddingMovedError(
                f"{self.collection} now names another embedding than this service was started with ({error}); restart it "
                "with that collection's model and weights"
            ) from None

    def resolved_name(self) -> str:
        """The collection behind this store's name (an alias resolves to its collection)."""
        with milvus_errors("describe collection"):
            return self.client.describe_collection(self.collection).get("collection_name", self.collection)

    def point_alias(self, alias: str) -> None:
        """Make `alias` name this collection, atomically moving it if it named another."""
        hint = " (Milvus Lite has no aliases: use a Milvus server)" if is_lite_uri(self.uri) else ""
        with milvus_errors(f"pointing alias {alias} at {self.collection}", hint):
            if alias in self.client.list_aliases().get("aliases", []):
                self.client.alter_alias(self.collection, alias)
            else:
                self.client.create_alias(self.collection, alias)

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
            folder = str(folder).rstrip("/") if is_url(folder) else os.path.abspath(folder)
            if any(_is_within(folder, root) for root in roots):
                continue
            roots = [root for root in roots if not _is_within(root, folder)] + [folder]
            changed = True
        if changed:
            self.set_properties({ROOTS_PROPERTY: json.dumps(sorted(roots))})

    def set_properties(self, properties: dict[str, str]) -> None:
        with milvus_errors(f"updating collection {self.collection} properties"):
            self.client.alter_collection_properties(self.collection, properties=properties)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> MilvusStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_within(path: str, folder: str) -> bool:
    separator = "/" if is_url(folder) else os.sep
    return path == folder or path.startswith(folder.rstrip(separator) + separator)

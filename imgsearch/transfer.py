"""Export a collection to Parquet and import it back: rows, vectors and the model identity, exactly."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgsearch.errors import CatalogError, InvalidInputError
from imgsearch.store import (
    DIM_PROPERTY,
    FIELDS,
    IDENTITY_PROPERTIES,
    MODEL_PROPERTY,
    PRECISION_PROPERTY,
    PREPROCESS_PROPERTY,
    UNRECORDED_PRECISION,
    WEIGHTS_PROPERTY,
    ImageRecord,
    MilvusStore,
)
from imgsearch.validation import (
    recorded_copies,
    user_metadata,
    validate_id,
    validate_label,
    validate_metadata,
    validate_path_text,
    validate_vector,
    with_copies,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
FORMAT_PROPERTY = "imgsearch.format"
ROWS_PER_BATCH = 2048
MAX_DIM = 32_768  # Milvus's largest FLOAT_VECTOR


def _schema(store: MilvusStore, identity: dict[str, str]) -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("vector", pa.list_(pa.float32(), store.dim)),
            ("label", pa.string()),
            ("path", pa.string()),
            ("metadata", pa.string()),  # JSON text: Parquet has no free-form JSON type
        ],
        metadata={FORMAT_PROPERTY: FORMAT_VERSION, **identity},
    )


def export_parquet(store: MilvusStore, out: Path, progress: Callable[[int], None] | None = None) -> int:
    try:
        return _export(store, out, progress)
    except OSError as error:
        raise CatalogError(f"cannot write {out}: {error.strerror or error}") from None


def _export(store: MilvusStore, out: Path, progress: Callable[[int], None] | None) -> int:
    properties = store.properties()
    identity = {key: properties.get(key, UNRECORDED_PRECISION if key == PRECISION_PROPERTY else "") for key in IDENTITY_PROPERTIES}
    schema = _schema(store, identity)
    written = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".partial")
    with pq.ParquetWriter(temporary, schema) as writer:
        batch: list[dict] = []
        for row in store.iter_rows(FIELDS):
            batch.append(row)
            if len(batch) >= ROWS_PER_BATCH:
                written += _write(writer, schema, batch)
                batch = []
                if progress:
                    progress(written)
        written += _write(writer, schema, batch)
    temporary.replace(out)  # a half-written export never carries the final name
    return written


def _write(writer: pq.ParquetWriter, schema: pa.Schema, rows: list[dict]) -> int:
    if not rows:
        return 0
    table = pa.table(
        {
            "id": [row["id"] for row in rows],
            "vector": [np.asarray(row["vector"], dtype=np.float32) for row in rows],
            "label": [row["label"] for row in rows],
            "path": [row["path"] for row in rows],
            "metadata": [json.dumps(row.get("metadata") or {}, sort_keys=True) for row in rows],
        },
        schema=schema,
    )
    writer.write_table(table)
    return len(rows)


def read_export_identity(path: Path) -> dict[str, str]:
    """Model, dim and preprocessing recorded in an export, so the import can open the right collection."""
    if not path.is_file():
        raise CatalogError(f"export file not found: {path}")
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (pa.ArrowException, OSError) as error:
        raise CatalogError(f"{path} is not a Parquet file: {error}") from None
    identity = {
        key.decode(errors="replace"): value.decode(errors="replace")
        for key, value in metadata.items()
        if key.startswith(b"imgsearch.")
    }
    if not identity.get(MODEL_PROPERTY) or DIM_PROPERTY not in identity:
        raise CatalogError(f"{path} was not written by `imgsearch export` (no model recorded)")
    if not identity[DIM_PROPERTY].isdigit() or not 1 <= int(identity[DIM_PROPERTY]) <= MAX_DIM:
        raise CatalogError(f"{path} records an unusable vector dimension {identity[DIM_PROPERTY]!r}")
    return identity


def import_parquet(
    store: MilvusStore, path: Path, chunk: int = 512, progress: Callable[[int], None] | None = None
) -> tuple[int, list[dict[str, str]]]:
    """Upsert the rows of an export; (rows imported, failed rows). Every row is validated like an ingested one
    (id, vector length and values, label, path, metadata) before its chunk is written; bad rows are reported and
    the others imported. Paths are stored as data: importing adds no folder the REST service may serve from."""
    imported = 0
    failed: list[dict[str, str]] = []
    try:
        parquet = pq.ParquetFile(path)
        missing = [name for name in FIELDS if name not in parquet.schema_arrow.names]
        if missing:
            raise CatalogError(f"{path} has no column {', '.join(missing)}; was it written by `imgsearch export`?")
        row_number = 0
        for batch in parquet.iter_batches(batch_size=chunk, columns=list(FIELDS)):
            records = []
            for row in batch.to_pylist():
                row_number += 1
                try:
                    records.append(_record(row, store.dim))
                except (InvalidInputError, ValueError, TypeError) as error:
                    failed.append({"path": f"{path}:row {row_number}", "error": str(error)})
            store.upsert(records)
            imported += len(records)
            log.info("imported %d rows", imported)
            if progress:
                progress(imported)
    except pa.ArrowException as error:
        raise CatalogError(f"{path}: cannot read the Parquet data ({error})") from None
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM: the CLI's one line says how far it got
        interrupt.done = f"{imported} rows imported, {len(failed)} failed"
        raise
    store.flush()
    return imported, failed


def _record(row: dict, dim: int) -> ImageRecord:
    metadata = row["metadata"]
    if not isinstance(metadata, str):
        raise InvalidInputError("metadata must be JSON text")
    try:
        metadata = json.loads(metadata)
    except ValueError as error:
        raise InvalidInputError(f"metadata is not valid JSON ({error})") from None
    if not isinstance(metadata, dict):
        raise InvalidInputError(f"metadata must be a JSON object, not {type(metadata).__name__}")
    copies = [validate_path_text(copy) for copy in recorded_copies(metadata)]  # an export carries them
    metadata, _ = with_copies(validate_metadata(user_metadata(metadata)), copies)
    return ImageRecord(
        id=validate_id(row["id"]),
        vector=np.asarray(validate_vector(row["vector"], dim), dtype=np.float32),
        path=validate_path_text(row["path"]),
        label=validate_label(row["label"] if row["label"] is not None else ""),
        metadata=metadata,
    )


def import_into(settings, path: Path) -> dict:
    """Import an export into the collection of its model: settings.collection, or imgsearch_<model> (created when
    missing; a collection of another model is refused). Returns imported, failed, collection and model."""
    from imgsearch.config import default_collection_name
    from imgsearch.store.search_params import chosen_index

    identity = read_export_identity(path)
    model = identity[MODEL_PROPERTY]
    name = settings.collection or default_collection_name(model)
    index = chosen_index(settings.index, pq.ParquetFile(path).metadata.num_rows)  # an export says how many rows it holds
    with MilvusStore(
        settings.milvus_uri, name, model=model, dim=int(identity[DIM_PROPERTY]),
        preprocess_version=identity.get(PREPROCESS_PROPERTY, ""), token=settings.milvus_token,
        precision=identity.get(PRECISION_PROPERTY, UNRECORDED_PRECISION),  # an export older than this key
        weights=identity.get(WEIGHTS_PROPERTY, ""),
        index=index,
    ) as store:
        imported, failed = import_parquet(store, path, chunk=settings.upsert_chunk)
    return {"imported": imported, "failed": failed, "collection": name, "model": model}

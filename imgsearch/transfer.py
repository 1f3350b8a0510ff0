"""Export a collection to Parquet and import it back: rows, vectors and the model identity, exactly."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgsearch.errors import CatalogError
from imgsearch.store import ImageRecord, MilvusStore

FORMAT_VERSION = "1"
ROWS_PER_BATCH = 2048


def _schema(store: MilvusStore) -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("vector", pa.list_(pa.float32(), store.dim)),
            ("label", pa.string()),
            ("path", pa.string()),
            ("metadata", pa.string()),  # JSON text: Parquet has no free-form JSON type
        ],
        metadata={
            "imgsearch.format": FORMAT_VERSION,
            "imgsearch.model": store.model,
            "imgsearch.dim": str(store.dim),
            "imgsearch.preprocess": store.preprocess_version,
        },
    )


def export_parquet(store: MilvusStore, out: Path, progress: Callable[[int], None] | None = None) -> int:
    schema = _schema(store)
    written = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".partial")
    with pq.ParquetWriter(temporary, schema) as writer:
        batch: list[dict] = []
        for row in store.iter_rows(("id", "vector", "label", "path", "metadata")):
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
    except (pa.ArrowInvalid, OSError) as error:
        raise CatalogError(f"{path} is not a Parquet file: {error}") from None
    identity = {key.decode(): value.decode() for key, value in metadata.items() if key.startswith(b"imgsearch.")}
    if "imgsearch.model" not in identity or "imgsearch.dim" not in identity:
        raise CatalogError(f"{path} was not written by `imgsearch export` (no model recorded)")
    return identity


def import_parquet(store: MilvusStore, path: Path, chunk: int = 512, progress: Callable[[int], None] | None = None) -> int:
    imported = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk):
        columns = batch.to_pydict()
        store.upsert(
            [
                ImageRecord(
                    id=row_id,
                    vector=np.asarray(vector, dtype=np.float32),
                    path=row_path,
                    label=label,
                    metadata=json.loads(metadata),
                )
                for row_id, vector, label, row_path, metadata in zip(
                    columns["id"], columns["vector"], columns["label"], columns["path"], columns["metadata"]
                )
            ]
        )
        imported += batch.num_rows
        if progress:
            progress(imported)
    store.flush()
    return imported

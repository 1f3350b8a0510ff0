"""The Milvus store: errors.py (Milvus's errors as imgsearch's), schema.py (fields, recorded properties, rows, filters,
the model guard), search_params.py (HNSW's ef), lite.py (Milvus Lite's internals), collection.py (MilvusStore).
Opening a store from the settings is session.py's."""

from imgsearch.store.collection import QUERY_CHUNK, MilvusStore, collection_not_found, connect, quiet_milvus_logs, upsert_rows
from imgsearch.store.errors import milvus_errors
from imgsearch.store.schema import (
    DIM_PROPERTY,
    FIELDS,
    IDENTITY_PROPERTIES,
    LABELED,
    MODEL_PROPERTY,
    PRECISION_PROPERTY,
    PRECISIONS,
    PREPROCESS_PROPERTY,
    RECOGNITION_PROPERTY,
    REFERENCE_COUNTS_PROPERTY,
    ROOTS_PROPERTY,
    SCHEMA_PROPERTY,
    SCHEMA_VERSION,
    SELF_CALIBRATION_PROPERTY,
    UNRECORDED_PRECISION,
    WEIGHTS_PROPERTY,
    Hit,
    ImageRecord,
    check_identity,
    label_is,
    labeled_except,
    string_literal,
)

__all__ = [
    "DIM_PROPERTY", "FIELDS", "IDENTITY_PROPERTIES", "LABELED", "MODEL_PROPERTY", "PRECISION_PROPERTY", "PRECISIONS", "PREPROCESS_PROPERTY",
    "QUERY_CHUNK", "RECOGNITION_PROPERTY", "REFERENCE_COUNTS_PROPERTY", "ROOTS_PROPERTY", "SCHEMA_PROPERTY", "SCHEMA_VERSION",
    "SELF_CALIBRATION_PROPERTY", "UNRECORDED_PRECISION", "WEIGHTS_PROPERTY", "Hit", "ImageRecord", "MilvusStore", "check_identity",
    "collection_not_found", "connect", "label_is", "labeled_except", "milvus_errors", "quiet_milvus_logs", "string_literal",
    "upsert_rows",
]

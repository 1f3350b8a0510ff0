"""Settings → encoder and store: the one way the CLI commands and the REST service open them.

A read-only use (create=False) checks that the database and collection exist before any model is loaded, so a
typo in --uri or --collection is one line at once and nothing is created.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgsearch.config import Settings, check_lite_database_exists, is_lite_uri
from imgsearch.errors import CollectionNotFoundError
from imgsearch.storage import shown_uri

if TYPE_CHECKING:  # torch and pymilvus are imported only when something is opened
    from imgsearch.encoders import Encoder
    from imgsearch.store import MilvusStore


def check_store_exists(settings: Settings) -> None:
    check_lite_database_exists(settings.milvus_uri)  # before pymilvus is even imported
    check_collection_exists(settings.milvus_uri, settings.collection_name, settings.milvus_token)


def open_existing_store(settings: Settings) -> MilvusStore:
    """The settings' collection as created, with no encoder (export, delete, duplicates, train-head). A missing
    Lite path fails before pymilvus is imported; a missing collection is a CollectionNotFoundError."""
    check_lite_database_exists(settings.milvus_uri)
    from imgsearch.store import MilvusStore

    return MilvusStore.open_existing(settings.milvus_uri, settings.collection_name, settings.milvus_token)


def open_encoder(settings: Settings, *, auto_int8: bool | None = None) -> Encoder:
    from imgsearch.encoders import encoder_from_settings

    return encoder_from_settings(settings, auto_int8=auto_int8)


def open_store(settings: Settings, encoder: Encoder, *, create: bool = True, encodes_images: bool = True) -> MilvusStore:
    """The store for `settings` with `encoder`'s identity; the one way CLI and API open it. `encodes_images=False`
    (a text-only search): the encoder's precision is not the collection's business."""
    from imgsearch.store import MilvusStore
    from imgsearch.store.search_params import chosen_index

    return MilvusStore(
        settings.milvus_uri,
        settings.collection_name,
        model=encoder.name,
        dim=encoder.dim,
        preprocess_version=encoder.preprocess_version,
        precision=encoder.precision if encodes_images else "",
        weights=encoder.weights_id if encodes_images else None,
        token=settings.milvus_token,
        create=create,
        index=chosen_index(settings.index),  # a catalog's size is not known before it is walked
    )


def open_session(settings: Settings, *, create: bool = True, encodes_images: bool = True) -> tuple[Encoder, MilvusStore]:
    """The encoder and the settings' collection (created for this encoder when missing, unless create=False).
    With runtime auto, a collection keeps being searched at the precision that filled it: int8 is the default for
    new collections only, and only on a CPU with int8 dot-product instructions."""
    if not create:
        check_lite_database_exists(settings.milvus_uri)  # before pymilvus is even imported
    from imgsearch.store import PRECISION_PROPERTY, UNRECORDED_PRECISION, check_identity

    stored = collection_properties(settings.milvus_uri, settings.collection_name, settings.milvus_token)
    if stored is None and not create:
        check_store_exists(settings)  # says which collection is missing where
    if stored is not None:  # the model named is checked before it is loaded: a mistake is one line at once
        from imgsearch.encoders import weights_id

        check_identity(stored, settings.collection_name, settings.milvus_uri, model=settings.model,
                       weights=weights_id(settings.weights) if encodes_images else None)
    encoder = open_encoder(settings, auto_int8=None if stored is None else stored.get(PRECISION_PROPERTY, UNRECORDED_PRECISION) == "int8")
    return encoder, open_store(settings, encoder, create=create, encodes_images=encodes_images)


@contextmanager
def opened(settings: Settings, *, create: bool = True, encodes_images: bool = True) -> Iterator[tuple[Encoder, MilvusStore]]:
    """open_session, with the store closed at the end."""
    encoder, store = open_session(settings, create=create, encodes_images=encodes_images)
    with store:
        yield encoder, store


def collection_properties(uri: str, collection: str, token: str = "") -> dict[str, str] | None:
    """The properties `collection` was stored with, None if it does not exist yet; creates nothing."""
    if is_lite_uri(uri) and not Path(uri).exists():
        return None
    from imgsearch.store import connect, milvus_errors

    client = connect(uri, token, create=False)
    try:
        with milvus_errors("describe collection"):
            if not client.has_collection(collection):
                return None
            return dict(client.describe_collection(collection).get("properties") or {})
    finally:
        client.close()


def check_collection_exists(uri: str, collection: str, token: str = "") -> None:
    """CollectionNotFoundError unless `collection` exists at `uri`; creates nothing (no Lite file either)."""
    from imgsearch.store import collection_not_found, connect, milvus_errors

    client = connect(uri, token, create=False)
    try:
        with milvus_errors("listing collections"):
            exists = client.has_collection(collection)
    finally:
        client.close()
    if not exists:
        raise collection_not_found(collection, uri)


def describe_store(settings: Settings) -> dict[str, Any]:
    """Model, dim, collection, URI, count, precision and thresholds of an existing collection, without loading an
    encoder (`imgsearch info`); nothing is created."""
    check_store_exists(settings)
    uri, collection = settings.milvus_uri, settings.collection_name
    from imgsearch.store import (
        PRECISION_PROPERTY,
        RECOGNITION_PROPERTY,
        SELF_CALIBRATION_PROPERTY,
        UNRECORDED_PRECISION,
        WEIGHTS_PROPERTY,
        MilvusStore,
    )

    try:
        store = MilvusStore.open_existing(uri, collection, settings.milvus_token)
    except CollectionNotFoundError:
        return {"collection": collection, "uri": shown_uri(uri), "exists": False, "count": 0, "model": None, "dim": None}
    from imgsearch import storage

    with store:
        properties = store.properties()
        return {
            **({"storage_options": storage.shown_options()} if storage.shown_options() else {}),  # secrets are refused there
            "collection": collection,
            "uri": shown_uri(uri),
            "exists": True,
            "count": store.count(),
            "model": store.model,
            "dim": store.dim,
            "preprocess": store.preprocess_version,
            "precision": properties.get(PRECISION_PROPERTY, UNRECORDED_PRECISION),
            "weights": properties.get(WEIGHTS_PROPERTY, ""),  # "": the model's own; else an adapted embedding's id
            "recognition": _json_property(properties, RECOGNITION_PROPERTY),
            "self_calibration": _json_property(properties, SELF_CALIBRATION_PROPERTY),
        }


def _json_property(properties: dict[str, str], key: str) -> Any:
    try:
        return json.loads(properties.get(key) or "null")
    except ValueError:
        return None

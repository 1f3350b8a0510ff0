"""Settings → encoder and store: the one way the CLI commands and the REST service open them.

A read-only use (create=False) checks that the database and collection exist before any model is loaded, so a
typo in --uri or --collection is one line at once and nothing is created.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from imgsearch.config import Settings, check_lite_database_exists

if TYPE_CHECKING:  # torch and pymilvus are imported only when something is opened
    from imgsearch.encoders import Encoder
    from imgsearch.store import MilvusStore


def check_store_exists(settings: Settings) -> None:
    check_lite_database_exists(settings.milvus_uri)  # before pymilvus is even imported
    from imgsearch.store import check_collection_exists

    check_collection_exists(settings.milvus_uri, settings.collection_name, settings.milvus_token)


def open_existing_store(settings: Settings) -> MilvusStore:
    """The settings' collection as created, with no encoder (export, delete, duplicates, train-head). A missing
    Lite path fails before pymilvus is imported; a missing collection is a CollectionNotFoundError."""
    check_lite_database_exists(settings.milvus_uri)
    from imgsearch.store import MilvusStore

    return MilvusStore.open_existing(settings.milvus_uri, settings.collection_name, settings.milvus_token)


def open_encoder(settings: Settings, *, auto_int8: bool = True) -> Encoder:
    from imgsearch.encoders import encoder_from_settings

    return encoder_from_settings(settings, auto_int8=auto_int8)


def open_session(settings: Settings, *, create: bool = True, encodes_images: bool = True) -> tuple[Encoder, MilvusStore]:
    """The encoder and the settings' collection (created for this encoder when missing, unless create=False).
    With runtime auto, a collection an fp32 encoder filled keeps being searched with fp32 vectors: int8 is the
    default for new collections only."""
    if not create:
        check_lite_database_exists(settings.milvus_uri)  # before pymilvus is even imported
    from imgsearch.store import PRECISION_PROPERTY, check_model_name, collection_properties, open_store

    stored = collection_properties(settings.milvus_uri, settings.collection_name, settings.milvus_token)
    if stored is None and not create:
        check_store_exists(settings)  # says which collection is missing where
    if stored is not None:
        check_model_name(stored, settings.model, settings.collection_name)
    encoder = open_encoder(settings, auto_int8=stored is None or stored.get(PRECISION_PROPERTY, "fp32") == "int8")
    return encoder, open_store(settings, encoder, create=create, encodes_images=encodes_images)


@contextmanager
def opened(settings: Settings, *, create: bool = True, encodes_images: bool = True) -> Iterator[tuple[Encoder, MilvusStore]]:
    """open_session, with the store closed at the end."""
    encoder, store = open_session(settings, create=create, encodes_images=encodes_images)
    with store:
        yield encoder, store


def describe_store(settings: Settings) -> dict[str, Any]:
    """Model, dim, collection, URI and count of an existing collection; nothing is created."""
    check_store_exists(settings)
    from imgsearch.store import describe_collection

    return describe_collection(settings.milvus_uri, settings.collection_name, settings.milvus_token)

"""One exception class per kind of failure; the CLI prints `str(error)` as one line."""

from __future__ import annotations

import errno

SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a quota, a file-size limit


class ImgsearchError(Exception):
    """Base class for every error a user can cause or fix."""


class ImageDecodeError(ImgsearchError):
    """A file could not be turned into an RGB image."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class UnknownModelError(ImgsearchError):
    """The model name matches no encoder family."""


class WeightsNotFoundError(ImgsearchError):
    """Pretrained weights are not available locally and could not be fetched."""


class ModelMismatchError(ImgsearchError):
    """A collection was built with a different encoder than the one asked for."""


class EmbeddingMovedError(ModelMismatchError):
    """The alias a running process searches now names a collection of another embedding (`reindex` moved it)."""


class StoreLockedError(ImgsearchError):
    """Another process holds the Milvus Lite data directory."""


class StoreError(ImgsearchError):
    """Milvus refused an operation (a bad filter, an oversized value)."""


class StoreUnavailableError(StoreError):
    """Milvus could not be reached: retrying later may succeed (the API answers 503)."""


class ObjectStoreUnavailableError(StoreUnavailableError):
    """The object store holding the images could not be reached or refused the credentials (the API answers 503)."""


class StorageFullError(ImgsearchError):
    """A file could not be written for lack of space (or over a file-size limit): the API answers 507."""


class RayUnavailableError(ImgsearchError):
    """`--ray`: the cluster's address cannot be reached, or a local cluster cannot start."""


class RayIngestError(ImgsearchError):
    """The Ray run stopped: an actor could not load the encoder, or a task kept failing."""


class CatalogError(ImgsearchError):
    """The catalog folder or manifest is unusable."""


class UnsupportedRuntimeError(ImgsearchError):
    """The runtime asked for cannot run this encoder on this device."""


class CollectionNotFoundError(ImgsearchError):
    """The collection asked for does not exist yet."""


class ImageNotFoundError(ImgsearchError):
    """No stored image has the id asked for."""


class InvalidWeightsError(ImgsearchError):
    """A weights file exists but does not fit the model."""


class TextNotSupportedError(ImgsearchError):
    """Text queries need a CLIP encoder."""


class UsageError(ImgsearchError):
    """An option value the command cannot use."""


class InvalidInputError(ImgsearchError):
    """A label, path, metadata value or row that cannot be stored as given."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so the same cleanup runs."""


# Exit statuses of the `imgsearch` command, the same with and without --json.
EXIT_FAILED = 2  # the command could not run (usage, missing path or collection, store refused)
EXIT_PARTIAL = 3  # the command ran, but some files or rows failed; they are listed in the report
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), as a shell reports it
EXIT_TERMINATED = 143  # SIGTERM

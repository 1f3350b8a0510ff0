"""Milvus's errors as imgsearch's: every client call of the store goes through `milvus_errors`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
from pymilvus.exceptions import ConnectError, ConnectionNotExistException, MilvusException, MilvusUnavailableException

from imgsearch.errors import StorageFullError, StoreError, StoreUnavailableError

# pymilvus's code for "Fail connecting to server": the server is down or unreachable, not the request wrong.
CONNECT_FAILED = 2
# Milvus's codes (pkg/util/merr) for a server that cannot serve the request *yet*: the
# collection, partition, replica, channel, segment or node not (fully) loaded or online. A restarted server answers
# "collection not loaded" (101) for every collection until its query node has loaded them again (~25 s on the 2.3.5
# standalone, which first waits out the dead node's 30 s session).
COLLECTION_NOT_LOADED = 101
NOT_SERVING_YET = {COLLECTION_NOT_LOADED, 103, 201, 202, 401, 501, 503, 601, 602, 901, 902, 903, 904, 905}
UNREACHABLE_GRPC = ("UNAVAILABLE", "DEADLINE_EXCEEDED")
NO_SPACE_TEXTS = ("No space left on device", "File too large", "Disk quota exceeded")  # ENOSPC, EFBIG, EDQUOT


def unavailable_reason(error: BaseException) -> str | None:
    """Why Milvus cannot serve right now, when `error` says so (retrying later may succeed); None when the request
    itself was refused."""
    if isinstance(error, (ConnectError, MilvusUnavailableException, ConnectionNotExistException)):
        return f"Milvus is unreachable ({error.message})"
    if isinstance(error, MilvusException):
        if error.code == CONNECT_FAILED:
            return f"Milvus is unreachable ({error.message})"
        if error.code == COLLECTION_NOT_LOADED:
            return "Milvus has not loaded the collection yet (it is starting or restarting)"
        if error.code in NOT_SERVING_YET:
            return f"Milvus cannot serve yet ({error.message})"
        if any(f"StatusCode.{name}" in str(error.message) for name in UNREACHABLE_GRPC):  # pymilvus's own retries ran out
            return f"Milvus is unreachable ({error.message})"
        return None
    if isinstance(error, grpc.RpcError):  # a call cut off mid-flight can surface as gRPC's own error
        code = getattr(error, "code", lambda: None)()
        if code is not None and code.name in UNREACHABLE_GRPC:
            return f"Milvus is unreachable ({code.name})"
    return None


@contextlib.contextmanager
def milvus_errors(action: str, hint: str = "") -> Iterator[None]:
    """Milvus's refusals (a bad filter, an oversized value) become one StoreError line, with `hint` after it; a
    server that cannot serve now becomes StoreUnavailableError, so the API can answer 503 instead of blaming the
    request."""
    try:
        yield
    except (MilvusException, grpc.RpcError) as error:
        reason = unavailable_reason(error)
        if reason is not None:
            raise StoreUnavailableError(f"{action} failed: {reason}") from None
        if isinstance(error, MilvusException):
            if any(text in str(error.message) for text in NO_SPACE_TEXTS):  # Milvus Lite writes its files in this process
                raise StorageFullError(
                    f"{action} failed: {error.message} (the disk holding the Milvus data is full, or a file-size limit was "
                    "reached; free space and run the same command again)"
                ) from None
            raise StoreError(f"{action} failed: {error.message}{hint}") from None
        code = getattr(error, "code", lambda: None)()
        raise StoreError(f"{action} failed: {code.name if code else error}{hint}") from None

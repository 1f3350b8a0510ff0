"""Milvus's errors as imgsearch's: every client call of the store goes through `milvus_errors`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
from pymilvus.exceptions import ConnectError, ConnectionNotExistException, MilvusException, MilvusUnavailableException

from imgsearch.errors import StoreError, StoreUnavailableError

# pymilvus's code for "Fail connecting to server": the server is down or unreachable, not the request wrong.
CONNECT_FAILED = 2
UNREACHABLE_GRPC = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


@contextlib.contextmanager
def milvus_errors(action: str, hint: str = "") -> Iterator[None]:
    """Milvus's refusals (a bad filter, an oversized value) become one StoreError line, with `hint` after it; a
    server that cannot be reached becomes StoreUnavailableError, so the API can answer 503 instead of blaming the
    request."""
    try:
        yield
    except (ConnectError, MilvusUnavailableException, ConnectionNotExistException) as error:
        raise StoreUnavailableError(f"{action} failed: Milvus is unreachable ({error.message})") from None
    except MilvusException as error:
        if error.code == CONNECT_FAILED:
            raise StoreUnavailableError(f"{action} failed: Milvus is unreachable ({error.message})") from None
        raise StoreError(f"{action} failed: {error.message}{hint}") from None
    except grpc.RpcError as error:  # a call cut off mid-flight can surface as gRPC's own error
        code = getattr(error, "code", lambda: None)()
        if code is not None and code.name in UNREACHABLE_GRPC:
            raise StoreUnavailableError(f"{action} failed: Milvus is unreachable ({code.name})") from None
        raise StoreError(f"{action} failed: {code.name if code else error}{hint}") from None

"""Batch commands wait out a Milvus restart: client calls that fail because the server cannot serve *now*
(unreachable, or a restarted server that has not loaded the collection yet) are retried with backoff for up to
`store_retry_seconds` (the CLI's setting; the service keeps 0 and answers 503 at once). Every call imgsearch makes
is idempotent (upserts and deletes are keyed by content hash), so a call repeated after a cut connection stores
nothing twice. Milvus Lite runs in this process: there is nothing to wait for, and a lock is reported at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from imgsearch.store.errors import unavailable_reason

log = logging.getLogger(__name__)

FIRST_WAIT_SECONDS = 0.5
LONGEST_WAIT_SECONDS = 5.0

_window_seconds = 0.0


def set_retry_window(seconds: float) -> None:
    """How long this process retries a store call that failed because Milvus is down or restarting (0: never)."""
    global _window_seconds
    _window_seconds = max(0.0, float(seconds))


def retry_window() -> float:
    return _window_seconds


def call_with_retry(action: Callable[[], Any], what: str, window: float | None = None) -> Any:
    """`action()`, repeated with backoff while it fails with a Milvus-unavailable error, for up to `window` seconds
    (default: the process's window) from the first failure; then its last error propagates."""
    window = _window_seconds if window is None else window
    deadline = None
    wait = FIRST_WAIT_SECONDS
    while True:
        try:
            result = action()
        except Exception as error:
            reason = unavailable_reason(error)
            if reason is None or window <= 0:
                raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + window
                log.warning("%s: %s; retrying for up to %.0f s (IMGSEARCH_STORE_RETRY_SECONDS)", what, reason, window)
            if now >= deadline:
                raise
            time.sleep(min(wait, deadline - now))
            wait = min(wait * 2, LONGEST_WAIT_SECONDS)
            continue
        if deadline is not None:
            log.warning("%s: Milvus answers again", what)
        return result


class RetryingClient:
    """A MilvusClient whose method calls go through call_with_retry (attributes that are not methods pass through)."""

    def __init__(self, client: Any, window: float) -> None:
        self._client = client
        self._window = window

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute) or name == "close":
            return attribute

        def retried(*args: Any, **kwargs: Any) -> Any:
            return call_with_retry(lambda: attribute(*args, **kwargs), f"Milvus {name}", self._window)

        return retried

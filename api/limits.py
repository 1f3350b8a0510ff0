"""Per-request and per-process memory bounds of the service: request bodies, and decoded pixels in flight."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import HTTPException

# A burst of large decodes leaves freed memory in glibc's arenas; it is handed back once no decode is running.
TRIM_AFTER_PIXELS = 4_000_000


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc (musl, macOS): nothing to tune
        return None


LIBC = _glibc()
M_MMAP_THRESHOLD = -3


def use_mmap_for_large_buffers(threshold: int = 1 << 20) -> None:
    """Buffers of 1 MiB and more (decoded images, tensors) are mapped and unmapped whole, so freeing them
    returns the memory at once. glibc's default raises this threshold as large buffers are freed, after which
    they come from arenas that rarely shrink: a burst of 8k x 8k uploads then kept ~3 GB."""
    if LIBC is not None:
        LIBC.mallopt(M_MMAP_THRESHOLD, threshold)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_bytes() -> dict[str, int] | None:
    """glibc's malloc heap (mallinfo2, glibc 2.33+): `in_use`, the bytes live allocations hold (arenas and mapped
    blocks), and `free`, the bytes freed into arenas and kept. RSS that grows while `in_use` stays flat is
    fragmentation, not a leak. None without glibc 2.33."""
    if LIBC is None or not hasattr(LIBC, "mallinfo2"):
        return None
    LIBC.mallinfo2.restype = _MallInfo2
    info = LIBC.mallinfo2()
    return {"in_use": info.uordblks + info.hblkhd, "free": info.fordblks}


def release_free_memory() -> None:
    if LIBC is not None:
        LIBC.malloc_trim(0)


class IdleTrim:
    """Hands freed heap back to the OS once no request has run for `after_seconds` since the last one ended: between
    bursts glibc keeps what small requests freed (only large decodes and scans trim on their own), so an idle
    service's RSS would show what the last burst left rather than what is live."""

    def __init__(self, after_seconds: float = 1.0, release: Callable[[], None] = release_free_memory) -> None:
        self.after_seconds = after_seconds
        self.release = release
        self.in_flight = 0
        self.worked = False  # a request ran since the last trim
        self.last_ended = time.monotonic()

    @asynccontextmanager
    async def request(self) -> AsyncIterator[None]:
        self.in_flight += 1
        self.worked = True
        try:
            yield
        finally:
            self.in_flight -= 1
            self.last_ended = time.monotonic()

    async def watch(self) -> None:
        """Runs for the service's life: one trim per idle spell."""
        while True:
            await asyncio.sleep(self.after_seconds / 2)
            if self.worked and self.in_flight == 0 and time.monotonic() - self.last_ended >= self.after_seconds:
                self.worked = False
                await asyncio.to_thread(self.release)


class PixelBudget:
    """A semaphore weighted by pixels: a request takes an image's pixel count before decoding it and gives it
    back once the image is the encoder's (small) input. Concurrent large images wait their turn, or get 503
    after `wait_seconds`; peak memory follows the budget, not the number of requests."""

    def __init__(self, capacity: int, wait_seconds: float) -> None:
        self.capacity = capacity
        self.wait_seconds = wait_seconds
        self.in_use = 0
        self.condition = asyncio.Condition()

    @asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        weight = max(1, min(pixels, self.capacity))  # one image larger than the budget runs alone
        async with self.condition:
            try:
                await asyncio.wait_for(
                    self.condition.wait_for(lambda: self.in_use + weight <= self.capacity), self.wait_seconds
                )
            except TimeoutError:
                raise HTTPException(
                    503, "the service is decoding other large images; retry shortly", headers={"Retry-After": "5"}
                ) from None
            self.in_use += weight
        try:
            yield
        finally:
            async with self.condition:
                self.in_use -= weight
                idle = self.in_use == 0
                self.condition.notify_all()
            if idle and weight >= TRIM_AFTER_PIXELS:
                await asyncio.to_thread(release_free_memory)


class BodyLimit:
    """ASGI middleware: a request body larger than `limit` bytes gets 413, whether it declares its length or
    streams it (chunked), and is never read further."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _reply(send, 400, "invalid Content-Length header")
                return
            if int(declared) > self.limit:
                await _reply(send, 413, f"the request body is larger than {self.limit} bytes")
                return
        received = 0
        exceeded = False
        replied = False

        async def limited_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    exceeded = True
                    raise _TooLarge()
            return message

        async def guarded_send(message) -> None:
            nonlocal replied
            if exceeded:  # whatever the app made of the cut-off body, the answer is 413
                if message["type"] == "http.response.start" and not replied:
                    replied = True
                    await _reply(send, 413, f"the request body is larger than {self.limit} bytes")
                return
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            if not replied:
                await _reply(send, 413, f"the request body is larger than {self.limit} bytes")


class _TooLarge(Exception):
    pass


async def _reply(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

"""Where image files live: local paths, or objects behind a URL (`s3://bucket/key`) read through fsspec.

A stored row's `path` is either an absolute local path or a URL. Everything that lists, stats, reads, writes or
removes a row's file goes through here, so the rest of the code does not care which it is. Connection settings
(IMGSEARCH_STORAGE_OPTIONS) are handed to fsspec as they are, except credentials: those come only from the
standard chain (environment, profile, instance role), so no secret is ever part of a setting that `info`, a log
or an error could show.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from imgsearch.errors import CatalogError, ObjectStoreUnavailableError, UsageError

URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
# Requests in flight at once when the plan stats a manifest's objects, or a decode worker reads them: an object
# store answers each in tens of ms, so a worker with one request out waits instead of decoding.
REQUESTS_IN_FLIGHT = 16
# Retries with backoff for throttling and dropped connections, then the row fails. botocore's standard mode retries
# each request (3 attempts, exponential backoff); s3fs wraps every call, and the read of a body, in retries of its own
# (5 by default, nested twice: 250 attempts over 308 s for one object that never read, measured here), cut to 2.
DEFAULT_S3_CONFIG = {"retries": {"max_attempts": 3, "mode": "standard"}, "connect_timeout": 5, "read_timeout": 30}
S3FS_RETRIES = 2
SECRET_OPTION = re.compile(r"secret|password|token|access_key|credential|^key$", re.IGNORECASE)

_options: dict[str, Any] = {}
_lock = threading.Lock()


class FileStamp(NamedTuple):
    """What identifies one version of a file without reading it: size, mtime (ns) and inode for a local file; size
    and ETag for an object (its mtime and inode 0)."""

    size: int
    mtime_ns: int
    inode: int
    tag: str = ""

    @classmethod
    def of(cls, stat: os.stat_result) -> FileStamp:
        return cls(stat.st_size, stat.st_mtime_ns, stat.st_ino)

    @classmethod
    def of_object(cls, info: dict[str, Any]) -> FileStamp:
        tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or str(info.get("LastModified") or info.get("mtime") or "")
        return cls(int(info.get("size") or 0), 0, 0, str(tag).strip('"'))


def is_url(location: str | os.PathLike[str]) -> bool:
    return isinstance(location, str) and bool(URL.match(location))


def configure(options: dict[str, Any] | None) -> None:
    """The fsspec options every object-store call uses (IMGSEARCH_STORAGE_OPTIONS); credentials are refused."""
    global _options
    options = dict(options or {})
    if secret := secret_option(options):
        raise UsageError(f"storage options must not hold credentials ({secret!r}): they come from the standard chain")
    _options = options


def secret_option(options: Any) -> str | None:
    """The first key, at any depth, that names a credential."""
    if isinstance(options, dict):
        for key, value in options.items():
            if SECRET_OPTION.search(str(key)):
                return str(key)
            if found := secret_option(value):
                return found
    return None


def shown_uri(uri: str) -> str:
    """A URI as answers and messages show it (a Milvus URI, an object-store endpoint): a user:password written
    into it is masked."""
    scheme, separator, rest = uri.partition("://")
    authority, slash, path = rest.partition("/")
    if not separator or "@" not in authority:
        return uri
    return f"{scheme}://***@{authority.rsplit('@', 1)[1]}{slash}{path}"


def shown_options() -> dict[str, Any]:
    """The options as `info` shows them: a user:password written into an endpoint URL is masked."""
    return {key: shown_uri(value) if isinstance(value, str) else value for key, value in _options.items()}


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem for `url` and the path within it (bucket/key for S3). fsspec caches instances by
    their arguments, and starts afresh in a forked worker."""
    import fsspec

    protocol = url.split("://", 1)[0].lower()
    options = dict(_options)
    if protocol in ("s3", "s3a"):
        options.setdefault("config_kwargs", DEFAULT_S3_CONFIG)
        # One GET per object: with more, s3fs asks each object's size first (a HEAD) to split large reads in parts,
        # which doubles the requests for images a few MB at most.
        options.setdefault("max_concurrency", 1)
    # No listing cache: a service or a second ingest in one process must see objects added or removed since.
    options.setdefault("use_listings_cache", False)
    try:
        with _lock:
            fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as error:
        raise UsageError(f"cannot open {url.split('://', 1)[0]}:// locations ({error}); install imgsearch[s3] for s3://") from None
    if protocol in ("s3", "s3a"):
        fs.retries = S3FS_RETRIES  # a class attribute s3fs reads per call; no constructor argument sets it
    return fs, path


def transport_errors() -> tuple[type[BaseException], ...]:
    """The exceptions an object-store call raises for a store it cannot reach or that refuses it."""
    errors: list[type[BaseException]] = [OSError, asyncio.TimeoutError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientError as HttpClientError

        errors.append(HttpClientError)
    except ImportError:
        pass
    return tuple(errors)


def describe_os_error(error: OSError) -> str:
    """The one wording of file-system failures, for decoding, hashing and worker reads alike."""
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, IsADirectoryError):
        return "is a directory"
    if isinstance(error, PermissionError):
        return "permission denied"
    return f"cannot read file ({error.strerror or error})"


def describe_error(error: BaseException) -> str:
    """One line for a file or object that could not be stat'ed or read, with nothing of a request's signature or
    credentials: the file-system wording for local files, the store's first line for objects."""
    if isinstance(error, OSError) and type(error).__module__ == "builtins" and error.errno is not None:
        return describe_os_error(error)
    if isinstance(error, FileNotFoundError):
        return "not found"
    if isinstance(error, PermissionError):
        return f"access denied ({_first_line(error)})"
    return _first_line(error) or type(error).__name__


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""


@contextmanager
def reaching(location: str) -> Iterator[None]:
    """Object-store failures of a whole command (listing the catalog, reading the manifest) as one clear error:
    a missing bucket or prefix is CatalogError; refused credentials and an unreachable endpoint are
    ObjectStoreUnavailableError (exit 2; the API's 503)."""
    try:
        yield
    except FileNotFoundError:
        raise CatalogError(f"not found in the object store: {location}") from None
    except transport_errors() as error:
        raise ObjectStoreUnavailableError(f"cannot reach {location}: {describe_error(error)}") from None


def _url(fs: Any, path: str) -> str:
    return fs.unstrip_protocol(path)


def stat(location: str | os.PathLike[str]) -> FileStamp:
    """The stamp of a local file or an object (OSError or a transport error when it cannot be had)."""
    if not is_url(location):
        return FileStamp.of(os.stat(location))
    fs, path = filesystem(location)
    info = fs.info(path)
    if info.get("type") == "directory":
        raise IsADirectoryError(location)
    return FileStamp.of_object(info)


def stat_many(locations: list[str]) -> list[FileStamp | BaseException]:
    """Stamps of many locations, the objects' requests in flight together; each failure is returned in its place."""

    def one(location: str) -> FileStamp | BaseException:
        try:
            return stat(location)
        except transport_errors() as error:
            return error

    if not any(is_url(location) for location in locations):
        return [one(location) for location in locations]
    with ThreadPoolExecutor(REQUESTS_IN_FLIGHT, thread_name_prefix="imgsearch-stat") as pool:
        return list(pool.map(one, locations))


def read_bytes(location: str) -> tuple[bytes, FileStamp | None]:
    """A file's bytes and the stamp of what was read (None for an object: its listing's stamp is the one to keep,
    and only if the bytes are as long as the listing said)."""
    if not is_url(location):
        with open(location, "rb") as handle:
            stamp = FileStamp.of(os.fstat(handle.fileno()))
            return handle.read(), stamp
    fs, path = filesystem(location)
    return fs.cat_file(path), None


def read_ahead(items: Iterable[Any], location_of: Any) -> Iterator[tuple[Any, Any]]:
    """(item, fetched) in order, where `fetched` is an object's (bytes, None), or the error reading it, requested
    up to REQUESTS_IN_FLIGHT items ahead; None for a local file (read where it is decoded, no thread needed)."""
    from collections import deque

    pool: ThreadPoolExecutor | None = None
    window: deque[tuple[Any, Any]] = deque()

    def fetch(location: str) -> Any:
        try:
            return read_bytes(location)
        except transport_errors() as error:
            return error

    try:
        for item in items:
            location = location_of(item)
            if is_url(location):
                pool = pool or ThreadPoolExecutor(REQUESTS_IN_FLIGHT, thread_name_prefix="imgsearch-read")
                window.append((item, pool.submit(fetch, location)))
            else:
                window.append((item, None))
            while len(window) > REQUESTS_IN_FLIGHT or (window and window[0][1] is None):
                item, future = window.popleft()
                yield item, future.result() if future is not None else None
        while window:
            item, future = window.popleft()
            yield item, future.result() if future is not None else None
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def image_source(location: str | os.PathLike[str]) -> Path | bytes:
    """What the image decoder takes for a location: a local path as it is, an object's bytes (read here)."""
    return read_bytes(str(location))[0] if is_url(location) else Path(location)


def exists(location: str) -> bool:
    if not is_url(location):
        return Path(location).exists()
    try:
        fs, path = filesystem(location)
        return bool(fs.exists(path))
    except transport_errors():
        return True  # unknown is not gone: nothing is pruned or moved on a store that does not answer


def missing(locations: Iterable[str]) -> set[str]:
    """The locations whose file is gone. Objects are checked from one listing of each folder they are in (not a
    request per object); a folder that cannot be listed counts as present, so an outage deletes nothing."""
    gone: set[str] = set()
    by_folder: dict[str, list[str]] = {}
    for location in locations:
        if is_url(location):
            by_folder.setdefault(location.rsplit("/", 1)[0], []).append(location)
        elif not Path(location).exists():
            gone.add(location)
    for folder, members in by_folder.items():
        try:
            fs, path = filesystem(folder)
            listed = {_url(fs, name) for name in fs.ls(path, detail=False, refresh=True)}
        except FileNotFoundError:
            listed = set()
        except transport_errors():
            continue
        gone.update(member for member in members if member not in listed)
    return gone


def list_images(root: str, image_suffixes: Iterable[str]) -> Iterator[tuple[str, FileStamp]]:
    """The image objects under a URL prefix, sorted, with their stamps from the listing: a key with a hidden part
    (`.thumbs/`, `.DS_Store`) is skipped, as hidden files are in a folder. A URL of one object yields it alone."""
    suffixes = {suffix.lower() for suffix in image_suffixes}
    with reaching(root):
        fs, path = filesystem(root)
        info = fs.info(path)
        if info.get("type") != "directory":
            yield root, FileStamp.of_object(info)
            return
        found = fs.find(path, detail=True)
    prefix = path.rstrip("/") + "/"
    for name in sorted(found):
        relative = PurePosixPath(name[len(prefix):] if name.startswith(prefix) else name)
        if any(part.startswith(".") for part in relative.parts) or relative.suffix.lower() not in suffixes:
            continue
        yield _url(fs, name), FileStamp.of_object(found[name])


def label_of(location: str, root: str) -> str:
    """The key prefix between the root and the object's name, as a sub-folder gives a local file's label."""
    parent = location.rsplit("/", 1)[0]
    root = root.rstrip("/")
    return "" if parent == root else parent[len(root) + 1:]


def parent_of(location: str) -> str:
    return location.rsplit("/", 1)[0]


STREAM_BLOCK = 1 << 20


def open_blocks(url: str) -> tuple[int, Iterator[bytes]]:
    """An object's size and its bytes in blocks of STREAM_BLOCK: a response streams it with bounded memory. The
    first block is read here, so a missing object is FileNotFoundError and an unreachable store
    ObjectStoreUnavailableError before a response has begun."""
    try:
        with reaching("the object store"):
            fs, path = filesystem(url)
            handle = fs.open(path, "rb", block_size=STREAM_BLOCK, cache_type="none")
            size = int(handle.size)
            first = handle.read(STREAM_BLOCK)
    except CatalogError:
        raise FileNotFoundError(url) from None

    def blocks() -> Iterator[bytes]:
        with handle:
            block = first
            while block:
                yield block
                block = handle.read(STREAM_BLOCK)

    return size, blocks()


def write_bytes(location: str, data: bytes) -> None:
    """Write an object whole (an object store never shows a half-written object under its name)."""
    fs, path = filesystem(location)
    fs.pipe_file(path, data)


def remove(location: str) -> None:
    if not is_url(location):
        os.unlink(location)
        return
    fs, path = filesystem(location)
    fs.rm_file(path)


def open_text(location: str) -> Any:
    """A manifest, local or an object, as text (bytes that are not UTF-8 survive as surrogates)."""
    if not is_url(location):
        return open(location, newline="", encoding="utf-8", errors="surrogateescape")
    import io

    with reaching(location):
        fs, path = filesystem(location)
        data = fs.cat_file(path)
    return io.StringIO(data.decode("utf-8", errors="surrogateescape"), newline="")


def normalised_key(location: str) -> str | None:
    """`location` if it is a plain URL: no `..` or `.` part, no empty part (`//`), no percent-encoding, no
    backslash; else None. A URL that fails this never names a served object."""
    scheme, _, rest = location.partition("://")
    if not rest or "%" in rest or "\\" in rest or "\0" in rest or "?" in rest or "#" in rest:
        return None
    parts = rest.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return None
    return f"{scheme.lower()}://{rest}"

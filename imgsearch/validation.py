"""The one place where user-supplied row fields are checked: labels, stored paths and metadata.

CLI, API, manifests and imports all call these before anything is written, so a bad value is a clear error
(or a failed row in a report) instead of a Milvus error halfway through a batch. Limits match the schema.
"""

from __future__ import annotations

import json
import math
import unicodedata
from typing import Any

from imgsearch.errors import InvalidInputError

ID_LENGTH = 64  # hex SHA-256
LABEL_BYTES = 512  # VARCHAR max_length of `label`, in UTF-8 bytes
PATH_BYTES = 4096  # VARCHAR max_length of `path`
METADATA_BYTES = 65_536  # Milvus's limit for one JSON value
# Kept in a row's metadata by ingest, not by users: the other paths that held the row's exact bytes when they were
# ingested (the store keeps one row per content). `imgsearch duplicates` reports them as identical content.
COPIES_KEY = "imgsearch.copies"
# Also imgsearch's own: true on a row whose file the REST service stored at upload (content-named under the upload
# folder). Only such a file is ever removed with its row; every other file is the user's (docs/security.md).
UPLOAD_KEY = "imgsearch.upload"
RESERVED_KEYS = (COPIES_KEY, UPLOAD_KEY)
# Invisible characters that reorder or hide text on screen: never part of a name a person typed on purpose.
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def is_hidden(character: str) -> bool:
    """A character that acts on a terminal or reorders text instead of showing: controls, line separators, bidi
    overrides, and lone surrogates (bytes of a file name that are not UTF-8). Refused in labels, escaped when
    printed."""
    return unicodedata.category(character) in ("Cc", "Cs", "Zl", "Zp") or character in BIDI_CONTROLS


def validate_label(label: Any, *, required: bool = False) -> str:
    """The label as stored: NFC-normalised (so composed and decomposed accents are one label), surrounding
    whitespace removed. Refused: non-text, control or bidi characters, more than LABEL_BYTES bytes of UTF-8,
    and an empty label where one is required."""
    if not isinstance(label, str):
        raise InvalidInputError(f"label must be text, not {type(label).__name__}")
    label = unicodedata.normalize("NFC", label).strip()
    if required and not label:
        raise InvalidInputError("the label must not be empty")
    hidden = next((c for c in label if is_hidden(c)), None)
    if hidden is not None:
        raise InvalidInputError(f"the label contains the control character U+{ord(hidden):04X}")
    _check_utf8_size(label, "the label", LABEL_BYTES)
    return label


def validate_path_text(path: str) -> str:
    """A file path as it will be stored (any file name the file system allows, within the schema's size)."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise InvalidInputError("the path must be non-empty text without NUL")
    _check_utf8_size(path, "the path", PATH_BYTES)
    return path


def validate_metadata(metadata: Any) -> dict[str, Any]:
    """A JSON object of at most METADATA_BYTES; NaN and infinity are not JSON; RESERVED_KEYS are imgsearch's own."""
    if not isinstance(metadata, dict):
        raise InvalidInputError(f"metadata must be a JSON object, not {type(metadata).__name__}")
    reserved = next((key for key in RESERVED_KEYS if key in metadata), None)
    if reserved is not None:
        raise InvalidInputError(f"metadata key {reserved!r} is reserved (imgsearch records its own facts about a row there)")
    try:
        text = json.dumps(metadata, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as error:
        raise InvalidInputError(f"metadata is not JSON: {error}") from None
    _check_utf8_size(text, "metadata", METADATA_BYTES)
    return metadata


def user_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """A row's metadata as the user gave it (without the copies ingest recorded or the upload mark)."""
    return {key: value for key, value in (metadata or {}).items() if key not in RESERVED_KEYS}


def is_upload(metadata: dict[str, Any] | None) -> bool:
    """Whether the row's file is one the REST service stored at upload (UPLOAD_KEY)."""
    return (metadata or {}).get(UPLOAD_KEY) is True


def recorded_copies(metadata: dict[str, Any] | None) -> list[str]:
    """The other paths ingest recorded for a row's bytes."""
    copies = (metadata or {}).get(COPIES_KEY)
    return [path for path in copies if isinstance(path, str)] if isinstance(copies, list) else []


def with_copies(metadata: dict[str, Any] | None, copies: list[str], *, upload: bool | None = None) -> tuple[dict[str, Any], int]:
    """The user's metadata with `copies` recorded, as many as fit in METADATA_BYTES; (metadata, copies left out).
    The upload mark is kept as `metadata` has it, unless `upload` says otherwise (the row's path changed)."""
    base = user_metadata(metadata)
    if is_upload(metadata) if upload is None else upload:
        base[UPLOAD_KEY] = True
    if not copies:
        return base, 0
    size = _json_bytes({**base, COPIES_KEY: []})  # json.dumps's own separators: ", " between items
    kept: list[str] = []
    for path in copies:
        size += _json_bytes(path) + (2 if kept else 0)
        if size > METADATA_BYTES:
            break
        kept.append(path)
    return ({**base, COPIES_KEY: kept} if kept else base), len(copies) - len(kept)


def _json_bytes(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False).encode("utf-8"))


def _check_utf8_size(text: str, what: str, limit: int) -> None:
    """Milvus limits VARCHAR and JSON by UTF-8 bytes; bytes of a file name that are not UTF-8 arrive as lone
    surrogates, which cannot be stored at all."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInputError(f"{what} is not valid UTF-8 (a file name in another encoding?)") from None
    if size > limit:
        raise InvalidInputError(f"{what} is {size} bytes of UTF-8; the limit is {limit}")


def validate_id(value: Any) -> str:
    """The id as stored (lower case; an id copied in upper case names the same image)."""
    if not isinstance(value, str) or len(value) != ID_LENGTH or any(c not in "0123456789abcdef" for c in value.lower()):
        raise InvalidInputError("id must be 64 hex characters (the SHA-256 of the file)")
    return value.lower()


def validate_vector(vector: Any, dim: int) -> list[float]:
    values = list(vector) if vector is not None else []
    if len(values) != dim:
        raise InvalidInputError(f"the vector has {len(values)} values; the collection's model has {dim}")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise InvalidInputError("the vector holds a value that is not a finite number")
    return values

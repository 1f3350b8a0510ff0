"""Search by image (and by text for CLIP encoders): the one implementation behind CLI and API."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgsearch.config import DEFAULT_MAX_PIXELS
from imgsearch.images import decode_in_batches
from imgsearch.store import Hit, MilvusStore, label_is

if TYPE_CHECKING:  # torch is imported only when a model is loaded
    from imgsearch.encoders import Encoder


@dataclass
class QueryResult:
    query: str
    results: list[Hit] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "results": [hit.to_dict() for hit in self.results]}


def search_paths(
    encoder: Encoder,
    store: MilvusStore,
    paths: Iterable[str | Path],
    *,
    k: int = 10,
    filter: str = "",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[list[QueryResult], list[dict[str, str]]]:
    """Search with every image under `paths`; unreadable queries are reported, not fatal."""
    results: list[QueryResult] = []
    failed: list[dict[str, str]] = []
    for names, images in decode_in_batches(paths, min_side=encoder.input_size, max_pixels=max_pixels, failed=failed):
        vectors = encoder.encode_images(images)
        for name, hits in zip(names, store.search(vectors, k=k, filter=filter)):
            results.append(QueryResult(query=name, results=hits))
    return results, failed


def search_text(encoder: Encoder, store: MilvusStore, texts: Sequence[str], *, k: int = 10, filter: str = "") -> list[QueryResult]:
    vectors = encoder.encode_text(texts)
    return [QueryResult(query=text, results=hits) for text, hits in zip(texts, store.search(vectors, k=k, filter=filter))]


def with_label(filter: str, label: str) -> str:
    """`filter` narrowed to one label (a value, never parsed as an expression)."""
    if not label:
        return filter
    only = label_is(label)
    return f"({filter}) and {only}" if filter.strip() else only

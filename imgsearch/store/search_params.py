"""The vector index a collection is built with, and what a search asks of it, the one place their rules live.
HNSW's `ef` (candidates walked per search; AUTOINDEX builds HNSW on Lite and on a server): HNSW returns at most `ef`
hits, so every search asks for ef >= k. IVF_SQ8's `nprobe` (clusters scanned per search): for large server
collections, where HNSW would hold every raw vector in memory (docs/scaling.md). Every search carries both; each index reads its own."""

from __future__ import annotations

from typing import Any

from imgsearch.config import LARGE_COLLECTION_ROWS, is_lite_uri

# Lite's own default ef is 64, so a search for k = 300 gave 227 rows. On 100k clustered vectors, photo queries far
# from every cluster had recall@10 0.933 through the service at ef 256 and 0.950 at 512 on Lite, for a p50 of 111.8
# -> 116.3 ms (Lite's per-search overhead dwarfs the graph walk); on the 2.3.5 server ef 512 added ~6-8 ms to a
# ~32 ms p50 (benchmarks/api.py --efs; docs/benchmarks.md).
LITE_EF = 512
SERVER_EF = 256
# Filtered searches (the labeled references) lose recall at a low ef: 0.55 at ef 64, 0.87 at ef 256 on structured
# 100k vectors, measured on Lite.
FILTERED_EF = 256
# Near-duplicate searches want very close neighbours, which a small ef finds: on the 2.3.5 server at 100k rows a
# query took 4.7 ms at ef 64 and 2.9 ms at ef 32 (benchmarks/duplicates.py, docs/duplicates.md). 34 is twice the
# default 16 neighbours and the row itself.
CLOSE_EF = 34


# An explicit index for server collections (`IMGSEARCH_INDEX`); Lite builds its own whatever is asked.
INDEXES = ("auto", "hnsw", "ivf_sq8")  # auto and hnsw: AUTOINDEX, which is HNSW on the 2.3.5 server
IVF_NLIST = 1024  # clusters per segment (a server seals segments of about 100k rows of 1,280 floats)
SERVER_NPROBE = 16  # at 1M rows: recall@10 0.964 through the service, p50 24-27 ms (8: 0.959; 32 and up: 0.965, slower)


def chosen_index(setting: str, rows: int | None = None) -> str:
    """The index the `index` setting means for a new collection that will hold `rows` (None: not known, as for a
    catalog before it is walked): auto is ivf_sq8 from LARGE_COLLECTION_ROWS rows, else hnsw."""
    if setting != "auto":
        return setting
    return "ivf_sq8" if rows is not None and rows >= LARGE_COLLECTION_ROWS else "hnsw"


def index_for(uri: str, index: str = "auto") -> tuple[str, dict[str, Any]]:
    """(index_type, build params) for a new collection."""
    if index not in INDEXES:
        raise ValueError(f"index must be one of {', '.join(INDEXES)}, not {index!r}")
    if index == "ivf_sq8" and not is_lite_uri(uri):
        return "IVF_SQ8", {"nlist": IVF_NLIST}
    return "AUTOINDEX", {}  # no build parameters: Lite ignores them, and a server picks its own (HNSW on 2.3.5)


def ef(uri: str, k: int, asked: int | None = None) -> int:
    """The ef a search for `k` hits runs with: `asked`, else the default for Lite or a server; never below k."""
    return max(k, asked if asked is not None else LITE_EF if is_lite_uri(uri) else SERVER_EF)


def filtered(k: int) -> dict[str, Any]:
    """For a search among the labeled references."""
    return {"params": {"ef": max(FILTERED_EF, 4 * k)}}


def close_neighbours(k: int) -> dict[str, Any]:
    """For a search of each stored vector's k nearest (itself included), looking for near-duplicates."""
    return {"params": {"ef": max(CLOSE_EF, 2 * k)}}

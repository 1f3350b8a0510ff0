"""A large collection on the Milvus server: load rate, index build, server memory, and search through the service.

    python benchmarks/scale.py --uri http://127.0.0.1:19530 [--rows 1000000] [--index ivf_sq8] [--nprobes 16,32,64]

Rows: clustered unit vectors at Lite0's dimension (1,280) around the vectors of 1,000 real product photos
(Fashion-MNIST's training split, encoded by the encoder the service uses), each with a path, a label and metadata,
upserted in chunks through MilvusStore.upsert (the call ingest's writer makes). Queries: 200 held-out photos
(Fashion-MNIST's test split) sent to the real service (`POST /search`, k 10) over loopback HTTP; recall@10 is measured
against exact search over every stored vector (kept as a running top 10 while the rows are made, so the rows are never
held at once). The collection is made with --index (the store's own choice when "auto"); the index build is timed
from the last flush until the server reports every row indexed. Server memory: the RSS of the `milvus` processes.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from imgsearch.api.live import LiveServer  # noqa: E402
from imgsearch.config import load_settings  # noqa: E402
from imgsearch.datasets import fashion_mnist  # noqa: E402
from imgsearch.store import ImageRecord, MilvusStore, search_params  # noqa: E402

CENTRES = 1000
CHUNK = 5000
NOISE = 0.0135  # per dimension: a row's cosine to its centre is about 0.9 (1 / sqrt(1 + 1280 * NOISE**2))


def server_rss_bytes() -> int:
    """Resident memory of the Milvus server's processes on this machine (Linux /proc)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            if b"milvus run standalone" in command:
                total += int((entry / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
    return total


def photo_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def fill(store: MilvusStore, rows: int, centres: np.ndarray, queries: np.ndarray, write: bool = True) -> tuple[np.ndarray, float]:
    """Upsert `rows` rows (the same every time; `write=False` makes them without upserting, for a collection that
    holds them already); returns the exact top-10 row numbers per query, and the seconds the upserts took."""
    rng = np.random.default_rng(1)
    best_scores = np.full((len(queries), 10), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), 10), dtype=np.int64)
    upsert_seconds = 0.0
    for start in range(0, rows, CHUNK):
        count = min(CHUNK, rows - start)
        picked = rng.integers(0, len(centres), count)
        vectors = centres[picked] + NOISE * rng.standard_normal((count, centres.shape[1]), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        scores = queries @ vectors.T
        merged_scores = np.concatenate([best_scores, scores], axis=1)
        merged_rows = np.concatenate([best_rows, np.broadcast_to(np.arange(start, start + count), scores.shape)], axis=1)
        top = np.argpartition(-merged_scores, 10, axis=1)[:, :10]
        best_scores, best_rows = np.take_along_axis(merged_scores, top, 1), np.take_along_axis(merged_rows, top, 1)
        if not write:
            continue
        records = [
            ImageRecord(id=f"{start + i:064x}", vector=vector, path=f"/catalog/c{picked[i] % 50}/{start + i}.jpg", label=f"c{picked[i] % 50}",
                        metadata={"sku": f"SKU-{start + i}", "price": float(picked[i] % 97)})
            for i, vector in enumerate(vectors)
        ]
        began = time.perf_counter()
        store.upsert(records)
        upsert_seconds += time.perf_counter() - began
        if (start // CHUNK) % 20 == 0:
            print(f"  {start + count} rows upserted ({(start + count) / upsert_seconds:.0f} rows/s so far); server RSS "
                  f"{server_rss_bytes() / 2**30:.2f} GiB", flush=True)
    return best_rows, upsert_seconds


def wait_for_index(store: MilvusStore, rows: int, timeout: float) -> float:
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        index = store.client.describe_index(store.collection, "vector")
        # The 2.3.5 server indexes sealed segments as they come, then again the segments compaction merges them into
        # (pending_index_rows): done when nothing is pending.
        if index.get("pending_index_rows", 0) == 0 and index.get("indexed_rows", 0) >= rows:
            return time.perf_counter() - started
        time.sleep(2)
    raise SystemExit(f"the index did not cover {rows} rows within {timeout:.0f} s: {index}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uri", required=True, help="a Milvus server")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--index", default="auto", help="auto (the store's choice for a server), hnsw or ivf_sq8")
    parser.add_argument("--nprobes", default="", help="IVF nprobe values to measure [default: the store's]")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--index-timeout", type=float, default=7200)
    parser.add_argument("--reuse", action="store_true", help="measure a collection an earlier run filled (its rows are made again, not written)")
    args = parser.parse_args()
    from imgsearch.encoders import load_encoder

    encoder = load_encoder("efficientnet_lite0", device="cpu", runtime="auto")  # what the service opens for a new collection
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.rows} rows at dim {encoder.dim}, {encoder.name} "
          f"{encoder.precision}; index {args.index}; server {args.uri} (RSS before: {server_rss_bytes() / 2**30:.2f} GiB)", flush=True)
    train, test = fashion_mnist("train"), fashion_mnist("test")
    centres = encoder.encode_images([train.sources[i]() for i in range(CENTRES)])
    query_images = [test.sources[i]() for i in range(args.queries)]
    queries = encoder.encode_images(query_images)
    collection = f"scale_{args.rows}_{args.index}"
    store = MilvusStore(
        args.uri, collection, model=encoder.name, dim=encoder.dim, preprocess_version=encoder.preprocess_version,
        precision=encoder.precision, index=args.index,
    )
    if args.reuse:
        if store.count() != args.rows:
            raise SystemExit(f"{collection} holds {store.count()} rows, not {args.rows}: run without --reuse")
        exact, _ = fill(store, args.rows, centres, queries, write=False)
    elif store.count():
        raise SystemExit(f"{collection} already holds rows: drop it first, or measure it with --reuse")
    started = time.perf_counter()
    if not args.reuse:
        exact, upsert_seconds = fill(store, args.rows, centres, queries)
        store.flush()
        loaded = time.perf_counter() - started
        print(f"loaded {args.rows} rows in {loaded:.0f} s: {args.rows / loaded:.0f} rows/s including the flush "
              f"({args.rows / upsert_seconds:.0f} rows/s in the upsert calls); server RSS {server_rss_bytes() / 2**30:.2f} GiB", flush=True)
    build = wait_for_index(store, args.rows, args.index_timeout)
    described = store.client.describe_index(collection, "vector")
    print(f"index {described.get('index_type')} {described.get('params', '')}: every row indexed {build:.0f} s after the flush "
          f"({time.perf_counter() - started:.0f} s from the first row); server RSS {server_rss_bytes() / 2**30:.2f} GiB", flush=True)
    store.client.release_collection(collection)
    store.client.load_collection(collection)  # searched from the built index only, as after a restart
    print(f"after a reload: server RSS {server_rss_bytes() / 2**30:.2f} GiB", flush=True)
    store.close()
    images = [photo_bytes(image) for image in query_images]
    for nprobe in [int(n) for n in args.nprobes.split(",")] if args.nprobes else [search_params.SERVER_NPROBE]:
        search_params.SERVER_NPROBE = nprobe
        p50, p99, found = measure(args.uri, collection, images)
        hits = [len({f"{row:064x}" for row in exact[i]} & set(found[i])) for i in range(len(images))]
        print(f"nprobe {nprobe}: through the service p50 {p50:.1f} ms, p99 {p99:.1f} ms; recall@10 {sum(hits) / (10 * len(images)):.3f} "
              f"on {len(images)} held-out photos; server RSS {server_rss_bytes() / 2**30:.2f} GiB", flush=True)


def measure(uri: str, collection: str, images: list[bytes]) -> tuple[float, float, dict[int, list[str]]]:
    """The real service on the collection: each photo sent once after a warm-up, one at a time."""
    with tempfile.TemporaryDirectory() as folder:
        settings = load_settings(milvus_uri=uri, collection=collection, device="cpu", upload_dir=folder)
        found: dict[int, list[str]] = {}
        latencies = []
        with LiveServer(settings) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
            for i in list(range(5)) + list(range(len(images))):
                began = time.perf_counter()
                response = client.post("/search", files={"image": ("q.png", images[i], "image/png")}, data={"k": "10"})
                latencies.append(time.perf_counter() - began)
                response.raise_for_status()
                found[i] = [hit["id"] for hit in response.json()["results"]]
    measured = np.array(latencies[5:]) * 1000
    return float(np.percentile(measured, 50)), float(np.percentile(measured, 99)), found


if __name__ == "__main__":
    main()

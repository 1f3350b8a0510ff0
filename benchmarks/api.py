"""Search-by-image latency and throughput of `imgsearch serve` over loopback HTTP.

    python benchmarks/api.py [--sizes 1000,10000,100000] [--requests 100] [--clients 8] [--uri PATH_OR_URL]

For each size, random unit vectors are inserted directly into a fresh collection (no encoding), the real
service is started on it (uvicorn, the default Lite0 encoder), and real photos (scikit-image) are sent as
queries: p50/p99 of sequential requests, then throughput with --clients concurrent clients.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from imgsearch.api.live import LiveServer  # noqa: E402  (the same loopback server the tests use)
from imgsearch.config import load_settings  # noqa: E402
from imgsearch.store import ImageRecord, MilvusStore  # noqa: E402

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "coins")


def query_images() -> list[bytes]:
    from PIL import Image
    from skimage import data

    images = []
    for name in PHOTOS:
        buffer = io.BytesIO()
        Image.fromarray(getattr(data, name)()).convert("RGB").save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def fill(uri: str, collection: str, size: int, dim: int = 1280) -> None:
    from imgsearch.encoders import load_torch_encoder

    encoder = load_torch_encoder("efficientnet_lite0", device="cpu")  # identity only: name and preprocessing
    store = MilvusStore(uri, collection, model=encoder.name, dim=dim, preprocess_version=encoder.preprocess_version)
    rng = np.random.default_rng(size)
    for start in range(0, size, 5000):
        vectors = rng.normal(size=(min(5000, size - start), dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        store.upsert([ImageRecord(id=f"{start + i:064x}", vector=v, path=f"/bench/{start + i}.jpg", label=f"c{(start + i) % 50}")
                      for i, v in enumerate(vectors)])
    store.flush()
    # Measure the steady state: wait until the index covers every row (Milvus builds it in the background).
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        index = store.client.describe_index(collection, "vector")
        if index.get("pending_index_rows", 0) == 0 and index.get("indexed_rows", size) >= size:
            break
        time.sleep(1)
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=50)
    parser.add_argument("--uri", default=None, help="Milvus Lite path or server URI [default: a temporary Lite file]")
    args = parser.parse_args()
    images = query_images()
    folder = Path(tempfile.mkdtemp(prefix="imgsearch-api-bench-"))
    uri = args.uri or str(folder / "bench.db")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; Milvus at {uri}; Lite0 on the CPU (onnxruntime)\n", flush=True)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        collection = f"bench_{size}"
        started = time.perf_counter()
        fill(uri, collection, size)
        print(f"{size} vectors inserted in {time.perf_counter() - started:.1f} s", flush=True)
        settings = load_settings(milvus_uri=uri, collection=collection, device="cpu", upload_dir=folder / "uploads")
        with LiveServer(settings) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
            def search(i: int) -> float:
                began = time.perf_counter()
                response = client.post("/search", files={"image": ("q.jpg", images[i % len(images)], "image/jpeg")}, data={"k": "10"})
                assert response.status_code == 200, response.text
                return time.perf_counter() - began

            for i in range(5):
                search(i)  # warm-up
            latencies = np.array([search(i) for i in range(args.requests)]) * 1000
            began = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                concurrent = list(pool.map(search, range(args.clients * args.per_client)))
            throughput = len(concurrent) / (time.perf_counter() - began)
        p50, p99 = np.percentile(latencies, 50), np.percentile(latencies, 99)
        c50, c99 = np.percentile(np.array(concurrent) * 1000, [50, 99])
        rows.append((size, p50, p99, throughput, c50, c99))
        print(f"{size}: p50 {p50:.1f} ms, p99 {p99:.1f} ms; {args.clients} clients: {throughput:.1f} requests/s "
              f"(p50 {c50:.0f} ms, p99 {c99:.0f} ms)", flush=True)
    print(f"\n| stored vectors | p50 ms | p99 ms | {args.clients} clients: requests/s | {args.clients} clients: p50 / p99 ms |\n|---|---|---|---|---|")
    for size, p50, p99, throughput, c50, c99 in rows:
        print(f"| {size:,} | {p50:.1f} | {p99:.1f} | {throughput:.1f} | {c50:.0f} / {c99:.0f} |")


if __name__ == "__main__":
    main()

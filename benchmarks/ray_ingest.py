"""Local ingest against `imgsearch ingest --ray` on a local cluster of this machine, whole process, in one run.

    python benchmarks/ray_ingest.py --uri http://127.0.0.1:19530 [--images 2000] [--rounds 2]

The same camera-size JPEGs (benchmarks/ingest.py's catalog) go into fresh collections on the Milvus server, each run
with a fresh hash cache: (a) `imgsearch ingest` as it runs on one machine; (b) `imgsearch ingest --ray`, which starts a
local Ray cluster (all cores, a 2 GiB object store) for the run and stops it afterwards. Alternating rounds; prints
images/s whole process, the seconds before and after the ingest proper ("start-up": interpreter, model, and for (b) the
cluster), the rate inside the ingest, peak memory (PSS of the process tree, Ray's processes included), and (b)/(a).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.ingest import make_catalog, run_ingest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uri", required=True, help="a Milvus server (Ray needs one)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "imgsearch-bench")
    args = parser.parse_args()
    catalog = make_catalog(args.cache / f"catalog-{args.images}", args.images)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.images} camera-size JPEGs; server {args.uri}", flush=True)
    results: dict[str, list[tuple[float, float, float, int]]] = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="imgsearch-ray-bench-") as tmp:
        env = {"RAY_TMPDIR": tmp}  # the local cluster's files, removed with the folder
        for round_number in range(args.rounds):
            for kind, extra in (("local", ()), ("ray", ("--ray",))):
                collection = f"bench_{kind}_{uuid.uuid4().hex[:8]}"
                seconds, report, peak = run_ingest(
                    catalog, args.uri, args.batch_size, args.runtime, extra=("--collection", collection, *extra), env=env,
                    hash_cache=Path(tmp) / f"{collection}.sqlite", sample_seconds=0.5,  # Ray runs a dozen processes
                )
                assert report["indexed"] == args.images and not report["failed"], report
                startup = seconds - report["seconds"]
                results[kind].append((report["indexed"] / seconds, startup, report["images_per_second"], peak))
                print(f"round {round_number + 1} {kind:5}: {report['indexed'] / seconds:6.1f} images/s whole process "
                      f"({seconds:.1f} s, of which {startup:.1f} s before and after the ingest proper); inside the ingest "
                      f"{report['images_per_second']:.1f} images/s; peak {peak / 2**30:.2f} GiB", flush=True)
                drop(args.uri, collection)
    medians = {kind: [statistics.median(column) for column in zip(*rows)] for kind, rows in results.items()}
    for kind, (rate, startup, inside, peak) in medians.items():
        print(f"median {kind:5}: {rate:6.1f} images/s whole process, start-up {startup:.1f} s, inside the ingest {inside:.1f} images/s, "
              f"peak {peak / 2**30:.2f} GiB")
    print(f"ray / local, whole process: {medians['ray'][0] / medians['local'][0]:.2f} (target >= 0.8); inside the ingest: "
          f"{medians['ray'][2] / medians['local'][2]:.2f}")


def drop(uri: str, collection: str) -> None:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri)
    client.drop_collection(collection)
    client.close()


if __name__ == "__main__":
    main()

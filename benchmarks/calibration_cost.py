"""What the self-calibrated "unknown" threshold costs an ingest: `self_calibrate` (the code every ingest and enrolment
that changes labeled rows runs) timed on a Milvus Lite collection of N labeled 1,280-d vectors.

    python benchmarks/calibration_cost.py --rows 100000 --labels 100
    python benchmarks/calibration_cost.py --rows 100000 --labels 5000   # a catalog of many SKUs, 20 photos each

The vectors are synthetic (clustered unit vectors, one cluster per label), so only the seconds mean anything here;
accuracy comes from benchmarks/recognition.py on real images. The ingest it is compared with runs at the rate
docs/benchmarks.md measured for Lite0 on this machine (pass --ingest-rate).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from imgsearch.recognition.abstention import self_calibrate
from imgsearch.store import ImageRecord, MilvusStore

DIM = 1280


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--labels", type=int, default=100)
    parser.add_argument("--ingest-rate", type=float, default=61.5, help="images/s of a whole Lite0 ingest on this machine")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(args.labels, DIM)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        store = MilvusStore(str(Path(folder) / "cost.db"), "cost", model="synthetic", dim=DIM, precision="fp32")
        started = time.perf_counter()
        for start in range(0, args.rows, 2000):
            labels = np.arange(start, min(start + 2000, args.rows)) % args.labels
            vectors = centres[labels] + rng.normal(scale=1.0, size=(len(labels), DIM)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            store.upsert([
                ImageRecord(id=f"{start + i:064x}", vector=vector, path=f"/synthetic/{start + i}.jpg", label=f"label-{label}")
                for i, (vector, label) in enumerate(zip(vectors, labels))
            ])
        store.flush()
        store.wait_for_index()
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; {args.rows} rows, {args.labels} labels inserted and "
              f"indexed in {time.perf_counter() - started:.0f} s", flush=True)
        calibration = self_calibrate(store)
        store.close()
    ingest = args.rows / args.ingest_rate
    print("| rows | labels | references scored | self_calibrate | share of an ingest at "
          f"{args.ingest_rate} images/s ({ingest:.0f} s) |\n|---|---|---|---|---|")
    print(f"| {args.rows} | {args.labels} | {calibration.sample} | {calibration.seconds:.1f} s | "
          f"{100 * calibration.seconds / ingest:.1f} % |")


if __name__ == "__main__":
    main()

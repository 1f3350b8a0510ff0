"""What an ingest did: counts, failures and where the time went (the CLI prints it, --json and the API return it)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# progress(stage, done, total): stage is "scan" (total unknown: None), "encode", "index" (Milvus Lite building its
# search index after the writes: no counts) or "calibrate" (the self-calibrated abstention threshold: no counts)
ProgressCallback = Callable[[str, int, int | None], None]


@dataclass
class IngestReport:
    indexed: int = 0  # newly encoded and stored
    skipped: int = 0  # already stored with the same path, label and metadata
    updated: int = 0  # already stored; path, label or metadata changed (renames): not re-encoded
    pruned: int = 0
    replaced: int = 0  # rows of files that changed since the last ingest (their new content was stored)
    copies: int = 0  # paths newly recorded as identical copies of a stored row (same bytes, one row)
    copies_left_out: int = 0  # identical copies not recorded: the row's metadata was full
    labeled_indexed: int = 0  # of `indexed`, those with a label (new references)
    calibration: dict[str, Any] | None = None  # the self-calibrated abstention threshold, when it was recomputed
    enrolment_check: dict[str, Any] | None = None  # enrolment only: how the new references sit among the others
    other_shards: int = 0  # with --shard: images left to the other shards
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    # Stage split. decode_seconds (read + hash + decode + preprocess) and, with lanes, encode_seconds are summed
    # over the workers or lanes; wait_seconds is how long this process's main thread sat waiting for batches.
    decode_seconds: float = 0.0
    wait_seconds: float = 0.0
    encode_seconds: float = 0.0
    insert_seconds: float = 0.0
    index_seconds: float = 0.0  # waiting for Milvus Lite's index builds after the writes (0 on a server)
    first_batch_seconds: float = 0.0  # from the start to the first decoded batch reaching the encoder (start-up)
    started: float = field(default_factory=time.perf_counter, repr=False, compare=False)
    workers: int = 0
    encoder_threads: int = 0  # the encoder's threads when ingest chose them (0: the runtime's default)
    lanes: int = 1  # threads that each decoded and encoded their own batches (reader.split_cores)
    measured_ms: dict[str, float] | None = None  # per-image core-ms of decode and encode that chose the split
    writer: str = ""  # "process" or "thread": where the upserts ran (writer.py)
    gpu_decoded: int = 0  # JPEGs decoded on the encoder's GPU rather than by the CPU workers
    max_in_flight: int = 0
    in_flight_bound: int = 0

    def add_read(self, batch: dict[str, Any]) -> int:
        """Count a batch the decode workers read (reader.collate's dict); returns the files it accounts for."""
        self.failed.extend(batch["failed"])
        self.other_shards += len(batch["other_shards"])
        self.decode_seconds += batch["decode_seconds"]
        return len(batch["items"]) + len(batch["failed"]) + len(batch["other_shards"])

    def add_encoded(self, items: list[dict[str, Any]], seconds: float) -> None:
        self.indexed += len(items)
        self.labeled_indexed += sum(1 for item in items if item["label"])
        self.encode_seconds += seconds

    @property
    def references_changed(self) -> bool:
        """Whether labeled rows may have changed: what makes the self-calibrated threshold stale."""
        return bool(self.labeled_indexed or self.updated or self.pruned or self.replaced)

    @property
    def images_per_second(self) -> float:
        return self.indexed / self.seconds if self.seconds > 0 else 0.0

    def interrupted_line(self) -> str:
        """What a run stopped midway had done; rows encoded but not yet written are encoded again by the rerun."""
        return (
            f"after {time.perf_counter() - self.started:.1f} s: {self.indexed} images encoded, {self.skipped} already stored, "
            f"{len(self.failed)} failed"
        )

    def summary_line(self) -> str:
        line = f"indexed {self.indexed}, skipped {self.skipped} unchanged, failed {len(self.failed)}"
        extras = []
        if self.updated:
            extras.append(f"updated {self.updated} moved/relabelled")
        if self.replaced:
            extras.append(f"replaced {self.replaced} changed")
        if self.copies:
            extras.append(f"recorded {self.copies} identical copies of stored images")
        if self.copies_left_out:
            extras.append(f"{self.copies_left_out} more copies not recorded (metadata full)")
        if self.pruned:
            extras.append(f"pruned {self.pruned}")
        if self.other_shards:
            extras.append(f"{self.other_shards} left to other shards")
        extras.append(f"{self.seconds:.1f} s, {self.images_per_second:.1f} images/s")
        if self.index_seconds >= 0.1:
            extras.append(f"of which {self.index_seconds:.1f} s building Milvus Lite's search index")
        if self.calibration:
            extras.append(
                f"unknown below {self.calibration['threshold']:.4f} (margin {self.calibration['margin']:.4f}), "
                f"self-calibrated on {self.calibration['sample']} references in {self.calibration['seconds']:.1f} s"
            )
        return f"{line} ({'; '.join(extras)})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "indexed": self.indexed,
            "skipped": self.skipped,
            "updated": self.updated,
            "pruned": self.pruned,
            "replaced": self.replaced,
            "copies": self.copies,
            "copies_left_out": self.copies_left_out,
            "other_shards": self.other_shards,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "stages": {
                "decode_seconds": round(self.decode_seconds, 3),
                "wait_seconds": round(self.wait_seconds, 3),
                "encode_seconds": round(self.encode_seconds, 3),
                "insert_seconds": round(self.insert_seconds, 3),
                "index_seconds": round(self.index_seconds, 3),
                "first_batch_seconds": round(self.first_batch_seconds, 3),
            },
            "calibration": self.calibration,
            **({"check": self.enrolment_check} if self.enrolment_check is not None else {}),
            "workers": self.workers,
            "encoder_threads": self.encoder_threads,
            "lanes": self.lanes,
            "measured_ms": self.measured_ms,
            "writer": self.writer,
            "gpu_decoded": self.gpu_decoded,
            "max_in_flight": self.max_in_flight,
        }

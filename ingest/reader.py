"""Read the plan: worker processes read, hash, decode and preprocess images into batches for the encoder."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imgsearch.errors import ImageDecodeError
from imgsearch.images import describe_os_error, load_image
from imgsearch.ingest.catalog import bytes_sha256

PREFETCH_BATCHES = 4  # per worker
# Forked workers start at once and share the parent's imported modules; they only read files and run
# PIL/torchvision, never the parent's gRPC or Milvus client. IMGSEARCH_WORKER_START=spawn is the cautious fallback.
WORKER_START_METHOD = os.environ.get("IMGSEARCH_WORKER_START", "fork")
MAX_AUTO_WORKERS = 8


def auto_workers(pending: int, batch_size: int) -> int:
    """Decode in the main process for tiny jobs (spawning workers costs more); else leave one core to encoding."""
    if pending < 2 * batch_size:
        return 0
    return max(1, min(MAX_AUTO_WORKERS, (os.cpu_count() or 2) - 1))


class PlannedImages(IterableDataset):
    """Streams the plan file; each worker decodes every n-th line, so no process holds the catalog."""

    def __init__(self, plan_path: Path, preprocess: Callable, max_pixels: int, min_side: int) -> None:
        self.plan_path = plan_path
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.min_side = min_side

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        with open(self.plan_path, encoding="utf-8") as plan:
            for line in islice(plan, worker_id, None, num_workers):
                item = json.loads(line)
                started = time.perf_counter()
                try:
                    data = Path(item["path"]).read_bytes()
                    item["id"] = bytes_sha256(data)  # the bytes we encode decide the id, even if the file just changed
                    image = load_image(data, max_pixels=self.max_pixels, min_side=self.min_side, name=item["path"])
                    item["tensor"] = self.preprocess(image)
                except ImageDecodeError as error:
                    item["error"] = error.reason
                except OSError as error:
                    item["error"] = describe_os_error(error)
                item["decode_seconds"] = time.perf_counter() - started
                yield item


def collate_planned(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [item for item in items if "tensor" in item]
    return {
        "items": good,
        "batch": torch.stack([item.pop("tensor") for item in good]) if good else None,
        "failed": [{"path": item["path"], "error": item["error"]} for item in items if "error" in item],
        "decode_seconds": sum(item.pop("decode_seconds", 0.0) for item in items),
    }


def batch_loader(dataset: PlannedImages, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_planned,
        pin_memory=pin_memory,
        prefetch_factor=PREFETCH_BATCHES if workers else None,
        multiprocessing_context=WORKER_START_METHOD if workers else None,
    )

"""The plan read for torch encoders: torch's DataLoader moves batches through shared memory and pins them for the GPU."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imgsearch.ingest.reader import PREFETCH_BATCHES, WORKER_START_METHOD, PlannedImages, collate


class _PlannedTensors(IterableDataset):
    def __init__(self, dataset: PlannedImages) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        return self.dataset.items(*((worker.id, worker.num_workers) if worker else (0, 1)))


def batch_loader(dataset: PlannedImages, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(
        _PlannedTensors(dataset),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=partial(collate, stack=torch.stack),
        pin_memory=pin_memory,
        prefetch_factor=PREFETCH_BATCHES if workers else None,
        multiprocessing_context=WORKER_START_METHOD if workers else None,
    )

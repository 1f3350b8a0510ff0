"""The plan read for torch encoders: torch's DataLoader moves batches through shared memory and pins them for the GPU;
JPEGs the workers pass on undecoded are decoded on the encoder's device here."""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imgsearch.encoders import Encoder
from imgsearch.errors import ImageDecodeError
from imgsearch.images import load_image
from imgsearch.ingest.reader import PREFETCH_BATCHES, WORKER_START_METHOD, PlannedImages, collate
from imgsearch.processes import die_with_parent


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
        collate_fn=partial(collate, stack=torch.stack, buffer=byte_tensor),
        pin_memory=pin_memory,
        prefetch_factor=PREFETCH_BATCHES if workers else None,
        multiprocessing_context=WORKER_START_METHOD if workers else None,
        worker_init_fn=partial(die_with_parent, os.getpid()),  # a SIGKILLed ingest leaves no worker behind
    )


def byte_tensor(data: bytes) -> torch.Tensor:
    """A file's bytes as a 1-d uint8 tensor: what decode_jpeg takes, and shared-memory transport out of a worker."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_on_device(
    batch: dict[str, Any], encoder: Encoder, dataset: PlannedImages
) -> tuple[list[dict[str, Any]], torch.Tensor | None, list[dict[str, str]], int]:
    """(items, their uint8 inputs on the device, failures, how many the device decoded) for a batch whose `jpegs`
    the encoder's device decodes.
    A JPEG the device refuses is decoded on the CPU here, as a worker would have, and reported if that fails too."""
    cpu_items = batch["items"][: len(batch["items"]) - len(batch["jpegs"])]
    jpeg_items = batch["items"][len(cpu_items) :]
    decoded, refused = encoder.jpeg_decoder.decode(batch["jpegs"], batch["orientations"], batch["pixels"])
    set_of_refused = set(refused)
    parts = [batch["batch"].to(encoder.device, non_blocking=True)] if batch["batch"] is not None else []
    items = list(cpu_items)
    if decoded is not None:
        parts.append(decoded)
        items += [item for index, item in enumerate(jpeg_items) if index not in set_of_refused]
    failed = []
    for index in refused:
        item = jpeg_items[index]
        try:
            image = load_image(batch["jpegs"][index].numpy().tobytes(), max_pixels=dataset.max_pixels,
                               min_side=dataset.min_side, name=item["path"])
        except ImageDecodeError as error:
            failed.append({"path": item["path"], "error": error.reason})
            continue
        parts.append(torch.as_tensor(dataset.preprocess(image))[None].to(encoder.device))
        items.append(item)
    return items, (torch.cat(parts) if parts else None), failed, len(jpeg_items) - len(refused)

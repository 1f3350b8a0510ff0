"""The end of a Ray ingest (ray_pipeline.py): encoded rows upserted to the Milvus server in chunks, from Ray's write
tasks, each with its own client. An upsert is keyed by content hash, so a retried write task rewrites the same rows."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from imgsearch.ingest.plan import new_row_metadata
from imgsearch.store import ImageRecord, connect, upsert_rows


class MilvusSink(Datasink):
    def __init__(self, uri: str, token: str, collection: str, chunk: int) -> None:
        self.uri, self.token, self.collection, self.chunk = uri, token, collection, chunk
        # Filled on the driver by on_write_complete: id -> labeled, and the seconds the actors and writers spent.
        self.written: dict[str, bool] = {}
        self.encode_seconds = 0.0
        self.insert_seconds = 0.0

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, Any]:
        client = connect(self.uri, self.token, create=False)
        written: dict[str, bool] = {}
        encode_seconds = insert_seconds = 0.0
        pending: list[ImageRecord] = []
        try:
            for block in blocks:
                accessor = BlockAccessor.for_block(block)
                if accessor.num_rows() == 0:  # every file of the batch was stored already, or failed
                    continue
                columns = accessor.to_batch_format("numpy")
                encode_seconds += float(columns["encode_seconds"].sum())
                for text, vector in zip(columns["item"], columns["vector"]):
                    item = json.loads(text)
                    pending.append(ImageRecord(id=item["id"], vector=vector, path=item["path"], label=item["label"], metadata=new_row_metadata(item)))
                    written[item["id"]] = bool(item["label"])
                while len(pending) >= self.chunk:
                    insert_seconds += self._upsert(client, pending[: self.chunk])
                    pending = pending[self.chunk :]
            insert_seconds += self._upsert(client, pending)
        finally:
            client.close()
        return {"written": written, "encode_seconds": encode_seconds, "insert_seconds": insert_seconds}

    def _upsert(self, client: Any, records: list[ImageRecord]) -> float:
        started = time.perf_counter()
        upsert_rows(client, self.collection, records)
        return time.perf_counter() - started

    def on_write_complete(self, write_result: Any) -> None:
        for result in write_result.write_returns:
            self.written.update(result["written"])
            self.encode_seconds += result["encode_seconds"]
            self.insert_seconds += result["insert_seconds"]

    def get_name(self) -> str:
        return "Milvus"

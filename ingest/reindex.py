"""Switch a collection to another model without downtime: build the new model's collection from the stored
paths, labels and metadata, then point the serving alias at it in one step.

Searches address the alias; until the switch they are answered by the old collection, after it by the new one.
Milvus Lite has no aliases, so this needs a Milvus server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imgsearch.config import Settings, default_collection_name
from imgsearch.encoders import Encoder, weights_id
from imgsearch.errors import UsageError
from imgsearch.ingest.catalog import CatalogEntry, as_location
from imgsearch.ingest.pipeline import IngestReport, ingest_entries, ingest_options
from imgsearch.session import open_store
from imgsearch.store import MilvusStore
from imgsearch.validation import recorded_copies, user_metadata


@dataclass
class ReindexReport:
    alias: str
    source: str  # the collection the alias pointed to before
    target: str
    model: str
    ingest: IngestReport

    def to_dict(self) -> dict[str, Any]:
        return {"alias": self.alias, "source": self.source, "target": self.target, "model": self.model, **self.ingest.to_dict()}


def reindex(source: MilvusStore, target: MilvusStore, encoder: Encoder, alias: str, **ingest_options: Any) -> ReindexReport:
    """Encode every stored image again with `encoder` into `target`, then point `alias` at `target`.
    Files that are gone are reported as failed; the alias moves only when the ingest finished."""
    source_name = source.resolved_name()
    rows = list(source.iter_rows(("path", "label", "metadata")))  # read first: the alias may move under a reader
    entries = (  # the identical copies too, so the new collection records them again
        CatalogEntry(path=as_location(path), label=row.get("label") or "", metadata=user_metadata(row.get("metadata")))
        for row in rows
        for path in [row["path"], *recorded_copies(row.get("metadata"))]
    )
    target.add_roots(source.roots())  # the same files stay servable through the new collection
    report = ingest_entries(entries, encoder, target, **ingest_options)
    target.point_alias(alias)
    return ReindexReport(alias, source_name, target.collection, encoder.name, report)


def reindex_to_model(settings: Settings, *, alias: str | None = None, source: str | None = None, target: str | None = None) -> ReindexReport:
    """Re-encode the collection behind `alias` (default settings.collection) read from `source` (default the
    alias) with settings.model (and settings.weights: an adapted embedding, `imgsearch adapt`) into `target`
    (default imgsearch_<model>, with the adapted embedding's id after it), then move the alias to it."""
    from imgsearch.session import open_encoder

    if "model" not in settings.model_fields_set:
        raise UsageError("reindex needs --model: the model to switch to")
    alias = alias or settings.collection
    if not alias:
        raise UsageError("reindex needs --alias (or --collection / IMGSEARCH_COLLECTION): the name searches use")
    target_name = target or default_collection_name(settings.model, weights_id(settings.weights))
    with MilvusStore.open_existing(settings.milvus_uri, source or alias, settings.milvus_token) as old:
        if old.resolved_name() == target_name:
            raise UsageError(f"{source or alias} already is collection {target_name}; choose another --target")
        encoder = open_encoder(settings)
        with open_store(settings.model_copy(update={"collection": target_name}), encoder) as new:
            return reindex(old, new, encoder, alias, **ingest_options(settings))

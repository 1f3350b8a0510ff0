"""The `imgsearch` command: a thin shell over the core functions (the API calls the same ones)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from imgsearch.config import Settings, load_settings
from imgsearch.errors import ImgsearchError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Image similarity search and recognition on Milvus.")
stderr = Console(stderr=True)
stdout = Console()

UriOption = Annotated[Optional[str], typer.Option("--uri", help="Milvus Lite path (*.db) or server URI [env IMGSEARCH_MILVUS_URI]", show_default=False)]
CollectionOption = Annotated[Optional[str], typer.Option("--collection", help="Collection [env IMGSEARCH_COLLECTION; default imgsearch_<model>]", show_default=False)]
ModelOption = Annotated[Optional[str], typer.Option("--model", "-m", help="Encoder name [env IMGSEARCH_MODEL; default efficientnet_lite0]", show_default=False)]
WeightsOption = Annotated[Optional[Path], typer.Option("--weights", help="Local weights file [env IMGSEARCH_WEIGHTS]", show_default=False)]
DeviceOption = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda [env IMGSEARCH_DEVICE]", show_default=False)]
BatchOption = Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Images per forward pass [env IMGSEARCH_BATCH_SIZE; default 32]", show_default=False)]
WorkersOption = Annotated[Optional[int], typer.Option("--workers", min=0, help="Decode worker processes [env IMGSEARCH_WORKERS; default automatic]", show_default=False)]
RuntimeOption = Annotated[Optional[str], typer.Option("--runtime", help="auto, torch or onnx [env IMGSEARCH_RUNTIME; default auto: onnx on CPU, torch on CUDA]", show_default=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout")]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Known failures become one line on stderr and exit status 2."""
    try:
        yield
    except ImgsearchError as error:
        stderr.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, ensure_ascii=False) + "\n")


def print_skipped(failed: list[dict[str, str]], what: str) -> None:
    """Unreadable files go to stderr, one line each, so stdout stays the result."""
    for failure in failed:
        stderr.print(f"[yellow]{what}[/yellow] {failure['path']}: {failure['error']}", highlight=False, soft_wrap=True)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import pymilvus  # noqa: F401  - it configures its loggers on import, so quiet them after that
    for noisy in ("pymilvus", "milvus_lite", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.ERROR)


def _open(settings: Settings, create: bool = True):
    from imgsearch.encoders import load_encoder
    from imgsearch.store import open_store

    encoder = load_encoder(
        settings.model, weights=settings.weights, device=settings.device, runtime=settings.runtime,
        onnx_cache=settings.onnx_cache,
    )
    return encoder, open_store(settings, encoder, create=create)


@app.command()
def ingest(
    path: Annotated[Path, typer.Argument(help="Catalog folder (labels from sub-folder names) or one image")],
    no_labels: Annotated[bool, typer.Option("--no-labels", help="Do not take labels from folder names")] = False,
    manifest: Annotated[Optional[Path], typer.Option("--manifest", help="CSV or JSONL with path,label and extra metadata columns")] = None,
    prune: Annotated[bool, typer.Option("--prune", help="Delete stored rows whose files are gone")] = False,
    json_output: JsonOption = False,
    uri: UriOption = None,
    collection: CollectionOption = None,
    model: ModelOption = None,
    weights: WeightsOption = None,
    device: DeviceOption = None,
    runtime: RuntimeOption = None,
    batch_size: BatchOption = None,
    workers: WorkersOption = None,
) -> None:
    """Index a folder of images; unchanged content is skipped, bad files are reported."""
    from ingest.catalog import check_catalog
    from ingest.pipeline import ingest_catalog

    with user_errors():
        check_catalog(path, manifest)  # before loading a model or creating a collection
        settings = load_settings(
            milvus_uri=uri, collection=collection, model=model, weights=weights, device=device, runtime=runtime,
            batch_size=batch_size, workers=workers,
        )
        encoder, store = _open(settings)
        show_progress = sys.stderr.isatty() and not json_output
        with store, _progress_bar(show_progress) as progress:
            report = ingest_catalog(
                path, encoder, store, use_labels=not no_labels, manifest=manifest, prune=prune,
                batch_size=settings.batch_size, workers=settings.workers, max_pixels=settings.max_image_pixels,
                upsert_chunk=settings.upsert_chunk, progress=progress,
            )
    if json_output:
        print_json(report.to_dict())
        return
    print_skipped(report.failed, "skipped")
    stdout.print(report.summary_line(), highlight=False)


@contextlib.contextmanager
def _progress_bar(enabled: bool):
    if not enabled:
        yield None
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task("hashing" if stage == "scan" else "encoding", total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


@app.command()
def search(
    queries: Annotated[list[Path], typer.Argument(help="Query images or folders of them")],
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, max=16384, help="Results per query")] = 10,
    filter: Annotated[str, typer.Option("--filter", help='Milvus boolean expression, e.g. label == "bag"')] = "",
    json_output: JsonOption = False,
    uri: UriOption = None,
    collection: CollectionOption = None,
    model: ModelOption = None,
    weights: WeightsOption = None,
    device: DeviceOption = None,
    runtime: RuntimeOption = None,
) -> None:
    """Find the stored images most similar to each query image."""
    from imgsearch.search import search_paths

    with user_errors():
        settings = load_settings(
            milvus_uri=uri, collection=collection, model=model, weights=weights, device=device, runtime=runtime
        )
        encoder, store = _open(settings, create=False)
        with store:
            results, failed = search_paths(
                encoder, store, queries, k=k, filter=filter, max_pixels=settings.max_image_pixels
            )
    print_skipped(failed, "skipped query")
    if json_output:
        print_json([result.to_dict() for result in results])
    else:
        for result in results:
            table = Table(title=f"query: {result.query}", title_justify="left")
            for column, justify in (("#", "right"), ("score", "right"), ("label", "left"), ("path", "left"), ("id", "left")):
                table.add_column(column, justify=justify, overflow="fold")
            for rank, hit in enumerate(result.results, start=1):
                table.add_row(str(rank), f"{hit.score:.4f}", hit.label or "-", hit.path, hit.id[:12])
            stdout.print(table)
    if failed and not results:
        raise typer.Exit(2)


@app.command()
def info(
    json_output: JsonOption = False,
    uri: UriOption = None,
    collection: CollectionOption = None,
    model: ModelOption = None,
) -> None:
    """What the collection holds: model, dim, collection, URI and count."""
    from imgsearch.store import describe_collection

    with user_errors():
        settings = load_settings(milvus_uri=uri, collection=collection, model=model)
        described = describe_collection(settings.milvus_uri, settings.collection_name, settings.milvus_token)
    if described["model"] is None:
        described["model"] = settings.model
    if json_output:
        print_json(described)
        return
    table = Table(show_header=False)
    for key in ("model", "dim", "collection", "uri", "count", "exists", "preprocess"):
        table.add_row(key, str(described.get(key)))
    stdout.print(table)


@app.command("export")
def export_vectors(
    out: Annotated[Path, typer.Option("--out", help="Parquet file to write")],
    json_output: JsonOption = False,
    uri: UriOption = None,
    collection: CollectionOption = None,
    model: ModelOption = None,
) -> None:
    """Write every row (id, vector, label, path, metadata) and the model identity to a Parquet file."""
    from imgsearch.store import MilvusStore
    from imgsearch.transfer import export_parquet

    with user_errors():
        settings = load_settings(milvus_uri=uri, collection=collection, model=model)
        with MilvusStore.open_existing(settings.milvus_uri, settings.collection_name, settings.milvus_token) as store:
            written = export_parquet(store, out)
    summary = {"exported": written, "out": str(out), "model": store.model, "collection": settings.collection_name}
    if json_output:
        print_json(summary)
    else:
        stdout.print(f"exported {written} rows to {out}", highlight=False)


@app.command("import")
def import_vectors(
    source: Annotated[Path, typer.Argument(help="Parquet file written by `imgsearch export`")],
    json_output: JsonOption = False,
    uri: UriOption = None,
    collection: CollectionOption = None,
) -> None:
    """Upsert an export into the collection of its model (created when missing; a different model is refused)."""
    from imgsearch.config import default_collection_name
    from imgsearch.store import MilvusStore
    from imgsearch.transfer import import_parquet, read_export_identity

    with user_errors():
        identity = read_export_identity(source)
        settings = load_settings(milvus_uri=uri, collection=collection)
        name = settings.collection or default_collection_name(identity["imgsearch.model"])
        with MilvusStore(
            settings.milvus_uri, name, model=identity["imgsearch.model"], dim=int(identity["imgsearch.dim"]),
            preprocess_version=identity.get("imgsearch.preprocess", ""), token=settings.milvus_token,
        ) as store:
            imported = import_parquet(store, source, chunk=settings.upsert_chunk)
    summary = {"imported": imported, "collection": name, "model": identity["imgsearch.model"]}
    if json_output:
        print_json(summary)
    else:
        stdout.print(f"imported {imported} rows into {name}", highlight=False)


if __name__ == "__main__":  # pragma: no cover
    app()

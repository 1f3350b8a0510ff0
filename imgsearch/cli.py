"""The `imgsearch` command: a thin shell over the core functions (the API calls the same ones)."""

from __future__ import annotations

import contextlib
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
from imgsearch.errors import EXIT_FAILED, EXIT_PARTIAL, ImgsearchError, UsageError
from imgsearch.terminal import json_line, markup_safe, plain, visible

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Image similarity search and recognition on Milvus.")
# emoji off: a label like "bag :fire:" is printed as typed. Everything users supply is escaped (imgsearch.terminal).
stderr = Console(stderr=True, emoji=False)
stdout = Console(emoji=False)

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
    """Known failures become one line on stderr and exit status 2 (EXIT_FAILED)."""
    try:
        yield
    except ImgsearchError as error:
        stderr.print(f"[red]error:[/red] {markup_safe(error)}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_FAILED) from None


def print_json(value: Any) -> None:
    sys.stdout.write(json_line(value) + "\n")


def print_skipped(failed: list[dict[str, str]], what: str) -> None:
    """Unreadable files go to stderr, one line each, so stdout stays the result."""
    for failure in failed:
        stderr.print(
            f"[yellow]{what}[/yellow] {markup_safe(failure['path'])}: {markup_safe(failure['error'])}",
            highlight=False, soft_wrap=True,
        )


def exit_for(failed: list) -> None:
    """EXIT_PARTIAL when some inputs failed (they were reported), with or without --json."""
    if failed:
        raise typer.Exit(EXIT_PARTIAL)


class _VisibleFormatter(logging.Formatter):
    """Log lines carry paths and labels too: their control characters are shown, not obeyed."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(visible(line) for line in super().format(record).split("\n"))  # tracebacks keep their lines


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details")] = False) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_VisibleFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
    logging.getLogger("huggingface_hub").setLevel(logging.INFO if verbose else logging.ERROR)


def _load_encoder(settings: Settings):
    from imgsearch.encoders import encoder_from_settings

    return encoder_from_settings(settings)


def _open(settings: Settings, create: bool = True):
    """Encoder and store. A read-only command (create=False) checks that the collection exists first: a typo in
    --uri or --collection is one line at once, before a model is loaded, and nothing is created."""
    from imgsearch.config import check_lite_database_exists

    if not create:
        check_lite_database_exists(settings.milvus_uri)  # before pymilvus is even imported
        from imgsearch.store import check_collection_exists

        check_collection_exists(settings.milvus_uri, settings.collection_name, settings.milvus_token)
    from imgsearch.store import open_store

    encoder = _load_encoder(settings)
    return encoder, open_store(settings, encoder, create=create)


@app.command()
def ingest(
    path: Annotated[Path, typer.Argument(help="Catalog folder (labels from sub-folder names) or one image")],
    no_labels: Annotated[bool, typer.Option("--no-labels", help="Do not take labels from folder names")] = False,
    manifest: Annotated[Optional[Path], typer.Option("--manifest", help="CSV or JSONL with path,label and extra metadata columns")] = None,
    prune: Annotated[bool, typer.Option("--prune", help="Delete stored rows whose files are gone")] = False,
    shard: Annotated[Optional[str], typer.Option("--shard", help="I/N: only images whose content hash is in shard I of N (0-based), so N processes share a catalog", show_default=False)] = None,
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
    from imgsearch.ingest.catalog import Shard, check_catalog

    with user_errors():
        check_catalog(path, manifest)  # before loading a model or creating a collection
        selected_shard = Shard.parse(shard) if shard else None
        from imgsearch.ingest.pipeline import ingest_catalog  # torch: only once the arguments are known to be usable

        settings = load_settings(
            milvus_uri=uri, collection=collection, model=model, weights=weights, device=device, runtime=runtime,
            batch_size=batch_size, workers=workers,
        )
        encoder, store = _open(settings)
        show_progress = sys.stderr.isatty() and not json_output
        with store, _progress_bar(show_progress) as progress:
            report = ingest_catalog(
                path, encoder, store, use_labels=not no_labels, manifest=manifest, prune=prune, shard=selected_shard,
                batch_size=settings.batch_size, workers=settings.workers, max_pixels=settings.max_image_pixels,
                upsert_chunk=settings.upsert_chunk, progress=progress,
            )
    if json_output:
        print_json(report.to_dict())
    else:
        print_skipped(report.failed, "skipped")
        stdout.print(report.summary_line(), highlight=False)
    exit_for(report.failed)


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
    from imgsearch.images import check_paths_exist

    with user_errors():
        check_paths_exist(queries)
        settings = load_settings(
            milvus_uri=uri, collection=collection, model=model, weights=weights, device=device, runtime=runtime
        )
        encoder, store = _open(settings, create=False)
        from imgsearch.search import search_paths

        with store:
            results, failed = search_paths(
                encoder, store, queries, k=k, filter=filter, max_pixels=settings.max_image_pixels
            )
    print_skipped(failed, "skipped query")
    if json_output:
        print_json([result.to_dict() for result in results])
    else:
        for result in results:
            table = Table(title=plain(f"query: {result.query}"), title_justify="left")
            for column, justify in (("#", "right"), ("score", "right"), ("label", "left"), ("path", "left"), ("id", "left")):
                table.add_column(column, justify=justify, overflow="fold")
            for rank, hit in enumerate(result.results, start=1):
                table.add_row(str(rank), f"{hit.score:.4f}", plain(hit.label or "-"), plain(hit.path), plain(hit.id[:12]))
            stdout.print(table)
            if len(result.results) < k:
                stderr.print(
                    f"note: {len(result.results)} of {k} results: the collection holds no more"
                    + (" that match the filter" if filter else ""), highlight=False,
                )
    exit_for(failed)


@app.command()
def info(
    json_output: JsonOption = False,
    uri: UriOption = None,
    collection: CollectionOption = None,
    model: ModelOption = None,
) -> None:
    """What the collection holds: model, dim, collection, URI and count."""
    from imgsearch.config import check_lite_database_exists

    with user_errors():
        settings = load_settings(milvus_uri=uri, collection=collection, model=model)
        check_lite_database_exists(settings.milvus_uri)
        from imgsearch.store import check_collection_exists, describe_collection

        check_collection_exists(settings.milvus_uri, settings.collection_name, settings.milvus_token)
        described = describe_collection(settings.milvus_uri, settings.collection_name, settings.milvus_token)
    if json_output:
        print_json(described)
        return
    table = Table(show_header=False)
    for key in ("model", "dim", "collection", "uri", "count", "exists", "preprocess"):
        table.add_row(key, plain(described.get(key)))
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
    from imgsearch.config import check_lite_database_exists

    with user_errors():
        settings = load_settings(milvus_uri=uri, collection=collection, model=model)
        check_lite_database_exists(settings.milvus_uri)
        from imgsearch.store import MilvusStore
        from imgsearch.transfer import export_parquet

        with MilvusStore.open_existing(settings.milvus_uri, settings.collection_name, settings.milvus_token) as store:
            written = export_parquet(store, out)
    summary = {"exported": written, "out": str(out), "model": store.model, "collection": settings.collection_name}
    if json_output:
        print_json(summary)
    else:
        stdout.print(f"exported {written} rows to {markup_safe(out)}", highlight=False)


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
            imported, failed = import_parquet(store, source, chunk=settings.upsert_chunk)
    summary = {"imported": imported, "failed": failed, "collection": name, "model": identity["imgsearch.model"]}
    if json_output:
        print_json(summary)
    else:
        print_skipped(failed, "skipped row")
        stdout.print(f"imported {imported} rows into {markup_safe(name)}, failed {len(failed)}", highlight=False)
    exit_for(failed)


@app.command()
def enroll(
    label: Annotated[str, typer.Argument(help="The class these images show")],
    images: Annotated[list[Path], typer.Argument(help="Reference images or folders of them")],
    json_output: JsonOption = False,
    uri: UriOption = None,
    collection: CollectionOption = None,
    model: ModelOption = None,
    weights: WeightsOption = None,
    device: DeviceOption = None,
    runtime: RuntimeOption = None,
) -> None:
    """Add labeled reference images; the class is recognised as soon as this returns (nothing is retrained)."""
    from imgsearch.images import check_paths_exist
    from imgsearch.validation import validate_label

    with user_errors():
        label = validate_label(label, required=True)  # before anything is loaded or created
        check_paths_exist(images)
        from imgsearch.recognize import enroll_paths

        settings = load_settings(
            milvus_uri=uri, collection=collection, model=model, weights=weights, device=device, runtime=runtime
        )
        encoder, store = _open(settings)
        with store:
            report = enroll_paths(encoder, store, label, images, settings)
    if json_output:
        print_json({"label": label, **report.to_dict()})
    else:
        print_skipped(report.failed, "skipped")
        stdout.print(
            f"enrolled {report.indexed + report.updated} images as {markup_safe(repr(label))}; {report.summary_line()}",
            highlight=False,
        )
    exit_for(report.failed)


@app.command()
def recognize(
    images: Annotated[list[Path], typer.Argument(help="Images or folders of them")],
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, max=1024, help="Labeled neighbours to score")] = 100,
    method: Annotated[str, typer.Option("--method", help="knn: labeled neighbours in Milvus; head: a trained classifier head")] = "knn",
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Abstain below this confidence [env IMGSEARCH_THRESHOLD; default: calibrated by eval]", show_default=False)] = None,
    head: Annotated[Optional[Path], typer.Option("--head", help="Head file from train-head [default: heads/<collection>-<mode>]", show_default=False)] = None,
    json_output: JsonOption = False,
    uri: UriOption = None,
    collection: CollectionOption = None,
    model: ModelOption = None,
    weights: WeightsOption = None,
    device: DeviceOption = None,
    runtime: RuntimeOption = None,
) -> None:
    """Name what each image shows, or answer unknown when the evidence is weak."""
    from imgsearch.images import check_paths_exist

    with user_errors():
        if method not in ("knn", "head"):
            raise UsageError(f"--method must be knn or head, not {method!r}")
        check_paths_exist(images)
        settings = load_settings(
            milvus_uri=uri, collection=collection, model=model, weights=weights, device=device, runtime=runtime,
            threshold=threshold,
        )
        encoder, store = _open(settings, create=False)
        from imgsearch.recognize import recognize_paths, recognize_paths_with_head, resolve_threshold

        with store:
            if method == "head":
                head_path = head or default_head_path(settings.collection_name, "linear")
                recognitions, failed = recognize_paths_with_head(
                    encoder, store, head_path, images, threshold=settings.threshold, weights=settings.weights,
                    device=settings.device, max_pixels=settings.max_image_pixels,
                )
            else:
                used, source = resolve_threshold(store, settings.threshold)
                if used is None and not json_output:
                    stderr.print(
                        "[yellow]note:[/yellow] no abstention threshold: run `imgsearch eval` on labeled data, "
                        "or pass --threshold", highlight=False, soft_wrap=True,
                    )
                recognitions, failed = recognize_paths(
                    encoder, store, images, k=k, threshold=used, max_pixels=settings.max_image_pixels
                )
    print_skipped(failed, "skipped")
    if json_output:
        print_json([recognition.to_dict() for recognition in recognitions])
    else:
        table = Table(title=f"recognition ({method})", title_justify="left")
        for column, justify in (("image", "left"), ("label", "left"), ("confidence", "right"), ("nearest", "left")):
            table.add_column(column, justify=justify, overflow="fold")
        for recognition in recognitions:
            nearest = recognition.neighbours[0] if recognition.neighbours else None
            table.add_row(
                plain(recognition.path), plain(recognition.label if recognition.label is not None else "unknown"),
                f"{recognition.confidence:.4f}", plain(f"{nearest.label} {nearest.score:.3f}") if nearest else "-",
            )
        stdout.print(table)
    exit_for(failed)


def default_head_path(collection: str, mode: str) -> Path:
    return Path("heads") / f"{collection}-{mode}"


@app.command("train-head")
def train_head(
    mode: Annotated[str, typer.Option("--mode", help="linear: on the stored vectors (seconds); finetune: the backbone's last stages, from the image files")] = "linear",
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Training epochs [default: 300 linear, 10 finetune]", show_default=False)] = None,
    stages: Annotated[int, typer.Option("--stages", min=0, help="finetune: how many last backbone stages to unfreeze")] = 3,
    out: Annotated[Optional[Path], typer.Option("--out", help="Head file stem [default: heads/<collection>-<mode>]", show_default=False)] = None,
    json_output: JsonOption = False,
    uri: UriOption = None,
    collection: CollectionOption = None,
    model: ModelOption = None,
    weights: WeightsOption = None,
    device: DeviceOption = None,
    workers: WorkersOption = None,
) -> None:
    """Train a classifier head on the collection's labeled images, for `recognize --method head`."""
    from imgsearch.head import MODES
    from imgsearch.recognize import train_head_on_store

    with user_errors():
        if mode not in MODES:
            raise UsageError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
        settings = load_settings(milvus_uri=uri, collection=collection, model=model, weights=weights, device=device, workers=workers)
        from imgsearch.store import MilvusStore

        with MilvusStore.open_existing(settings.milvus_uri, settings.collection_name, settings.milvus_token) as store:
            from imgsearch.encoders import canonical_model_name

            if model is not None and store.model != canonical_model_name(settings.model):
                raise UsageError(f"collection {settings.collection_name} holds model {store.model}, not {settings.model}")
            head = train_head_on_store(
                store, mode, epochs=epochs, stages=stages, weights=settings.weights, device=settings.device,
                workers=settings.workers or 0, progress=None if json_output else lambda line: stderr.print(markup_safe(line), highlight=False),
            )
        weights_path, info_path = head.save(out or default_head_path(settings.collection_name, mode))
    summary = {"head": str(weights_path), "info": str(info_path), "labels": len(head.info.labels), **head.info.metrics}
    if json_output:
        print_json(summary)
    else:
        stdout.print(
            f"trained {mode} head on {len(head.info.labels)} labels: validation accuracy "
            f"{head.info.metrics.get('validation_accuracy')} -> {markup_safe(weights_path)}", highlight=False,
        )


@app.command("eval")
def evaluate_command(
    dataset: Annotated[str, typer.Argument(help="Folder of class sub-folders, or fashion-mnist[:PATH] (Debian dataset-fashion-mnist)")],
    out: Annotated[Path, typer.Option("--out", help="Folder for report.json and report.png")] = Path("eval-report"),
    references_per_class: Annotated[int, typer.Option("--references-per-class", min=1)] = 600,
    queries_per_class: Annotated[Optional[int], typer.Option("--queries-per-class", min=1, help="[default: all test images]", show_default=False)] = None,
    shots: Annotated[str, typer.Option("--shots", help="n-shot curve points")] = "1,2,5,10,20",
    episodes: Annotated[int, typer.Option("--episodes", min=1, help="Episodes per n-shot point")] = 50,
    unknown_classes: Annotated[int, typer.Option("--unknown-classes", min=1, help="Classes held out for open-set AUROC")] = 2,
    false_accept_rate: Annotated[float, typer.Option("--false-accept-rate", help="Calibrate the threshold to accept this share of unknowns")] = 0.05,
    finetune: Annotated[bool, typer.Option("--finetune", help="Also fine-tune a head (slow on CPU)")] = False,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Fine-tuning epochs")] = 10,
    calibrate: Annotated[bool, typer.Option("--calibrate/--no-calibrate", help="Store the threshold with the collection")] = True,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    json_output: JsonOption = False,
    uri: UriOption = None,
    collection: CollectionOption = None,
    model: ModelOption = None,
    weights: WeightsOption = None,
    device: DeviceOption = None,
    runtime: RuntimeOption = None,
    workers: WorkersOption = None,
) -> None:
    """Measure recognition on a labeled set: k-NN, n-shot, heads, open-set AUROC; calibrate the threshold."""
    from imgsearch.evaluate import EvalOptions, check_options, evaluate, parse_int_list, write_report
    from imgsearch.recognize import Calibration, save_calibration

    with user_errors():
        options = EvalOptions(
            references_per_class=references_per_class, queries_per_class=queries_per_class, shots=parse_int_list(shots),
            episodes=episodes, unknown_classes=unknown_classes, false_accept_rate=false_accept_rate,
            finetune=finetune, finetune_epochs=epochs, workers=workers or 0, seed=seed,
        )
        check_options(options)
        settings = load_settings(
            milvus_uri=uri, collection=collection, model=model, weights=weights, device=device, runtime=runtime
        )
        encoder, store = _open(settings) if calibrate else (_load_encoder(settings), None)
        report = evaluate(
            encoder, dataset, options, weights=settings.weights,
            progress=None if json_output else lambda line: stderr.print(markup_safe(line), highlight=False),
        )
        threshold = report["open_set"].get("threshold")
        if store is not None:
            with store:
                if threshold is not None:
                    save_calibration(store, Calibration(threshold, false_accept_rate, dataset, options.k))
                    report["calibration"] = {"collection": settings.collection_name, "threshold": threshold}
        json_path, figure_path = write_report(report, out)
    if json_output:
        print_json(report)
        return
    table = Table(title=plain(f"eval {dataset} ({report['encoder']})"), show_header=False, title_justify="left")
    for key, value in summary_rows(report):
        table.add_row(plain(key), plain(value))
    stdout.print(table)
    stdout.print(f"wrote {markup_safe(json_path)} and {markup_safe(figure_path)}", highlight=False)


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("references / queries", f"{report['references']} / {report['queries']}")]
    rows += [(f"k-NN accuracy k={k}", f"{v:.4f}") for k, v in report["knn_accuracy"].items()]
    rows += [(f"{n}-shot accuracy", f"{v['mean']:.4f} ± {v['std']:.4f} ({v['episodes']} episodes)") for n, v in report["n_shot"].items()]
    for mode, values in report["head"].items():
        rows.append((f"{mode} head accuracy", f"{values['accuracy']:.4f}"))
    open_set = report["open_set"]
    if "auroc" in open_set:
        rows.append((f"open-set AUROC ({', '.join(open_set['unknown_classes'])} unknown)", f"{open_set['auroc']:.4f}"))
        rows.append(
            (f"threshold at false-accept {open_set['target_false_accept_rate']}",
             f"{open_set['threshold']:.4f} (accepts {open_set['known_accept_rate']:.3f} of known queries)")
        )
    late = report["late_enrolment"]
    if "new_class_accuracy" in late:
        rows.append((f"class enrolled later, {late['shots']} shots", f"{late['new_class_accuracy']:.4f} (earlier classes drop {late['earlier_classes_drop']:+.4f})"))
    return rows


@app.command()
def reindex(
    model: ModelOption = None,
    alias: Annotated[Optional[str], typer.Option("--alias", help="The name searches use; moved to the new collection at the end [default: --collection]", show_default=False)] = None,
    source: Annotated[Optional[str], typer.Option("--from", help="Collection (or alias) to read paths from [default: --alias]", show_default=False)] = None,
    target: Annotated[Optional[str], typer.Option("--target", help="New collection [default: imgsearch_<model>]", show_default=False)] = None,
    json_output: JsonOption = False,
    uri: UriOption = None,
    collection: CollectionOption = None,
    weights: WeightsOption = None,
    device: DeviceOption = None,
    runtime: RuntimeOption = None,
    batch_size: BatchOption = None,
    workers: WorkersOption = None,
) -> None:
    """Re-encode the stored images with another model into a new collection, then switch the alias to it
    (searches through the alias keep answering throughout). Needs a Milvus server."""
    from imgsearch.config import default_collection_name
    from imgsearch.store import MilvusStore, open_store
    from imgsearch.ingest.reindex import reindex as reindex_collection

    with user_errors():
        if model is None:
            raise UsageError("reindex needs --model: the model to switch to")
        settings = load_settings(
            milvus_uri=uri, collection=collection, model=model, weights=weights, device=device, runtime=runtime,
            batch_size=batch_size, workers=workers,
        )
        alias = alias or settings.collection
        if not alias:
            raise UsageError("reindex needs --alias (or --collection / IMGSEARCH_COLLECTION): the name searches use")
        target_name = target or default_collection_name(settings.model)
        with MilvusStore.open_existing(settings.milvus_uri, source or alias, settings.milvus_token) as old:
            if old.resolved_name() == target_name:
                raise UsageError(f"{source or alias} already is collection {target_name}; choose another --target")
            encoder = _load_encoder(settings)
            settings = settings.model_copy(update={"collection": target_name})
            with open_store(settings, encoder) as new:
                report = reindex_collection(
                    old, new, encoder, alias, batch_size=settings.batch_size, workers=settings.workers,
                    max_pixels=settings.max_image_pixels, upsert_chunk=settings.upsert_chunk,
                )
    if json_output:
        print_json(report.to_dict())
    else:
        print_skipped(report.ingest.failed, "skipped")
        stdout.print(
            markup_safe(
                f"{report.alias} now points to {report.target} ({report.model}; was {report.source}); "
                f"{report.ingest.summary_line()}. Search it with --collection {report.alias} --model {report.model}"
            ),
            highlight=False, soft_wrap=True,
        )
    exit_for(report.ingest.failed)


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    uri: UriOption = None,
    collection: CollectionOption = None,
    model: ModelOption = None,
    weights: WeightsOption = None,
    device: DeviceOption = None,
    runtime: RuntimeOption = None,
) -> None:
    """Run the REST service (one worker: the model and the store are loaded once)."""
    import uvicorn

    from imgsearch.api.app import Service, create_app

    with user_errors():
        settings = load_settings(
            milvus_uri=uri, collection=collection, model=model, weights=weights, device=device, runtime=runtime
        )
        service = Service(settings)  # a locked Milvus Lite file or missing weights fail here, as one line
    stderr.print(
        markup_safe(f"serving {settings.collection_name} ({service.encoder.name}) on http://{host}:{port}"), highlight=False
    )
    uvicorn.run(create_app(service=service), host=host, port=port, log_level="warning")


if __name__ == "__main__":  # pragma: no cover
    app()

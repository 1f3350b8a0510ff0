"""The `imgsearch` command: a thin shell over the core functions (the API calls the same ones)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer

from imgsearch.config import (
    ADAPT_DISTILL,
    ADAPT_DISTILL_MAX,
    ADAPT_EPOCHS,
    ADAPT_FROZEN_SHARE,
    ADAPT_PAIR_DISTILL,
    ADAPT_STAGES,
    DUPLICATES_THRESHOLD_HELP,
    HEAD_EPOCHS,
    HEAD_STAGES,
    RECOGNITION_K,
    RECOGNITION_K_MAX,
    SIMILAR,
    HeadMode,
    RecognitionMethod,
    Settings,
)
from imgsearch.errors import Terminated
from imgsearch.shell import CREATES, MODEL, OBJECTS, STORE, JsonOption, Output, Rows, command_registrar, option
from imgsearch.terminal import VisibleFormatter, markup_safe, progress_bar, progress_lines, stderr

app = typer.Typer(
    no_args_is_help=True, add_completion=False, rich_markup_mode=None, help="Image similarity search and recognition on Milvus."
)


command = command_registrar(app)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details")] = False) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(VisibleFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
    logging.getLogger("huggingface_hub").setLevel(logging.INFO if verbose else logging.ERROR)
    logging.getLogger("imgsearch.encoders").setLevel(logging.INFO)  # the one-off ONNX export and int8 quantisation take seconds
    if threading.current_thread() is threading.main_thread():  # only there can Python handle signals
        signal.signal(signal.SIGTERM, _terminate)  # a summary line and exit 143, as for Ctrl-C (uvicorn replaces it in serve)


def _terminate(signum, frame) -> None:
    raise Terminated()


@command(settings=MODEL + ("batch_size", "workers", "ray_address") + OBJECTS + CREATES, waits_for_store=True)
def ingest(
    settings: Settings,
    path: Annotated[str, typer.Argument(help="Catalog folder or bucket prefix (s3://bucket/catalog; labels from sub-folders or key prefixes), or one image")],
    no_labels: Annotated[bool, typer.Option("--no-labels", help="Do not take labels from folder names")] = False,
    manifest: Annotated[Optional[str], typer.Option("--manifest", help="CSV or JSONL (a file or an s3:// object): path,label and metadata columns")] = None,
    prune: Annotated[bool, typer.Option("--prune", help="Delete stored rows whose files are gone")] = False,
    shard: Annotated[Optional[str], option("--shard", help="I/N: only images whose content hash falls in shard I of N (0-based)")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Read, encode and write on a Ray cluster (--ray-address; needs a Milvus server)")] = False,
    json_output: JsonOption = False,
) -> None:
    """Index a folder of images; unchanged content is skipped, bad files are reported."""
    from imgsearch.ingest.catalog import Shard, as_location, check_catalog

    if ray:
        from imgsearch.ingest.ray_pipeline import check_ray_ingest

        check_ray_ingest(settings.milvus_uri, shard)
    path, manifest = as_location(path), (as_location(manifest) if manifest else None)
    check_catalog(path, manifest)  # before loading a model or creating a collection
    from imgsearch.uploads import warn_if_overlapping

    warn_if_overlapping(path, settings.upload_dir)
    selected_shard = Shard.parse(shard) if shard else None
    from imgsearch.ingest.pipeline import ingest_catalog, ingest_options  # torch: once the arguments are usable
    from imgsearch.ingest.ray_pipeline import on_ray  # Ray itself is imported only when it runs
    from imgsearch.session import opened

    with on_ray(settings) if ray else nullcontext() as ray_run:  # a bad address is one line before the model loads
        with opened(settings) as (encoder, store), progress_bar(sys.stderr.isatty() and not json_output) as progress:
            report = ingest_catalog(
                path, encoder, store, use_labels=not no_labels, manifest=manifest, prune=prune, shard=selected_shard,
                progress=progress, ray=ray_run(encoder) if ray_run else None, **ingest_options(settings),
            )
    return Output(report.to_dict(), report.summary_line(), failed=report.failed)


@command()
def search(
    settings: Settings,
    queries: Annotated[Optional[list[Path]], typer.Argument(help="Query images or folders of them", show_default=False)] = None,
    text: Annotated[Optional[list[str]], option("--text", "-t", help="Search by words (CLIP models); repeatable")] = None,
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, max=16384, help="Results per query")] = 10,
    filter: Annotated[str, typer.Option("--filter", help='Milvus boolean expression, e.g. label == "bag"')] = "",
) -> Output:
    """Find the stored images most similar to each query image, or to words with --text (CLIP models)."""
    from imgsearch.errors import UsageError
    from imgsearch.images import check_paths_exist

    if not queries and not text:
        raise UsageError("search needs query images, or --text WORDS")
    check_paths_exist(queries or [])
    from imgsearch.search import search_paths, search_text
    from imgsearch.session import opened

    if text and not queries:  # the text tower runs in torch: no ONNX export of the image tower for it
        settings = settings.model_copy(update={"runtime": "torch"})
    failed: list[dict[str, str]] = []
    with opened(settings, create=False, encodes_images=bool(queries)) as (encoder, store):
        results = search_text(encoder, store, text, k=k, filter=filter) if text else []
        if queries:
            found, failed = search_paths(encoder, store, queries, k=k, filter=filter, max_pixels=settings.max_image_pixels)
            results += found
    tables, notes = [], []
    for r in results:
        rows = [(n, f"{hit.score:.4f}", hit.label or "-", hit.path, hit.id[:12]) for n, hit in enumerate(r.results, 1)]
        tables.append(Rows(f"query: {r.query}", ("#", "score", "label", "path", "id"), rows))
        if len(r.results) < k:
            notes.append(f"{len(r.results)} of {k} results: the collection holds no more" + (" that match the filter" if filter else ""))
    return Output([r.to_dict() for r in results], tables=tables, notes=notes, failed=failed, what_failed="skipped query")


@command(settings=STORE + OBJECTS, waits_for_store=True)
def delete(
    settings: Settings,
    ids: Annotated[Optional[list[str]], typer.Argument(help="Ids of stored images (from search --json)", show_default=False)] = None,
    filter: Annotated[Optional[str], option("--filter", help='Delete the rows this Milvus expression selects, e.g. label == "old"')] = None,
    from_json: Annotated[Optional[Path], option("--from-json", help="duplicates --json output (each group's members) or a list of ids")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be deleted; change nothing")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking when --filter or --from-json selects more than half the rows")] = False,
    include_similar: Annotated[
        bool, typer.Option("--include-similar", help="With --from-json: also delete members graded similar (unverified look-alikes)")
    ] = False,
) -> Output:
    """Delete stored images (and the files the REST service stored for uploads; catalog files are kept)."""
    from imgsearch.errors import UsageError

    if sum(bool(given) for given in (ids, filter, from_json)) != 1:
        raise UsageError("delete needs exactly one of: IDS, --filter EXPR, --from-json FILE")
    from imgsearch.deletion import delete_images, ids_from_json, ids_matching
    from imgsearch.session import open_existing_store

    wanted, copies, lookalikes = ids_from_json(from_json, include_similar) if from_json else (list(ids or []), 0, 0)
    notes = [f"{copies} identical copies skipped: they are files sharing a kept row's bytes; delete those files yourself"] if copies else []
    if lookalikes:
        notes.append(f"{lookalikes} similar look-alikes skipped: their pixels were not verified as copies (--include-similar deletes them)")
    with open_existing_store(settings) as store:
        sweeping = bool(filter or from_json) and not yes  # ids named one by one are never a sweep
        report = delete_images(
            store, ids_matching(store, filter) if filter else wanted, settings.upload_dir, dry_run=dry_run,
            confirm=confirm_or_refuse if sweeping else None,
        )
    rows = [(row["id"][:12], row["label"] or "-", row["path"], "yes" if row["file_removed"] else "no") for row in report.deleted]
    tables = [Rows("would delete" if dry_run else "deleted", ("id", "label", "path", "uploaded file too"), rows)]
    missing = [{"path": image_id, "error": "no stored image with this id"} for image_id in report.missing]
    value = {**report.to_dict(), "copies_skipped": copies, "similar_skipped": lookalikes}
    return Output(value, report.summary_line(), tables, notes=notes, failed=missing, what_failed="not deleted")


def check_writable(path: Path) -> None:
    """UsageError unless a file can be written at `path` (a folder, or a folder that is missing or read-only, fails)."""
    import tempfile

    from imgsearch.errors import UsageError

    if path.is_dir():
        raise UsageError(f"{path} is a folder; give a file name, e.g. {path / 'duplicates.html'}")
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".imgsearch-check-"):
            pass
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror or error}") from None


def confirm_or_refuse(question: str) -> None:
    """Ask on a terminal; anywhere else (a script, a pipe) refuse, naming --yes."""
    from imgsearch.errors import UsageError

    if sys.stdin.isatty() and sys.stderr.isatty():
        if typer.confirm(f"{question}; delete them?", default=False, err=True):
            return
        raise UsageError("nothing deleted")
    raise UsageError(f"{question}; add --yes to delete them (or --dry-run to list them)")


@command(settings=STORE)
def duplicates(
    settings: Settings,
    prefix: Annotated[str, typer.Argument(help="Only images under this folder, or whose stored path starts with this [default: all]", show_default=False)] = "",
    threshold: Annotated[
        Optional[float], option("--threshold", min=-1, max=1, help=DUPLICATES_THRESHOLD_HELP)
    ] = None,
    similar: Annotated[bool, typer.Option("--similar", help=f"Also list unverified look-alikes (similarity >= {SIMILAR}), apart from the groups")] = False,
    html_report: Annotated[Optional[Path], option("--html", help="Also write a page with each group's thumbnails")] = None,
) -> Output:
    """Groups of copies: identical content, or the same picture edited (checked on the pixels); pipe --json into delete."""
    from imgsearch.duplicates import find_duplicates, write_html
    from imgsearch.errors import UsageError
    from imgsearch.ingest.catalog import absolute
    from imgsearch.session import open_existing_store

    if prefix and Path(prefix).exists():  # a folder or file on disk: as ingest stored it (absolute)
        prefix = str(absolute(prefix))
        prefix += os.sep if Path(prefix).is_dir() and not prefix.endswith(os.sep) else ""  # `/` stays `/`
    elif prefix and not os.path.isabs(prefix):  # stored paths are absolute: a relative one can match nothing
        raise UsageError(f"no such folder or file: {prefix} (or give the start of an absolute stored path)")
    if html_report:
        check_writable(html_report)  # before the scan, not after it
    with open_existing_store(settings) as store:
        report = find_duplicates(store, prefix=prefix, threshold=threshold, include_similar=similar)
    if html_report:
        write_html(report, html_report)
    tables = [
        Rows(title, ("", "score", "evidence", "path"),
             [("representative", "", "", g.representative["path"])] + [(m.grade, f"{m.score:.4f}", m.evidence or "", m.path) for m in g.members])
        for title, groups in (("", report.groups), ("similar look-alikes (not verified)", report.lookalikes or [])) for g in groups
    ]
    notes = [f"no stored image's path starts with {prefix}"] if prefix and not report.rows else []
    if report.unreadable_count:
        notes.append(f"{report.unreadable_count} files could not be read to check their pixels (their pairs are unverified), e.g. {report.unreadable[0]}")
    return Output(report.to_dict(), report.summary_line() + (f"; wrote {html_report}" if html_report else ""), tables, notes=notes)


@command(settings=STORE + OBJECTS)
def info(settings: Settings) -> Output:
    """What the collection holds: model, dim, collection, URI and count."""
    from imgsearch.session import describe_store

    described = describe_store(settings)
    keys = ("model", "dim", "collection", "uri", "count", "exists", "preprocess", "precision")
    rows = [(key, described.get(key)) for key in keys]
    if described.get("exists"):
        rows.append(("embedding", f"adapted ({described['weights']})" if described.get("weights") else "the model's own weights"))
    if described.get("storage_options"):
        rows.append(("storage options", json.dumps(described["storage_options"])))
    if described.get("recognition"):
        rows.append(("unknown below (eval)", f"{described['recognition']['threshold']:.4f} on {described['recognition']['dataset']}"))
    if described.get("self_calibration"):
        own = described["self_calibration"]
        text = f"{own['threshold']:.4f}, margin {own['margin']:.4f}, from {own['sample']} of {own['references']} references"
        rows.append(("unknown below (self-calibrated)", text))
    return Output(described, tables=[Rows("", (), rows)])


@command("export", settings=STORE)
def export_vectors(settings: Settings, out: Annotated[Path, typer.Option("--out", help="Parquet file to write")]) -> Output:
    """Write every row (id, vector, label, path, metadata) and the model identity to a Parquet file."""
    from imgsearch.session import open_existing_store

    with open_existing_store(settings) as store:  # a mistyped --uri is answered before pymilvus loads
        from imgsearch.transfer import export_parquet

        written = export_parquet(store, out)
    summary = {"exported": written, "out": str(out), "model": store.model, "collection": settings.collection_name}
    return Output(summary, f"exported {written} rows to {out}")


@command("import", settings=("milvus_uri", "collection") + CREATES, waits_for_store=True)
def import_vectors(
    settings: Settings,
    source: Annotated[Path, typer.Argument(help="Parquet file written by `imgsearch export`")],
) -> Output:
    """Upsert an export into the collection of its model (created when missing; a different model is refused)."""
    from imgsearch.transfer import import_into

    summary = import_into(settings, source)
    text = f"imported {summary['imported']} rows into {summary['collection']}, failed {len(summary['failed'])}"
    return Output(summary, text, failed=summary["failed"], what_failed="skipped row")


@command(settings=MODEL + ("batch_size", "workers") + CREATES, waits_for_store=True)
def enroll(
    settings: Settings,
    label: Annotated[str, typer.Argument(help="The class these images show")],
    images: Annotated[Optional[list[Path]], typer.Argument(help="Reference images or folders of them", show_default=False)] = None,
    from_review: Annotated[Optional[list[str]], option("--from-review", help="Kept unknown queries: group keys or ids from `imgsearch review`")] = None,
) -> Output:
    """Add labeled reference images; the class is recognised as soon as this returns (nothing is retrained)."""
    from imgsearch.errors import UsageError
    from imgsearch.images import check_paths_exist
    from imgsearch.validation import validate_label

    label = validate_label(label, required=True)  # before anything is loaded or created
    if bool(images) == bool(from_review):
        raise UsageError("enroll needs images or --from-review GROUP_OR_ID (one of the two)")
    if from_review:
        from imgsearch.recognition.review import enroll_from_review
        from imgsearch.session import open_existing_store

        with open_existing_store(settings) as store:
            result = enroll_from_review(store, label, [token for value in from_review for token in value.split(",")])
        text = f"enrolled {result['enrolled']} kept queries as {label!r}"
        if result["calibration"]:
            text += f"; unknown below {result['calibration']['threshold']:.4f} (margin {result['calibration']['margin']:.4f}), self-calibrated"
        return Output(result, text, notes=[f"check: {w}" for w in (result["check"] or {}).get("warnings", [])])
    check_paths_exist(images)
    from imgsearch.ingest.enroll import enroll_paths
    from imgsearch.session import opened

    with opened(settings) as (encoder, store):
        report = enroll_paths(encoder, store, label, images, settings)
    text = f"enrolled {report.indexed + report.updated} images as {label!r}; {report.summary_line()}"
    warnings = (report.enrolment_check or {}).get("warnings", [])
    return Output({"label": label, **report.to_dict()}, text, notes=[f"check: {w}" for w in warnings], failed=report.failed)


@command(settings=STORE)
def review(settings: Settings) -> Output:
    """The queries `recognize --keep-unknown` kept, in groups of similar images, for `enroll LABEL --from-review`."""
    from imgsearch.recognition.review import review_groups, review_store
    from imgsearch.session import open_existing_store

    with open_existing_store(settings) as store:
        kept = review_store(store, create=False)
        groups = review_groups(kept)
        if kept is not None:
            kept.close()
    tables = [
        Rows(f"group {group.number} · key {group.key}", ("id", "confidence", "nearest", "path"),
             [(m["id"][:12], f"{m['confidence']:.4f}" if m["confidence"] is not None else "", m["nearest"] or "", m["path"]) for m in group.members])
        for group in groups
    ]
    count = sum(len(group.members) for group in groups)
    text = f"{count} kept unknown queries in {len(groups)} groups" + (f"; name one: imgsearch enroll LABEL --from-review {groups[0].key}" if groups else "")
    return Output([group.to_dict() for group in groups], text, tables)


@command(settings=MODEL + ("threshold",))
def recognize(
    settings: Settings,
    images: Annotated[list[Path], typer.Argument(help="Images or folders of them")],
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, max=RECOGNITION_K_MAX, help="Labeled neighbours to score")] = RECOGNITION_K,
    method: Annotated[RecognitionMethod, typer.Option("--method", help="knn: labeled neighbours in Milvus; head: a trained head")] = RecognitionMethod.knn,
    head: Annotated[Optional[Path], option("--head", help="Head file from train-head [default: heads/<collection>-linear]")] = None,
    keep_unknown: Annotated[bool, typer.Option("--keep-unknown", help="Keep the images answered unknown for `imgsearch review`")] = False,
) -> Output:
    """Name what each image shows, or answer unknown when the evidence is weak."""
    from imgsearch.errors import UsageError
    from imgsearch.images import check_paths_exist

    check_paths_exist(images)
    if keep_unknown and method is RecognitionMethod.head:
        raise UsageError("--keep-unknown works with --method knn: a head's labels are fixed when it is trained")
    from imgsearch.recognition import recognize_images
    from imgsearch.session import opened

    with opened(settings, create=False) as (encoder, store):
        recognitions, failed, rule = recognize_images(
            encoder, store, images, settings, method=method, k=k, head=head, keep_unknown=keep_unknown
        )
    rows = [(r.path, r.label or "unknown", f"{r.confidence:.4f}", r.nearest_text()) for r in recognitions]
    tables = [Rows(f"recognition ({method.value})", ("image", "label", "confidence", "nearest"), rows)]
    if rule.threshold is None:
        notes = [f"no abstention threshold ({rule.source}): enrol or ingest two labels or more, run `imgsearch eval`, or pass --threshold"]
    else:
        margin = f", margin {rule.margin:.4f}" if rule.margin else ""
        notes = [f"threshold {rule.threshold:.4f}{margin}: {rule.source}"]
    if not_kept := sum(r.kept_for_review is False for r in recognitions):
        from imgsearch.recognition.review import full_note

        notes.append(full_note(not_kept, settings.review_max))
    return Output([r.to_dict() for r in recognitions], tables=tables, notes=notes, failed=failed)


@command("train-head", settings=MODEL[:5] + ("workers",))
def train_head(
    settings: Settings,
    mode: Annotated[
        HeadMode, typer.Option("--mode", help="linear: on the stored vectors (seconds); finetune: the last backbone stages, from the files")
    ] = HeadMode.linear,
    epochs: Annotated[
        Optional[int], option("--epochs", min=1, help=f"Training epochs [default: {', '.join(f'{n} {m.value}' for m, n in HEAD_EPOCHS.items())}]")
    ] = None,
    stages: Annotated[int, typer.Option("--stages", min=0, help="finetune: how many last backbone stages to unfreeze")] = HEAD_STAGES,
    out: Annotated[Optional[Path], option("--out", help="Head file stem [default: heads/<collection>-<mode>]")] = None,
    json_output: JsonOption = False,
) -> Output:
    """Train a classifier head on the collection's labeled images, for `recognize --method head`."""
    from imgsearch.recognition.head import train_head_for

    head, weights_path, info_path = train_head_for(
        settings, mode, epochs=epochs, stages=stages, out=out, progress=progress_lines(not json_output)
    )
    summary = {"head": str(weights_path), "info": str(info_path), "labels": len(head.info.labels), **head.info.metrics}
    accuracy = head.info.metrics.get("validation_accuracy")
    return Output(summary, f"trained {mode.value} head on {len(head.info.labels)} labels: validation accuracy {accuracy} -> {weights_path}")


@command(settings=MODEL[:5] + ("workers",) + OBJECTS)
def adapt(
    settings: Settings,
    epochs: Annotated[
        int, option("--epochs", min=1, help=f"Training epochs at most; the best on the held-out references is kept [default: {ADAPT_EPOCHS}]")
    ] = ADAPT_EPOCHS,
    stages: Annotated[int, typer.Option("--stages", min=0, help="How many last backbone stages to train (with the projection)")] = ADAPT_STAGES,
    distill: Annotated[
        float, option("--distill", min=0.0, max=ADAPT_DISTILL_MAX,
                      help="Pull towards each image's frozen embedding: higher keeps unseen labels and photo edits "
                      f"closer to the base model, 0 trains the margin loss alone [default: {ADAPT_DISTILL}]")
    ] = ADAPT_DISTILL,
    pair_distill: Annotated[
        float, option("--pair-distill", min=0.0, max=ADAPT_DISTILL_MAX,
                      help="Pull of each pair of same-label images towards their frozen cosine: higher keeps different "
                      f"products of one label apart (near-duplicate search), 0 turns it off [default: {ADAPT_PAIR_DISTILL}]")
    ] = ADAPT_PAIR_DISTILL,
    frozen_share: Annotated[
        float, option("--frozen-share", min=0.0, max=0.95,
                      help="Share of each vector that is the base model's own embedding, beside the adapted one: keeps "
                      f"photo edits and unseen labels as the base model saw them; 0 saves the adapted alone [default: {ADAPT_FROZEN_SHARE}]")
    ] = ADAPT_FROZEN_SHARE,
    out: Annotated[Optional[Path], option("--out", help="File stem, refused if it exists [default: adapted/<collection>, or -2, -3... when taken]")] = None,
    json_output: JsonOption = False,
) -> Output:
    """Adapt the embedding to the collection's labeled images (metric learning); reindex with --weights to use it."""
    from imgsearch.recognition.adaptation import adapt_collection

    card, weights_path, card_path = adapt_collection(
        settings, epochs=epochs, stages=stages, distill=distill, pair_distill=pair_distill, frozen_share=frozen_share, out=out,
        progress=progress_lines(not json_output),
    )
    frozen, adapted = card.validation["frozen"], card.validation.get("saved", card.validation["adapted"])
    summary = {"weights": str(weights_path), "card": str(card_path), "weights_id": card.weights_id, "labels": len(card.labels),
               "validation": card.validation, "epochs_run": card.epochs_run, "seconds": card.training["seconds"]}
    line = (f"adapted {card.base_model} on {sum(card.labels.values())} references of {len(card.labels)} labels in "
            f"{card.training['seconds']:.0f} s: held-out nearest-neighbour accuracy {frozen['nearest_neighbour_accuracy']} -> "
            f"{adapted['nearest_neighbour_accuracy']} -> {weights_path}")
    notes = [f"to use it: imgsearch reindex --weights {weights_path} --alias NAME (searches go on while it runs)"]
    return Output(summary, line, notes=notes)


@command("eval", settings=MODEL + ("workers",))
def evaluate_command(
    settings: Settings,
    dataset: Annotated[str, typer.Argument(help="Folder of class sub-folders, or fashion-mnist[:PATH] (Debian dataset-fashion-mnist)")],
    out: Annotated[Path, typer.Option("--out", help="Folder for report.json and report.png")] = Path("eval-report"),
    references_per_class: Annotated[int, typer.Option("--references-per-class", min=1)] = 600,
    queries_per_class: Annotated[Optional[int], option("--queries-per-class", min=1, help="[default: all test images]")] = None,
    shots: Annotated[str, typer.Option("--shots", help="n-shot curve points")] = "1,2,5,10,20",
    episodes: Annotated[int, typer.Option("--episodes", min=1, help="Episodes per n-shot point")] = 50,
    unknown_classes: Annotated[int, typer.Option("--unknown-classes", min=1, help="Classes held out for open-set AUROC")] = 2,
    false_accept_rate: Annotated[float, typer.Option("--false-accept-rate", help="Calibrate the threshold to accept this share of unknowns")] = 0.05,
    finetune: Annotated[bool, typer.Option("--finetune", help="Also fine-tune a head (slow on CPU)")] = False,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Fine-tuning epochs")] = HEAD_EPOCHS[HeadMode.finetune],
    calibrate: Annotated[bool, typer.Option("--calibrate/--no-calibrate", help="Store the threshold with the collection")] = True,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    json_output: JsonOption = False,
) -> Output:
    """Measure recognition on a labeled set: k-NN, n-shot, heads, open-set AUROC; calibrate the threshold."""
    from imgsearch.evaluation import EvalOptions, evaluate_and_calibrate, parse_int_list, summary_rows

    options = EvalOptions(
        references_per_class=references_per_class, queries_per_class=queries_per_class, shots=parse_int_list(shots),
        episodes=episodes, unknown_classes=unknown_classes, false_accept_rate=false_accept_rate,
        finetune=finetune, finetune_epochs=epochs, workers=settings.workers or 0, seed=seed,
    )
    report, json_path, figure_path = evaluate_and_calibrate(
        settings, dataset, options, out, calibrate=calibrate, progress=progress_lines(not json_output)
    )
    return Output(report, f"wrote {json_path} and {figure_path}", [Rows(f"eval {dataset} ({report['encoder']})", (), summary_rows(report))])


@command(settings=MODEL + ("batch_size", "workers") + OBJECTS + CREATES, waits_for_store=True)
def reindex(
    settings: Settings,
    alias: Annotated[Optional[str], option("--alias", help="The name searches use; moved to the new collection at the end [default: --collection]")] = None,
    source: Annotated[Optional[str], option("--from", help="Collection (or alias) to read paths from [default: --alias]")] = None,
    target: Annotated[Optional[str], option("--target", help="New collection [default: imgsearch_<model>, with an adapted embedding's id after it]")] = None,
) -> Output:
    """Re-encode the stored images with another model into a new collection, then switch the alias to it
    (searches through the alias keep answering throughout). Needs a Milvus server."""
    from imgsearch.ingest.reindex import reindex_to_model

    report = reindex_to_model(settings, alias=alias, source=source, target=target)
    text = (
        f"{report.alias} now points to {report.target} ({report.model}; was {report.source}); "
        f"{report.ingest.summary_line()}. Search it with --collection {report.alias} --model {report.model}"
    )
    return Output(report.to_dict(), text, failed=report.ingest.failed)


@command(settings=MODEL + OBJECTS + CREATES, json=False)
def serve(
    settings: Settings,
    host: Annotated[str, typer.Option("--host", help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
) -> None:
    """Run the REST service (one worker: the model and the store are loaded once)."""
    from imgsearch.api.app import Service, run_service
    from imgsearch.processes import limit_malloc_arenas, reexec_with_python_objects_in_malloc

    if _own_process:
        reexec_with_python_objects_in_malloc()  # before anything is loaded (docs/benchmarks.md: the soak)
    limit_malloc_arenas()  # before the model's and the store's threads start (docs/benchmarks.md: the soak)
    service = Service(settings)  # a locked Milvus Lite file or missing weights fail here, as one line
    # SIGTERM: uvicorn stops taking requests, lets those in flight finish, then raises the signal again: a clean stop
    # (queued writes and scans are refused; IMGSEARCH_STOP_WAIT_SECONDS bounds the rest)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    stderr.print(markup_safe(f"serving {settings.collection_name} ({service.encoder.name}) on http://{host}:{port}"), highlight=False)
    run_service(service, host, port)


_own_process = False  # started as the command: serve may re-execute it (never a test's CliRunner, nor an embedding program)


def run() -> None:
    """The `imgsearch` console script and `python -m imgsearch.cli`."""
    global _own_process
    _own_process = True
    app()


if __name__ == "__main__":  # pragma: no cover
    run()

"""How a command line becomes Settings and a command's Output becomes text, exit status included: the machinery
every `imgsearch` command shares, so cli.py holds only the commands."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from imgsearch.config import Settings, is_lite_uri, load_settings
from imgsearch.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_PARTIAL, EXIT_TERMINATED, SPACE_ERRNOS, ImgsearchError, Terminated
from imgsearch.terminal import markup_safe, print_json, say, stderr, table


def option(*names: str, help: str, **kwargs: Any) -> Any:
    return typer.Option(*names, help=help, show_default=False, **kwargs)


def _setting_option(field: str, flags: tuple[str, ...], kind: type) -> Any:
    """A flag for a Settings field; its help is the field's description, so the two cannot drift."""
    described = Settings.model_fields[field]
    value = described.get_default(call_default_factory=True)  # a default factory's value, not pydantic's placeholder
    default = "" if value is None or value in ("", {}) else f"; default {value}"
    return Annotated[Optional[kind], option(*flags, help=f"{described.description} [env IMGSEARCH_{field.upper()}{default}]")]


# The options that become Settings, declared once; each command names the ones it takes (see `command`).
SHARED_OPTIONS: dict[str, Any] = {
    field: _setting_option(field, flags, kind)
    for field, flags, kind in (
        ("milvus_uri", ("--uri",), str), ("collection", ("--collection",), str), ("model", ("--model", "-m"), str),
        ("weights", ("--weights",), Path), ("device", ("--device",), str), ("runtime", ("--runtime",), str),
        ("batch_size", ("--batch-size",), int), ("workers", ("--workers",), int), ("threshold", ("--threshold",), float),
        ("storage_options", ("--storage-options",), str), ("ray_address", ("--ray-address",), str),
        ("index", ("--index",), str),
    )
}
STORE = ("milvus_uri", "collection", "model")
CREATES = ("index",)  # commands that may create a collection
OBJECTS = ("storage_options",)  # commands that read, serve or remove files in object storage
MODEL = STORE + ("weights", "device", "runtime")
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout")]


@dataclass
class Rows:
    """One table: a title, column names (none: a two-column key/value table) and rows of cells."""

    title: str
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]


NUMBER_COLUMNS = ("#", "score", "confidence")  # right-aligned


@dataclass
class Output:
    """What a command returns. With --json, `value` is printed; else the `tables`, then `notes` on stderr, then
    `text` as one line. `failed` inputs are listed on stderr either way and make the exit status 3."""

    value: Any
    text: str = ""
    tables: list[Rows] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    what_failed: str = "skipped"

    def print(self) -> None:
        for rows in self.tables:
            table(rows.title, rows.columns, rows.rows, right=NUMBER_COLUMNS)
        for note in self.notes:
            stderr.print(f"note: {markup_safe(note)}", highlight=False, soft_wrap=True)
        if self.text:
            say(self.text)


def command_registrar(app: typer.Typer) -> Callable[..., Callable[[Callable], Callable]]:
    """`@command(name, settings=..., json=...)` for `app`."""
    return functools.partial(command, app)


def command(
    app: typer.Typer, name: str | None = None, *, settings: tuple[str, ...] = MODEL, json: bool = True, waits_for_store: bool = False
) -> Callable[[Callable], Callable]:
    """Register a command that takes `settings: Settings`, built from the shared options named in `settings` (flags
    over IMGSEARCH_* variables over defaults), and returns an Output, printed here (`--json` added unless json=False;
    a command that declares `json_output` itself gets it too). Known failures become one line and exit status 2.
    `waits_for_store` (the commands that write: a long job should survive a Milvus restart): a server that is down or
    restarting is retried for IMGSEARCH_STORE_RETRY_SECONDS. Queries fail at once, as the service answers 503."""

    def register(function: Callable) -> Callable:
        signature = inspect.signature(function, eval_str=True)
        own = [parameter for parameter in signature.parameters.values() if parameter.name != "settings"]
        takes_json = "json_output" in signature.parameters
        shared = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=SHARED_OPTIONS[n]) for n in settings]
        if json and not takes_json:
            shared.append(inspect.Parameter("json_output", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=JsonOption))

        @functools.wraps(function)
        def run(**arguments: Any) -> None:
            json_output = arguments.get("json_output", False) if takes_json else arguments.pop("json_output", False)
            try:
                loaded = load_settings(**{n: arguments.pop(n) for n in settings})
                if waits_for_store and not is_lite_uri(loaded.milvus_uri):  # Lite runs in this process: nothing to wait for
                    from imgsearch.store.retry import set_retry_window

                    set_retry_window(loaded.store_retry_seconds)
                output = function(settings=loaded, **arguments)
            except ImgsearchError as error:
                stderr.print(f"[red]error:[/red] {markup_safe(error)}", highlight=False, soft_wrap=True)
                raise typer.Exit(EXIT_FAILED) from None
            except OSError as error:
                if error.errno not in SPACE_ERRNOS:
                    raise
                where = f" writing {error.filename}" if error.filename else ""
                stderr.print(
                    f"[red]error:[/red] {markup_safe(f'no space{where} ({error.strerror})')}; free space (or point TMPDIR "
                    "elsewhere) and run the same command again: what was written stays", highlight=False, soft_wrap=True,
                )
                raise typer.Exit(EXIT_FAILED) from None
            except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (Terminated)
                terminated = isinstance(interrupt, Terminated)
                done = getattr(interrupt, "done", "")
                stderr.print(
                    f"[yellow]{'terminated' if terminated else 'interrupted'}:[/yellow] {markup_safe(done) + '; ' if done else ''}"
                    "what was written stays, and the same command again finishes the job", highlight=False, soft_wrap=True,
                )
                raise typer.Exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED) from None
            if output is None:
                return
            if json_output:
                print_json(output.value)
            else:
                output.print()
            finish(output.failed, output.what_failed)

        run.__signature__ = signature.replace(parameters=own + shared)  # what Typer reads the options from
        run.__annotations__ = {parameter.name: parameter.annotation for parameter in own + shared}
        return app.command(name)(run)

    return register


def finish(failed: list[dict[str, str]], what: str = "skipped") -> None:
    """Unreadable inputs go to stderr, one line each, so stdout stays the result; then exit status 3 (partial)."""
    for failure in failed:
        stderr.print(f"[yellow]{what}[/yellow] {markup_safe(failure['path'])}: {markup_safe(failure['error'])}", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(EXIT_PARTIAL)

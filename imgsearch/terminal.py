"""Text from users (labels, paths, errors) made safe for a terminal: control characters shown, not obeyed,
and rich markup shown, not interpreted. JSON output keeps the exact text, with the same characters escaped."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import unicodedata
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from imgsearch.validation import is_hidden

# emoji off: a label like "bag :fire:" is printed as typed.
stderr = Console(stderr=True, emoji=False)
stdout = Console(emoji=False)


def _escape_character(character: str) -> str:
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: Any) -> str:
    """`text` with every control, line-separator and bidi character written as an escape, e.g. ESC as \\x1b. In text
    that is not NFC, combining marks are escaped too: two file names spelled NFC and NFD ("é" and "e\\u0301") look
    identical on screen but are different files."""
    text = str(text)
    decomposed = not unicodedata.is_normalized("NFC", text)
    if not decomposed and not any(is_hidden(c) for c in text):
        return text
    return "".join(_escape_character(c) if is_hidden(c) or decomposed and unicodedata.combining(c) else c for c in text)


def markup_safe(text: Any) -> str:
    """For interpolation into a rich markup string: brackets escaped, controls made visible."""
    return escape(visible(text))


def plain(text: Any) -> Text:
    """A rich Text cell or title that is never parsed as markup."""
    return Text(visible(text))


def json_line(value: Any) -> str:
    """One line of JSON. json.dumps escapes C0 controls; C1 controls, DEL, and line and bidi separators are
    escaped too, so piping the output to a terminal cannot move the cursor or reorder text."""
    text = json.dumps(value, ensure_ascii=False)
    if not any(is_hidden(c) for c in text):
        return text
    return "".join(f"\\u{ord(c):04x}" if is_hidden(c) else c for c in text)


def table(title: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]], *, right: tuple[str, ...] = ()) -> None:
    """Every cell is user data or a number: printed as text, never as markup."""
    shown = Table(title=plain(title), title_justify="left", show_header=bool(columns))
    for column in columns or ("", ""):
        shown.add_column(column, justify="right" if column in right else "left", overflow="fold")
    for row in rows:
        shown.add_row(*(plain(cell) for cell in row))
    stdout.print(shown)


class VisibleFormatter(logging.Formatter):
    """Log lines carry paths and labels too: their control characters are shown, not obeyed."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(visible(line) for line in super().format(record).split("\n"))  # tracebacks keep their lines


STAGE_NAMES = {
    "scan": "scanning", "encode": "encoding", "index": "building the search index", "calibrate": "calibrating \"unknown\"",
}


@contextlib.contextmanager
def progress_bar(enabled: bool):
    if not enabled:
        yield None
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(STAGE_NAMES.get(stage, stage), total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


def print_json(value: Any) -> None:
    sys.stdout.write(json_line(value) + "\n")


def say(text: str) -> None:
    stdout.print(markup_safe(text), highlight=False, soft_wrap=True)


def progress_lines(enabled: bool) -> Callable[[str], None] | None:
    return (lambda line: stderr.print(markup_safe(line), highlight=False)) if enabled else None

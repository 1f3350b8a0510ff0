"""Text from users (labels, paths, errors) made safe for a terminal: control characters shown, not obeyed,
and rich markup shown, not interpreted. JSON output keeps the exact text, with the same characters escaped."""

from __future__ import annotations

import json
from typing import Any

from rich.markup import escape
from rich.text import Text

from imgsearch.validation import is_hidden


def _escape_character(character: str) -> str:
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: Any) -> str:
    """`text` with every control, line-separator and bidi character written as an escape, e.g. ESC as \\x1b."""
    text = str(text)
    if not any(is_hidden(c) for c in text):
        return text
    return "".join(_escape_character(c) if is_hidden(c) else c for c in text)


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

"""What an id or a text field may contain, and which numbers are numbers: the rules every service
checks requests with (the gateway on the public API, retrieval and ranking on their own), so the
messages read the same everywhere. Each check returns an INVALID_ARGUMENT message naming the field
and the rule, never the offending value (it may hold bytes that break a log line or a terminal).
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

NO_CONTROLS = "must not contain control characters, NUL or line breaks"
NO_NUL = "must not contain NUL or control characters (tabs and line breaks are allowed)"
FINITE = "must be a finite number (NaN and infinities are not allowed)"


# Unicode category Cc is exactly U+0000-U+001F and U+007F-U+009F; U+2028/U+2029 are the line and
# paragraph separators. A regex is ~50x faster than unicodedata per character (exclude lists).
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROLS_BUT_BREAKS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

# An artifact version as a request names it: "" (the newest loaded) or the version number.
VERSION_FORM = re.compile(r"[0-9]{0,20}")


def has_control(text: str, allow_breaks: bool = False) -> bool:
    """Control characters (NUL, line breaks, tabs, DEL, C1: Unicode category Cc) or the Unicode
    line and paragraph separators: they would split a log record or a CSV row. Free text may keep
    tabs and line breaks (allow_breaks: tab, LF, CR, U+2028, U+2029), never NUL or other controls."""
    return (_CONTROLS_BUT_BREAKS if allow_breaks else _CONTROLS).search(text) is not None


def plain_error(field: str, value: str, allow_breaks: bool = False) -> str | None:
    """An id or a one-line label (allow_breaks=False), or free text (True): the message, or None."""
    if has_control(value, allow_breaks):
        return f"{field}: {NO_NUL if allow_breaks else NO_CONTROLS}"
    return None


def plain_ids_error(field: str, values: Sequence[str]) -> str | None:
    """The first entry of a list of ids with a control character, by index: the message, or None.
    One regex pass over the joined list; the index is looked for only when there is one."""
    if not has_control("".join(values)):
        return None
    for i, value in enumerate(values):
        if has_control(value):
            return f"{field}[{i}]: {NO_CONTROLS}"
    return None


def finite_error(field: str, values: Iterable[float]) -> str | None:
    """The first non-finite entry of a list of floats, by index: the message, or None."""
    for i, value in enumerate(values):
        if not math.isfinite(value):
            return f"{field}[{i}]: {FINITE}"
    return None

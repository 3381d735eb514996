"""Generic loader (e.g. shopping): items.jsonl + interactions.csv -> Dataset.

items.jsonl, one JSON object a line: `id` (string or integer, required), optional `title`, `text`,
`category`, `subcategory` (strings; numbers are turned into strings) and `timestamp` (see below).
Other fields are ignored; blank lines are skipped. A row that is not an object or lacks an id is
skipped and reported; a duplicate id keeps the first row. A bad optional field (a list where a
string belongs, a bad timestamp) is reported and left empty/0, and the item is kept.

interactions.csv, with a header naming at least `user_id,item_id,timestamp`; `event` and `value` are
optional columns, others are ignored, order is free (a missing required column is an error for the
whole file). `timestamp` is unix seconds (integer or decimal) or ISO-8601 (`2024-03-01T12:00:00Z`;
without an offset it is read as UTC). Missing trailing fields read as empty.

Implicit-feedback rule (EVENT_WEIGHTS; event names are case-insensitive, `-`/space read as `_`):
  * view / impression  -> dropped: being shown something is not a positive (not reported as bad);
  * click 1, like 1, add_to_cart 2, purchase 3 -> kept with that weight as value (the value column
    is ignored for these: for a purchase it is often a price, not a preference);
  * rating -> kept iff value >= POSITIVE_RATING (as MovieLens), value = the rating;
  * empty event / no event column -> kept, value = the value column, or 1.0 when empty;
  * any other event -> reported and skipped.
Rows with an empty user id, an unknown item id, a bad timestamp or a bad value are reported (file
and line) and skipped. Kept rows are deduplicated per (user, item): earliest time, largest value.
"""
from __future__ import annotations

import csv
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from offline.datasets.base import Dataset, Item, LoadReport
from offline.datasets.movielens import POSITIVE_RATING

EVENT_WEIGHTS: dict[str, float] = {"click": 1.0, "like": 1.0, "add_to_cart": 2.0, "purchase": 3.0}
DROPPED_EVENTS = frozenset({"view", "impression"})
REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp")
_TEXT_FIELDS = ("title", "text", "category", "subcategory")


def parse_timestamp(value: Any) -> int:
    """Unix seconds (int/float or numeric string) or an ISO-8601 string -> int unix seconds (UTC).

    Raises ValueError for anything else (empty, NaN, booleans, unparseable text)."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"bad timestamp {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        text = str(value).strip()
        try:
            number = float(text)
        except ValueError:
            try:
                dt = datetime.fromisoformat(text)
            except ValueError:
                raise ValueError(f"bad timestamp {text!r} (want unix seconds or ISO-8601)") from None
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=timezone.utc)
            return int(dt.timestamp())
    if not math.isfinite(number):
        raise ValueError(f"bad timestamp {value!r}")
    return int(number)


def _normalize_event(event: str) -> str:
    return event.strip().lower().replace("-", "_").replace(" ", "_")


def _require(path: Path, name: str) -> Path:
    file = path / name
    if not file.exists():
        raise FileNotFoundError(f"{file}: missing (generic data needs items.jsonl and interactions.csv)")
    return file


def _load_items(file: Path, report: LoadReport) -> list[Item]:
    name = file.name
    items: dict[str, Item] = {}
    n = 0
    with open(file, encoding="utf-8-sig", errors="replace") as f:
        for line, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            n += 1
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                report.bad(name, line, f"not JSON: {e.msg}")
                continue
            if not isinstance(row, dict):
                report.bad(name, line, "not a JSON object")
                continue
            raw_id = row.get("id")
            if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip():
                report.bad(name, line, "missing or empty id")
                continue
            item_id = str(raw_id).strip()
            if item_id in items:
                report.bad(name, line, f"duplicate id {item_id} (first kept)")
                continue
            fields: dict[str, str] = {}
            for key in _TEXT_FIELDS:
                value = row.get(key)
                if value is None:
                    fields[key] = ""
                elif isinstance(value, str):
                    fields[key] = value.strip()
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    fields[key] = str(value)
                else:
                    report.bad(name, line, f"field {key} is not a string (left empty, item kept)")
                    fields[key] = ""
            stamp = 0
            if row.get("timestamp") not in (None, ""):
                try:
                    stamp = parse_timestamp(row["timestamp"])
                except ValueError as e:
                    report.bad(name, line, f"{e} (timestamp left 0, item kept)")
            items[item_id] = Item(item_id, fields["title"], fields["text"], fields["category"],
                                  fields["subcategory"], stamp)
    report.rows_read[name] = n
    return list(items.values())


def _implicit_value(event: str, value_text: str) -> float | None:
    """The kept value for one row, None to drop it silently; ValueError when the row is bad."""
    value = None
    if value_text.strip():
        value = float(value_text)
        if not math.isfinite(value):
            raise ValueError(f"bad value {value_text!r}")
    if not event:
        return 1.0 if value is None else value
    if event in DROPPED_EVENTS:
        return None
    if event in EVENT_WEIGHTS:
        return EVENT_WEIGHTS[event]
    if event == "rating":
        if value is None:
            raise ValueError("rating event without a value")
        return value if value >= POSITIVE_RATING else None
    raise ValueError(f"unknown event {event!r} (known: {sorted([*EVENT_WEIGHTS, *DROPPED_EVENTS, 'rating'])})")


def _load_interactions(file: Path, known: set[str], report: LoadReport
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    name = file.name
    kept: dict[tuple[str, str], tuple[int, float]] = {}  # (user, item) -> (earliest ts, max value)
    n = 0
    with open(file, encoding="utf-8-sig", errors="replace", newline="") as f:
        rows = csv.reader(f)
        header = [h.strip().lower() for h in next(rows, [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{file}: header {header} lacks column(s) {missing}; "
                             "want user_id,item_id,timestamp[,event][,value]")
        col = {c: header.index(c) for c in (*REQUIRED_COLUMNS, "event", "value") if c in header}
        for row in rows:
            line = rows.line_num
            n += 1
            if len(row) > len(header):
                report.bad(name, line, f"expected {len(header)} fields, got {len(row)}")
                continue
            get = lambda c: row[col[c]].strip() if c in col and col[c] < len(row) else ""  # noqa: E731
            user, item = get("user_id"), get("item_id")
            if not user:
                report.bad(name, line, "empty user_id")
                continue
            if item not in known:
                report.bad(name, line, f"unknown item_id {item!r}")
                continue
            try:
                ts = parse_timestamp(get("timestamp"))
                value = _implicit_value(_normalize_event(get("event")), get("value"))
            except ValueError as e:
                report.bad(name, line, str(e))
                continue
            if value is None:
                continue
            old = kept.get((user, item))
            kept[(user, item)] = (ts, value) if old is None else (min(old[0], ts), max(old[1], value))
    report.rows_read[name] = n
    keys = list(kept)
    return (np.array([u for u, _ in keys], dtype=object), np.array([i for _, i in keys], dtype=object),
            np.array([kept[k][0] for k in keys], dtype=np.int64),
            np.array([kept[k][1] for k in keys], dtype=np.float32))


def load_generic(path: Path) -> Dataset:
    """Load `path/items.jsonl` and `path/interactions.csv` (rules in the module docstring)."""
    path = Path(path)
    report = LoadReport()
    items = _load_items(_require(path, "items.jsonl"), report)
    users, item_ids, stamps, values = _load_interactions(
        _require(path, "interactions.csv"), {it.item_id for it in items}, report)
    return Dataset("generic", items, users, item_ids, stamps, values, report=report)

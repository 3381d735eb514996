"""MIND (Microsoft News Dataset) loader: news.tsv + behaviors.tsv -> Dataset with impressions.

Folder layout accepted by `load_mind(path)`:
  * `path` holds news.tsv and behaviors.tsv itself (one split, e.g. MINDsmall_train/); or
  * `path` holds split subfolders, each with both files, named `train` / `dev` or ending in
    `_train` / `_dev` (e.g. `path/train` + `path/dev`, or `path/MINDsmall_train` +
    `path/MINDsmall_dev`). Both are loaded, train first. Two candidates for the same split
    (MINDsmall_train next to MINDlarge_train) is an error: point `path` at one of them.
  A split folder is never paired with its sibling automatically: loading MINDsmall_train/ reads only
  that folder (and logs a warning naming MINDsmall_dev/ when it sits next to it). The unlabelled
  MIND test split (impression tokens without `-0`/`-1`) is not supported: its rows are reported as
  bad impression tokens.

Conventions:
  * Times (`11/15/2019 8:55:22 AM`) are read as UTC.
  * Item: title, text = abstract ("" when missing), category, subcategory. News that appear in more
    than one split are taken from the first split; a duplicate id inside one news.tsv is reported.
    Item.timestamp = earliest impression time at which the news was shown (0 if never shown): MIND
    carries no publish time, and first exposure is what a freshness feature needs.
  * Interactions (value 1.0) are clicks: every `-1` impression token at the impression's time, plus
    every history entry. A history of H ids seen in an impression at time t gets t-H, t-H+1, ..., t-1
    (oldest first), so history precedes the impression and keeps its order. Interactions are
    deduplicated per (user, item), keeping the earliest time; each user's rows are sorted by time.
  * Dataset.impressions: one Impression per labelled row, in file order; history and shown lists
    keep the order in the file, minus unknown ids. Impression.split is the folder's label ("train" /
    "dev"; "" for a single folder).

MIND's own split (Dataset.split_labels), only when both train and dev are loaded; with one folder it
is None and the build splits each user's interactions by time instead. After deduplication:
  * an interaction kept at a history entry -> train (MIND histories precede its impression logs);
  * a click in a train impression -> train, except clicks at or after
    t_max - (t_max - t_min) * VALID_SHARE_OF_TRAIN, t over the train folder's impression times -> valid.
    MIND-small/large train covers 6 days and dev the 7th, so valid is the train folder's last day;
  * a click in a dev impression -> test. An item the user already had earlier (in their history or a
    train click) keeps that earlier occurrence and its label: test holds only new clicks.

Bad input is never fatal; it goes to Dataset.report with file (as `split/file` when there are
splits) and line number:
  * news.tsv: wrong field count (8 expected) or empty id -> row skipped.
  * behaviors.tsv: wrong field count (5 expected), empty user id, bad time, empty impressions or an
    impression token that is not `<id>-0` / `<id>-1` -> row skipped.
  * Unknown news ids (in history or impressions) are dropped and counted once per row; the rest of
    the row is kept. A row left with nothing shown adds no Impression but keeps its history clicks.
  * Empty history is normal (a cold user) and not reported.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from common.logs import get_logger
from offline.datasets.base import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID, Dataset, Impression, Item, LoadReport

NEWS_FIELDS = 8
BEHAVIOR_FIELDS = 5
_EPOCH = datetime(1970, 1, 1)
_SPLIT_ORDER = ("train", "dev")
log = get_logger("offline.datasets.mind")
VALID_SHARE_OF_TRAIN = 1 / 6   # MIND train spans 6 days: its last day validates (see module docstring)
_HISTORY = "history"           # origin of an interaction first seen in a history, next to folder labels


def parse_mind_time(text: str) -> int:
    """'11/15/2019 8:55:22 AM' -> unix seconds (read as UTC). Raises ValueError when malformed."""
    try:
        date, clock, half = text.split(" ")
        month, day, year = (int(x) for x in date.split("/"))
        hour, minute, second = (int(x) for x in clock.split(":"))
    except ValueError:
        raise ValueError(f"bad time {text!r}") from None
    if half not in ("AM", "PM") or not 1 <= hour <= 12:
        raise ValueError(f"bad time {text!r}")
    hour = hour % 12 + (12 if half == "PM" else 0)
    return int((datetime(year, month, day, hour, minute, second) - _EPOCH).total_seconds())


def format_mind_time(ts: int) -> str:
    """Inverse of parse_mind_time, spelled as MIND does (no zero padding on month, day, hour)."""
    dt = _EPOCH + timedelta(seconds=int(ts))
    hour12 = dt.hour % 12 or 12
    half = "AM" if dt.hour < 12 else "PM"
    return f"{dt.month}/{dt.day}/{dt.year} {hour12}:{dt.minute:02d}:{dt.second:02d} {half}"


def mind_splits(path: Path) -> list[tuple[str, Path]]:
    """[(label, folder)] to read: [("", path)] for one split, else [("train", ...), ("dev", ...)]."""
    path = Path(path)
    if (path / "news.tsv").exists() or (path / "behaviors.tsv").exists():
        sibling = _sibling_split(path)
        if sibling is not None:
            log.warning("MIND split folder loaded alone: the time split applies; point DATA at the parent "
                        "folder to use MIND's own train/dev split",
                        extra={"folder": path.name, "sibling": sibling.name})
        return [("", path)]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such MIND folder")
    found: dict[str, list[Path]] = {s: [] for s in _SPLIT_ORDER}
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        for split in _SPLIT_ORDER:
            if sub.name == split or sub.name.endswith("_" + split):
                found[split].append(sub)
    for split, subs in found.items():
        if len(subs) > 1:
            raise ValueError(f"{path}: several {split} folders {[s.name for s in subs]}; "
                             "point DATA at one of them")
    splits = [(split, subs[0]) for split, subs in found.items() if subs]
    if not splits:
        raise FileNotFoundError(f"{path}: neither news.tsv/behaviors.tsv nor train/dev subfolders found")
    return splits


def _sibling_split(folder: Path) -> Path | None:
    """The other split next to a train or dev folder (MINDsmall_train <-> MINDsmall_dev), if present."""
    for split, other in (("train", "dev"), ("dev", "train")):
        if folder.name == split or folder.name.endswith("_" + split):
            candidate = folder.with_name(folder.name[:len(folder.name) - len(split)] + other)
            return candidate if (candidate / "behaviors.tsv").exists() else None
    return None


def _lines(file: Path, desc: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline); only \\n ends a line, so a stray \\r in a
    title cannot shift line numbers. Undecodable bytes become U+FFFD instead of failing the load."""
    with open(file, encoding="utf-8", errors="replace", newline="\n") as f:
        for number, raw in enumerate(tqdm(f, desc=desc, unit=" lines", disable=None), start=1):
            yield number, raw.rstrip("\r\n")


def _require(folder: Path, name: str) -> Path:
    file = folder / name
    if not file.exists():
        raise FileNotFoundError(f"{file}: missing (a MIND split needs news.tsv and behaviors.tsv)")
    return file


def _short(ids: list[str], limit: int = 5) -> str:
    return ", ".join(ids[:limit]) + (f" (+{len(ids) - limit} more)" if len(ids) > limit else "")


def load_mind(path: Path) -> Dataset:
    """Load one MIND split folder, or a folder of train/dev splits (see module docstring)."""
    splits = mind_splits(Path(path))
    report = LoadReport()
    news: dict[str, tuple[str, str, str, str]] = {}  # id -> (title, abstract, category, subcategory)

    for label, folder in splits:
        name = f"{label}/news.tsv" if label else "news.tsv"
        seen_here: set[str] = set()
        n = 0
        for line, raw in _lines(_require(folder, "news.tsv"), name):
            n += 1
            parts = raw.split("\t")
            if len(parts) != NEWS_FIELDS:
                report.bad(name, line, f"expected {NEWS_FIELDS} tab-separated fields, got {len(parts)}")
                continue
            news_id = parts[0].strip()
            if not news_id:
                report.bad(name, line, "empty news id")
                continue
            if news_id in seen_here:
                report.bad(name, line, f"duplicate news id {news_id} (first kept)")
                continue
            seen_here.add(news_id)
            news.setdefault(news_id, (parts[3].strip(), parts[4].strip(), parts[1].strip(), parts[2].strip()))
        report.rows_read[name] = n

    first_shown: dict[str, int] = {}
    impressions: list[Impression] = []
    # Per user: history string -> (known ids, earliest impression time, unknown ids). A MIND user's
    # history is the same string in all of their rows: parse it once, share the tuple.
    histories: dict[str, dict[str, tuple[tuple[str, ...], int, list[str]]]] = {}
    clicks: dict[str, list[tuple[str, int, str]]] = {}   # user -> (news id, time, folder label)

    for label, folder in splits:
        name = f"{label}/behaviors.tsv" if label else "behaviors.tsv"
        n = 0
        for line, raw in _lines(_require(folder, "behaviors.tsv"), name):
            n += 1
            parts = raw.split("\t")
            if len(parts) != BEHAVIOR_FIELDS:
                report.bad(name, line, f"expected {BEHAVIOR_FIELDS} tab-separated fields, got {len(parts)}")
                continue
            _, user, time_text, history_text, impressions_text = parts
            user = user.strip()
            if not user:
                report.bad(name, line, "empty user id")
                continue
            try:
                ts = parse_mind_time(time_text.strip())
            except ValueError as e:
                report.bad(name, line, str(e))
                continue
            tokens = impressions_text.split()
            if not tokens:
                report.bad(name, line, "no impressions")
                continue
            shown: list[str] = []
            clicked: list[bool] = []
            unknown: list[str] = []
            bad_token = None
            for token in tokens:
                news_id, dash, flag = token.rpartition("-")
                if not dash or not news_id or flag not in ("0", "1"):
                    bad_token = token
                    break
                if news_id in news:
                    shown.append(news_id)
                    clicked.append(flag == "1")
                else:
                    unknown.append(news_id)
            if bad_token is not None:
                report.bad(name, line, f"bad impression token {bad_token!r} (want <id>-0 or <id>-1)")
                continue

            user_histories = histories.setdefault(user, {})
            cached = user_histories.get(history_text)
            if cached is None:
                ids = history_text.split()
                cached = (tuple(i for i in ids if i in news), ts, [i for i in ids if i not in news])
            elif ts < cached[1]:
                cached = (cached[0], ts, cached[2])
            user_histories[history_text] = cached
            history = cached[0]
            if unknown or cached[2]:
                report.bad(name, line, f"unknown news id(s) dropped, rest of row kept: {_short(cached[2] + unknown)}")
            for news_id, click in zip(shown, clicked):
                if ts < first_shown.get(news_id, ts + 1):
                    first_shown[news_id] = ts
                if click:
                    clicks.setdefault(user, []).append((news_id, ts, label))
            if shown:
                impressions.append(Impression(user, ts, history, tuple(shown), tuple(clicked), label))
        report.rows_read[name] = n

    items = [Item(news_id, title, abstract, category, subcategory, first_shown.get(news_id, 0))
             for news_id, (title, abstract, category, subcategory) in news.items()]
    users, item_ids, stamps, origins = _interactions(histories, clicks)
    own_split = [label for label, _ in splits] == list(_SPLIT_ORDER)
    return Dataset("mind", items, users, item_ids, stamps, np.ones(len(users), dtype=np.float32),
                   impressions=impressions, report=report,
                   split_labels=_split_labels(origins, stamps, impressions) if own_split else None)


def _interactions(histories: dict[str, dict[str, tuple[tuple[str, ...], int, list[str]]]],
                  clicks: dict[str, list[tuple[str, int, str]]]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """History + impression clicks, deduped per (user, item) at the earliest time, sorted per user.

    Also returns each kept interaction's origin: _HISTORY or the label of the folder it was clicked in."""
    users: list[str] = []
    item_ids: list[str] = []
    stamps: list[int] = []
    origins: list[str] = []
    for user in histories:  # every kept row registered its user here, in first-seen order
        earliest: dict[str, tuple[int, str]] = {}
        for history, ts, _ in histories[user].values():
            for offset, news_id in enumerate(history):
                t = ts - len(history) + offset
                if t < earliest.get(news_id, (t + 1,))[0]:
                    earliest[news_id] = (t, _HISTORY)
        for news_id, t, label in clicks.get(user, ()):
            if t < earliest.get(news_id, (t + 1,))[0]:
                earliest[news_id] = (t, label)
        for news_id, (t, origin) in sorted(earliest.items(), key=lambda kv: kv[1][0]):
            users.append(user), item_ids.append(news_id), stamps.append(t), origins.append(origin)
    return (np.array(users, dtype=object), np.array(item_ids, dtype=object),
            np.array(stamps, dtype=np.int64), np.array(origins, dtype=object))


def _split_labels(origins: np.ndarray, stamps: np.ndarray, impressions: list[Impression]) -> np.ndarray:
    """[n] int8 split labels from interaction origins and times (rule in the module docstring)."""
    train_times = [imp.timestamp for imp in impressions if imp.split == "train"]
    t_min, t_max = min(train_times, default=0), max(train_times, default=0)
    valid_from = t_max - (t_max - t_min) * VALID_SHARE_OF_TRAIN
    labels = np.full(len(origins), SPLIT_TRAIN, np.int8)
    labels[(origins == "train") & (stamps >= valid_from)] = SPLIT_VALID
    labels[origins == "dev"] = SPLIT_TEST
    return labels

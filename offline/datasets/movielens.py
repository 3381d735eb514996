"""MovieLens loaders: ml-latest-small CSVs (movies.csv, ratings.csv, tags.csv) and ml-100k (u.data, u.item)."""
from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from offline.datasets.base import Dataset, Item, LoadReport

# Ratings at or above this are treated as positive implicit feedback.
POSITIVE_RATING = 3.5
_YEAR = re.compile(r"\((\d{4})\)\s*$")
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western")


def load_movielens(path: Path) -> Dataset:
    """Load either layout found at `path`; keeps ratings >= POSITIVE_RATING as implicit positives."""
    path = Path(path)
    if (path / "ratings.csv").exists():
        return _load_latest(path)
    if (path / "u.data").exists():
        return _load_100k(path)
    raise FileNotFoundError(f"{path}: neither ratings.csv (ml-latest) nor u.data (ml-100k) found")


def _year_timestamp(title: str) -> int:
    m = _YEAR.search(title)
    if not m:
        return 0
    # Seconds since epoch of Jan 1 of that year (approximate, enough for an item-age feature).
    return int((int(m.group(1)) - 1970) * 365.25 * 86400)


def _load_latest(path: Path) -> Dataset:
    report = LoadReport()
    tags: dict[str, list[str]] = defaultdict(list)
    if (path / "tags.csv").exists():
        with open(path / "tags.csv", newline="", encoding="utf-8") as f:
            rows = csv.reader(f)
            next(rows, None)
            n = 0
            for line, row in enumerate(rows, start=2):
                n += 1
                if len(row) != 4:
                    report.bad("tags.csv", line, f"expected 4 fields, got {len(row)}")
                    continue
                tag = row[2].strip()
                if tag and tag.lower() not in (t.lower() for t in tags[row[1]]):
                    tags[row[1]].append(tag)
            report.rows_read["tags.csv"] = n

    items: list[Item] = []
    with open(path / "movies.csv", newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        next(rows, None)
        for line, row in enumerate(rows, start=2):
            if len(row) != 3 or not row[0].strip():
                report.bad("movies.csv", line, f"expected 3 fields, got {len(row)}")
                continue
            movie_id, title, genres = row[0].strip(), row[1].strip(), row[2].strip()
            genre_list = [] if genres == "(no genres listed)" else genres.split("|")
            items.append(Item(
                item_id=movie_id, title=title,
                text=" ".join(["Genres:", ", ".join(genre_list) + "."] +
                              (["Tags:", ", ".join(tags[movie_id][:20]) + "."] if tags[movie_id] else [])),
                category=genre_list[0] if genre_list else "",
                subcategory=genre_list[1] if len(genre_list) > 1 else "",
                timestamp=_year_timestamp(title)))
        report.rows_read["movies.csv"] = len(items)
    known = {it.item_id for it in items}

    users, item_ids, ts, values = [], [], [], []
    with open(path / "ratings.csv", newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        next(rows, None)
        n = 0
        for line, row in enumerate(rows, start=2):
            n += 1
            try:
                user, movie, rating, stamp = row[0], row[1], float(row[2]), int(row[3])
            except (ValueError, IndexError):
                report.bad("ratings.csv", line, "expected userId,movieId,rating,timestamp")
                continue
            if movie not in known:
                report.bad("ratings.csv", line, f"unknown movieId {movie}")
                continue
            if rating >= POSITIVE_RATING:
                users.append(user), item_ids.append(movie), ts.append(stamp), values.append(rating)
        report.rows_read["ratings.csv"] = n
    return Dataset("movielens", items, np.array(users, dtype=object), np.array(item_ids, dtype=object),
                   np.array(ts, dtype=np.int64), np.array(values, dtype=np.float32), report=report)


def _load_100k(path: Path) -> Dataset:
    report = LoadReport()
    items: list[Item] = []
    with open(path / "u.item", encoding="latin-1") as f:
        for line, raw in enumerate(f, start=1):
            parts = raw.rstrip("\n").split("|")
            if len(parts) != 5 + len(ML100K_GENRES):
                report.bad("u.item", line, f"expected {5 + len(ML100K_GENRES)} fields, got {len(parts)}")
                continue
            genres = [g for g, flag in zip(ML100K_GENRES, parts[5:]) if flag == "1" and g != "unknown"]
            items.append(Item(parts[0], parts[1], "Genres: " + ", ".join(genres) + ".",
                              genres[0] if genres else "", genres[1] if len(genres) > 1 else "",
                              _year_timestamp(parts[1])))
    report.rows_read["u.item"] = len(items)
    known = {it.item_id for it in items}
    users, item_ids, ts, values = [], [], [], []
    with open(path / "u.data", encoding="latin-1") as f:
        n = 0
        for line, raw in enumerate(f, start=1):
            n += 1
            parts = raw.split("\t")
            try:
                user, movie, rating, stamp = parts[0], parts[1], float(parts[2]), int(parts[3])
            except (ValueError, IndexError):
                report.bad("u.data", line, "expected user\\titem\\trating\\ttimestamp")
                continue
            if movie not in known:
                report.bad("u.data", line, f"unknown item {movie}")
                continue
            if rating >= POSITIVE_RATING:
                users.append(user), item_ids.append(movie), ts.append(stamp), values.append(rating)
    report.rows_read["u.data"] = n
    return Dataset("movielens", items, np.array(users, dtype=object), np.array(item_ids, dtype=object),
                   np.array(ts, dtype=np.int64), np.array(values, dtype=np.float32), report=report)

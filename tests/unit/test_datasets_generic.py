"""Generic loader: items.jsonl fields, the event rule, timestamps and bad-row reporting."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from offline.datasets.generic import EVENT_WEIGHTS, load_generic, parse_timestamp

ITEMS = [
    {"id": "sku-1", "title": "Red shoe", "text": "A running shoe.", "category": "shoes",
     "subcategory": "running", "timestamp": 1700000000, "price": 42},
    {"id": 2, "title": "Blue hat", "category": "hats", "timestamp": "2024-03-01T12:00:00Z"},
    {"id": "sku-3"},
]


def write(folder: Path, items: list, csv_lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.jsonl").write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in items) + "\n", encoding="utf-8")
    (folder / "interactions.csv").write_text("\n".join(csv_lines) + "\n", encoding="utf-8")
    return folder


def rows(ds) -> dict[tuple[str, str], tuple[int, float]]:
    return {(u, i): (int(t), float(v)) for u, i, t, v in zip(ds.users, ds.item_ids, ds.timestamps, ds.values)}


def test_parse_timestamp():
    assert parse_timestamp("1700000000") == 1700000000
    assert parse_timestamp("1700000000.9") == 1700000000
    assert parse_timestamp(12) == 12
    assert parse_timestamp("1970-01-01T00:01:00Z") == 60
    assert parse_timestamp("1970-01-01T01:01:00+01:00") == 60
    assert parse_timestamp("1970-01-01 00:01:00") == 60          # naive = UTC
    assert parse_timestamp("1970-01-02") == 86400
    for bad in ("", "soon", "nan", "inf", None, True, [1]):
        with pytest.raises(ValueError):
            parse_timestamp(bad)


def test_items_and_event_rule(tmp_path):
    folder = write(tmp_path, ITEMS, [
        "user_id,item_id,timestamp,event,value",
        "u1,sku-1,100,view,",                      # dropped: not a positive
        "u1,sku-1,200,click,",                     # 1
        "u1,2,300,purchase,99.90",                 # 3 (price ignored)
        "u2,2,1970-01-01T00:05:00Z,Add-To-Cart,",  # 2, ISO time, event normalised
        "u2,sku-3,400,rating,4.5",                 # kept as rating
        "u3,sku-3,400,rating,2",                   # rating below threshold: dropped
        "u3,sku-1,500,,0.25",                      # no event: value column
        "u3,2,600,,",                              # no event, no value: 1.0
        "u4,sku-3,700,impression,",                # dropped
    ])
    ds = load_generic(folder)
    assert ds.name == "generic" and not ds.report.malformed
    assert ds.report.rows_read == {"items.jsonl": 3, "interactions.csv": 9}
    items = {it.item_id: it for it in ds.items}
    assert set(items) == {"sku-1", "2", "sku-3"}
    shoe = items["sku-1"]
    assert (shoe.title, shoe.text, shoe.category, shoe.subcategory, shoe.timestamp) == \
        ("Red shoe", "A running shoe.", "shoes", "running", 1700000000)
    assert items["2"].timestamp == 1709294400 and items["2"].text == ""
    assert items["sku-3"] == type(shoe)("sku-3", "", "", "", "", 0)
    assert rows(ds) == {("u1", "sku-1"): (200, 1.0), ("u1", "2"): (300, 3.0), ("u2", "2"): (300, 2.0),
                        ("u2", "sku-3"): (400, 4.5), ("u3", "sku-1"): (500, 0.25), ("u3", "2"): (600, 1.0)}
    assert EVENT_WEIGHTS["purchase"] > EVENT_WEIGHTS["add_to_cart"] > EVENT_WEIGHTS["click"]


def test_duplicates_keep_earliest_time_and_largest_value(tmp_path):
    folder = write(tmp_path, ITEMS, ["item_id,user_id,timestamp,event",   # any column order
                                     "sku-1,u1,500,purchase", "sku-1,u1,100,click", "sku-1,u1,50,view"])
    assert rows(load_generic(folder)) == {("u1", "sku-1"): (100, 3.0)}


def test_optional_columns_absent(tmp_path):
    folder = write(tmp_path, ITEMS, ["user_id,item_id,timestamp,extra", "u1,sku-1,5,whatever"])
    assert rows(load_generic(folder)) == {("u1", "sku-1"): (5, 1.0)}


def test_bad_rows_are_counted_with_line_numbers(tmp_path):
    folder = write(tmp_path, ITEMS + [
        "{not json",
        "[1, 2]",
        {"title": "no id"},
        {"id": ""},
        {"id": "sku-1", "title": "duplicate"},
        "",                                                        # blank line: skipped, not counted
        {"id": "sku-9", "title": ["a", "list"], "timestamp": "someday"},
    ], [
        "user_id,item_id,timestamp,event,value",
        "u1,sku-1,100,click,",
        "u1,nope,100,click,",          # unknown item
        ",sku-1,100,click,",           # no user
        "u1,sku-1,later,click,",       # bad time
        "u1,sku-1,100,wishlist,",      # unknown event
        "u1,sku-1,100,,abc",           # bad value
        "u1,sku-1,100,rating,",        # rating without value
        "u1,sku-1,100,click,,extra",   # too many fields
        "u1,sku-3",                    # short row: empty timestamp
        "u2,sku-9,100,click,",         # the item with bad optional fields is kept
    ])
    ds = load_generic(folder)
    bad = [(f, line) for f, line, _ in ds.report.malformed]
    assert bad == [("items.jsonl", n) for n in (4, 5, 6, 7, 8, 10, 10)] + \
        [("interactions.csv", n) for n in range(3, 11)]
    reasons = " | ".join(why for _, _, why in ds.report.malformed)
    for word in ("not JSON", "not a JSON object", "missing or empty id", "duplicate id sku-1",
                 "field title", "timestamp left 0", "unknown item_id 'nope'", "empty user_id",
                 "bad timestamp 'later'", "unknown event 'wishlist'", "rating event without a value"):
        assert word in reasons
    assert next(it for it in ds.items if it.item_id == "sku-1").title == "Red shoe"
    nine = next(it for it in ds.items if it.item_id == "sku-9")
    assert (nine.title, nine.timestamp) == ("", 0)
    assert rows(ds) == {("u1", "sku-1"): (100, 1.0), ("u2", "sku-9"): (100, 1.0)}
    assert ds.report.rows_read == {"items.jsonl": 9, "interactions.csv": 10}


def test_header_and_missing_files(tmp_path):
    folder = write(tmp_path / "a", ITEMS, ["user,item,time", "u1,sku-1,1"])
    with pytest.raises(ValueError, match="item_id"):
        load_generic(folder)
    folder = write(tmp_path / "b", ITEMS, [])
    (folder / "interactions.csv").write_text("")
    with pytest.raises(ValueError, match="user_id"):
        load_generic(folder)
    (tmp_path / "c").mkdir()
    with pytest.raises(FileNotFoundError, match="items.jsonl"):
        load_generic(tmp_path / "c")


def test_byte_order_mark_header(tmp_path):
    folder = write(tmp_path, ITEMS, [])
    (folder / "interactions.csv").write_bytes("\ufeffuser_id,item_id,timestamp\r\nu1,2,7\r\n".encode())
    assert rows(load_generic(folder)) == {("u1", "2"): (7, 1.0)}

"""MIND loader: fields, click/history conventions, layouts, every bad-input path, and MIND's own
train/dev split as offline.split hands it to the build (falling back to the per-user time split)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from offline.datasets.base import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID
from offline.datasets.mind import format_mind_time, load_mind, mind_splits, parse_mind_time
from offline.split import dataset_split, split_by_time, split_impressions

NEWS = [
    "N1\tsports\tfootball\tBig match tonight\tThe home team plays the final.\thttp://x/1\t[]\t[]",
    "N2\tfinance\tmarkets\tStocks rally\t\thttp://x/2\t[]\t[]",          # missing abstract
    "N3\tsports\ttennis\tOpen final\tA long rally decides it.\thttp://x/3\t[]\t[]",
    "N4\tfinance\tbanks\tRates rise\tThe bank moved.\thttp://x/4\t[]\t[]",
]
T0 = parse_mind_time("11/15/2019 8:55:22 AM")


def write(folder: Path, news: list[str], behaviors: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "news.tsv").write_text("\n".join(news) + "\n", encoding="utf-8")
    (folder / "behaviors.tsv").write_text("\n".join(behaviors) + "\n", encoding="utf-8")
    return folder


def pairs(ds) -> dict[tuple[str, str], int]:
    return {(u, i): int(t) for u, i, t in zip(ds.users, ds.item_ids, ds.timestamps)}


def test_time_parsing_is_utc_and_round_trips():
    assert parse_mind_time("1/1/1970 12:00:00 AM") == 0
    assert parse_mind_time("1/1/1970 12:00:01 PM") == 12 * 3600 + 1
    assert parse_mind_time("11/15/2019 8:55:22 PM") - parse_mind_time("11/15/2019 8:55:22 AM") == 12 * 3600
    assert format_mind_time(T0) == "11/15/2019 8:55:22 AM"
    for text in ("11/15/2019 8:55:22", "13/15/2019 8:55:22 AM", "11/15/2019 0:55:22 AM",
                 "11-15-2019 8:55:22 AM", "", "11/15/2019 8:61:22 PM"):
        with pytest.raises(ValueError):
            parse_mind_time(text)


def test_items_clicks_history_and_impressions(tmp_path):
    folder = write(tmp_path / "MINDsmall_train", NEWS, [
        "1\tU1\t11/15/2019 8:55:22 AM\tN3 N4\tN1-1 N2-0",
        "2\tU1\t11/15/2019 9:00:00 AM\tN3 N4\tN2-1 N1-0",
        "3\tU2\t11/15/2019 9:10:00 AM\t\tN4-0 N3-1",                        # empty history
    ])
    ds = load_mind(folder)
    assert ds.name == "mind" and not ds.report.malformed
    assert ds.report.rows_read == {"news.tsv": 4, "behaviors.tsv": 3}
    items = {it.item_id: it for it in ds.items}
    assert items["N1"].title == "Big match tonight" and items["N1"].text == "The home team plays the final."
    assert (items["N1"].category, items["N1"].subcategory) == ("sports", "football")
    assert items["N2"].text == ""                                            # missing abstract
    assert items["N1"].timestamp == T0 and items["N4"].timestamp == T0 + 878   # first shown
    assert np.all(ds.values == 1.0) and ds.timestamps.dtype == np.int64
    # History N3 N4 seen first at T0 -> T0-2, T0-1; clicks at the impression time; deduped.
    assert pairs(ds) == {("U1", "N3"): T0 - 2, ("U1", "N4"): T0 - 1, ("U1", "N1"): T0,
                         ("U1", "N2"): T0 + 278, ("U2", "N3"): T0 + 878}
    assert len(ds) == 5
    assert list(ds.users) == ["U1"] * 4 + ["U2"]                             # per user, by time
    assert list(ds.timestamps[:4]) == sorted(ds.timestamps[:4])
    first, _, third = ds.impressions
    assert first.user_id == "U1" and first.timestamp == T0 and first.history == ("N3", "N4")
    assert first.shown == ("N1", "N2") and first.clicked == (True, False)
    assert third.history == () and third.shown == ("N4", "N3") and third.clicked == (False, True)


def test_history_clicked_again_keeps_earliest_time(tmp_path):
    folder = write(tmp_path / "d", NEWS, [
        "1\tU1\t11/15/2019 8:55:22 AM\t\tN1-1 N2-0",
        "2\tU1\t11/16/2019 8:55:22 AM\tN1\tN1-1 N3-0",   # N1 in history later and clicked again
    ])
    ds = load_mind(folder)
    assert pairs(ds) == {("U1", "N1"): T0}


def test_unknown_ids_are_reported_and_rest_of_row_kept(tmp_path):
    folder = write(tmp_path / "d", NEWS, [
        "1\tU1\t11/15/2019 8:55:22 AM\tN3 N99 N4\tN1-1 N77-1 N2-0",
        "2\tU2\t11/15/2019 8:56:00 AM\tN1\tN88-1",                  # nothing known shown
    ])
    ds = load_mind(folder)
    assert [(f, line) for f, line, _ in ds.report.malformed] == [("behaviors.tsv", 1), ("behaviors.tsv", 2)]
    assert "N99" in ds.report.malformed[0][2] and "N77" in ds.report.malformed[0][2]
    assert len(ds.impressions) == 1
    imp = ds.impressions[0]
    assert imp.history == ("N3", "N4") and imp.shown == ("N1", "N2") and imp.clicked == (True, False)
    # H = 2 known history entries -> T0-2, T0-1; U2 keeps its history click, gets no impression.
    assert pairs(ds) == {("U1", "N3"): T0 - 2, ("U1", "N4"): T0 - 1, ("U1", "N1"): T0,
                         ("U2", "N1"): T0 + 37}
    assert set(ds.item_ids) <= {it.item_id for it in ds.items}


def test_bad_lines_are_counted_with_line_numbers_and_skipped(tmp_path):
    folder = write(tmp_path / "d", NEWS + [
        "N5\tsports\tonly four fields",
        "\tsports\tx\tNo id\t\thttp://x\t[]\t[]",
        "N1\tsports\tfootball\tDuplicate\t\thttp://x/1\t[]\t[]",
    ], [
        "1\tU1\t11/15/2019 8:55:22 AM\tN3\tN1-1 N2-0",
        "2\tU1\t11/15/2019 8:55:22 AM\tN3",                           # 4 fields
        "3\tU1\tyesterday\tN3\tN1-1",                                 # bad time
        "4\tU1\t11/15/2019 8:55:22 AM\tN3\tN1-1 N2-x",                # bad label
        "5\tU1\t11/15/2019 8:55:22 AM\tN3\tN1",                       # unlabelled (test split)
        "6\tU1\t11/15/2019 8:55:22 AM\tN3\t",                         # no impressions
        "7\t\t11/15/2019 8:55:22 AM\tN3\tN1-1",                       # no user
        "",                                                           # blank line
        "9\tU3\t11/15/2019 9:55:22 AM\tN2\tN4-1",
    ])
    ds = load_mind(folder)
    bad = [(f, line) for f, line, _ in ds.report.malformed]
    assert bad == [("news.tsv", 5), ("news.tsv", 6), ("news.tsv", 7)] + \
        [("behaviors.tsv", n) for n in (2, 3, 4, 5, 6, 7, 8)]
    reasons = [why for _, _, why in ds.report.malformed]
    assert "duplicate" in reasons[2] and "bad time" in reasons[4] and "'N2-x'" in reasons[5]
    assert {it.item_id for it in ds.items} == {"N1", "N2", "N3", "N4"}
    assert next(it for it in ds.items if it.item_id == "N1").title == "Big match tonight"
    assert [imp.user_id for imp in ds.impressions] == ["U1", "U3"]
    assert ds.report.rows_read == {"news.tsv": 7, "behaviors.tsv": 9}
    assert "malformed rows: 10" in ds.report.summary()


def test_crlf_and_stray_carriage_return_keep_line_numbers(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    news = "\r\n".join(NEWS[:2]).replace("Big match", "Big\rmatch") + "\r\n"
    (folder / "news.tsv").write_bytes(news.encode())
    (folder / "behaviors.tsv").write_bytes(b"1\tU1\t11/15/2019 8:55:22 AM\t\tN1-1\r\nbad\r\n")
    ds = load_mind(folder)
    assert len(ds.items) == 2 and ds.items[1].text == ""
    assert [(f, line) for f, line, _ in ds.report.malformed] == [("behaviors.tsv", 2)]


def test_train_and_dev_subfolders(tmp_path):
    write(tmp_path / "MINDsmall_train", NEWS[:3], ["1\tU1\t11/15/2019 8:55:22 AM\tN3\tN1-1 N2-0"])
    write(tmp_path / "MINDsmall_dev", NEWS[1:] + ["N3\tx\ty\tChanged title\t\tu\t[]\t[]"],
          ["1\tU1\t11/16/2019 8:55:22 AM\tN3 N1\tN4-1 N99-0"])
    ds = load_mind(tmp_path)
    assert [label for label, _ in mind_splits(tmp_path)] == ["train", "dev"]
    assert sorted(it.item_id for it in ds.items) == ["N1", "N2", "N3", "N4"]
    assert next(it for it in ds.items if it.item_id == "N3").title == "Open final"   # train wins
    assert [(f, line) for f, line, _ in ds.report.malformed] == [("dev/news.tsv", 4), ("dev/behaviors.tsv", 1)]
    assert set(ds.report.rows_read) == {"train/news.tsv", "dev/news.tsv", "train/behaviors.tsv", "dev/behaviors.tsv"}
    assert len(ds.impressions) == 2
    assert pairs(ds) == {("U1", "N3"): T0 - 1, ("U1", "N1"): T0, ("U1", "N4"): T0 + 86400}


def test_a_split_folder_alone_is_loaded_alone_with_a_hint(tmp_path, caplog):
    write(tmp_path / "MINDsmall_train", NEWS, ["1\tU1\t11/15/2019 8:55:22 AM\t\tN1-1"])
    write(tmp_path / "MINDsmall_dev", NEWS, ["1\tU2\t11/16/2019 8:55:22 AM\t\tN2-1"])
    with caplog.at_level("WARNING"):
        ds = load_mind(tmp_path / "MINDsmall_train")
    assert len(ds.impressions) == 1 and ds.split_labels is None
    (hint,) = [r for r in caplog.records if "loaded alone" in r.getMessage()]
    assert hint.sibling == "MINDsmall_dev"
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_mind(tmp_path)   # the parent: both splits, no hint
    assert not [r for r in caplog.records if "loaded alone" in r.getMessage()]


def test_plain_train_dev_names_and_layout_errors(tmp_path):
    write(tmp_path / "a" / "train", NEWS, ["1\tU1\t11/15/2019 8:55:22 AM\t\tN1-1"])
    write(tmp_path / "a" / "dev", NEWS, ["1\tU2\t11/15/2019 8:55:22 AM\t\tN2-1"])
    assert len(load_mind(tmp_path / "a").impressions) == 2
    write(tmp_path / "b" / "MINDsmall_train", NEWS, [])
    write(tmp_path / "b" / "MINDlarge_train", NEWS, [])
    with pytest.raises(ValueError, match="several train"):
        load_mind(tmp_path / "b")
    (tmp_path / "c").mkdir()
    with pytest.raises(FileNotFoundError):
        load_mind(tmp_path / "c")
    with pytest.raises(FileNotFoundError):
        load_mind(tmp_path / "missing")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "news.tsv").write_text(NEWS[0] + "\n")
    with pytest.raises(FileNotFoundError, match="behaviors.tsv"):
        load_mind(tmp_path / "d")


def test_registered_kind_loads_through_load_spec(tmp_path):
    import offline.datasets as datasets
    folder = write(tmp_path / "d", NEWS, ["1\tU1\t11/15/2019 8:55:22 AM\t\tN1-1"])
    assert len(datasets.load(f"mind:{folder}")) == 1


# MIND's own split: the train folder spans 6 days (11/10 8 AM .. 11/16 8 AM), so its last day
# (from 11/15 8 AM) validates and the dev folder tests.
OWN_TRAIN = [
    "1\tU1\t11/10/2019 8:00:00 AM\tN3\tN1-1 N2-0",          # t_min
    "2\tU2\t11/12/2019 8:00:00 AM\t\tN2-1 N4-0",
    "3\tU2\t11/15/2019 7:59:59 AM\t\tN3-1",                # one second before the last sixth
    "4\tU2\t11/15/2019 8:00:00 AM\t\tN1-1",                # first second of the last sixth
    "5\tU1\t11/16/2019 8:00:00 AM\tN3\tN2-1 N4-0",          # t_max
]
OWN_DEV = [
    "1\tU1\t11/17/2019 9:00:00 AM\tN3\tN1-1 N4-1",          # N1 was clicked in train already
    "2\tU3\t11/17/2019 10:00:00 AM\tN2\tN4-1",              # a user only in dev, with a history
]


def own_split_folder(root: Path) -> Path:
    write(root / "MINDsmall_train", NEWS, OWN_TRAIN)
    write(root / "MINDsmall_dev", NEWS, OWN_DEV)
    return root


def labels(ds) -> dict[tuple[str, str], int]:
    return {(u, i): int(s) for u, i, s in zip(ds.users, ds.item_ids, ds.split_labels)}


def test_train_and_dev_folders_give_minds_own_split(tmp_path):
    ds = load_mind(own_split_folder(tmp_path))
    assert not ds.report.malformed and ds.split_labels.dtype == np.int8 and len(ds.split_labels) == len(ds)
    assert labels(ds) == {
        ("U1", "N3"): SPLIT_TRAIN,    # history
        ("U1", "N1"): SPLIT_TRAIN,    # early train click; its dev click is a duplicate, earliest kept
        ("U1", "N2"): SPLIT_VALID,    # train click at t_max
        ("U1", "N4"): SPLIT_TEST,     # dev click
        ("U2", "N2"): SPLIT_TRAIN,
        ("U2", "N3"): SPLIT_TRAIN,    # just before the last sixth
        ("U2", "N1"): SPLIT_VALID,    # exactly at its start
        ("U3", "N2"): SPLIT_TRAIN,    # a history first seen in a dev row is still history
        ("U3", "N4"): SPLIT_TEST,
    }
    assert pairs(ds)[("U1", "N1")] == parse_mind_time("11/10/2019 8:00:00 AM")
    assert [imp.split for imp in ds.impressions] == ["train"] * 5 + ["dev"] * 2


def test_one_folder_or_one_split_has_no_own_split(tmp_path):
    own_split_folder(tmp_path)
    for folder in (tmp_path / "MINDsmall_train", tmp_path / "MINDsmall_dev"):
        ds = load_mind(folder)
        assert ds.split_labels is None and {imp.split for imp in ds.impressions} == {""}
    write(tmp_path / "only" / "train", NEWS, OWN_TRAIN)
    ds = load_mind(tmp_path / "only")
    assert ds.split_labels is None and {imp.split for imp in ds.impressions} == {"train"}


def test_own_split_masks_and_impressions(tmp_path):
    ds = load_mind(own_split_folder(tmp_path))
    split = dataset_split(ds)
    assert split.rule == "mind train/dev"
    for mask, label in ((split.train, SPLIT_TRAIN), (split.valid, SPLIT_VALID), (split.test, SPLIT_TEST)):
        assert np.array_equal(mask, ds.split_labels == label)
    assert (split.train.sum(), split.valid.sum(), split.test.sum()) == (5, 2, 2)
    train, held_out = split_impressions(ds)
    assert [imp.split for imp in train] == ["train"] * 5 and [imp.split for imp in held_out] == ["dev"] * 2
    assert [imp.timestamp for imp in train + held_out] == sorted(imp.timestamp for imp in ds.impressions)


def test_without_own_split_the_time_split_applies(tmp_path):
    ds = load_mind(write(tmp_path / "d", NEWS, OWN_TRAIN + OWN_DEV))
    assert ds.split_labels is None
    split, by_time = dataset_split(ds), split_by_time(ds.users, ds.timestamps)
    assert split.rule == by_time.rule == "per-user time 80/10/10"
    for a, b in ((split.train, by_time.train), (split.valid, by_time.valid), (split.test, by_time.test)):
        assert np.array_equal(a, b)
    train, held_out = split_impressions(ds)                   # the newest 20% held out
    assert len(held_out) == 2
    assert [imp.timestamp for imp in train + held_out] == sorted(imp.timestamp for imp in ds.impressions)


def test_subset_keeps_labels_aligned(tmp_path):
    from offline.build import subset_dataset
    ds = load_mind(own_split_folder(tmp_path))
    label_of = labels(ds)
    small = subset_dataset(ds, max_items=2, max_users=2)
    assert 0 < len(small) < len(ds) and len(small.split_labels) == len(small)
    assert labels(small) == {key: label_of[key] for key in zip(small.users, small.item_ids)}
    assert len(set(labels(small).values())) > 1
    assert subset_dataset(load_mind(tmp_path / "MINDsmall_train"), 2, 2).split_labels is None

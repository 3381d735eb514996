"""The build folds the item log in: online items become catalog items, deletes drop items."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from common.item_log import ItemLogUnavailable, open_item_log
from core.item_records import ItemOp, ItemRecord
from offline.datasets.base import SPLIT_TRAIN, SPLIT_VALID, Dataset, Item
from offline.item_log_fold import fold_item_log, read_item_log


def dataset(labels: bool = False) -> Dataset:
    items = [Item("a", "A", "about a", "news", "world", 100), Item("b", "B", "", "sport"), Item("c", "C", "", "")]
    users = np.array(["u1", "u1", "u2", "u2", "u3"], object)
    item_ids = np.array(["a", "b", "b", "c", "a"], object)
    split = np.array([SPLIT_TRAIN, SPLIT_TRAIN, SPLIT_VALID, SPLIT_TRAIN, SPLIT_VALID], np.int8) if labels else None
    return Dataset("hand", items, users, item_ids, np.arange(5, dtype=np.int64) + 10,
                   np.ones(5, np.float32), split_labels=split)


def up(seq: int, item_id: str, title: str, category: str = "news") -> ItemRecord:
    return ItemRecord(ItemOp.UPSERT, item_id, title, f"text of {title}", category, np.ones(4, np.float32), seq)


def rm(seq: int, item_id: str) -> ItemRecord:
    return ItemRecord(ItemOp.DELETE, item_id, seq=seq)


def test_the_latest_state_of_each_id_becomes_the_catalog():
    ds = dataset(labels=True)
    records = [up(1, "n1", "New one"), up(2, "a", "A again", "culture"), rm(3, "b"), up(4, "n2", "Two"),
               rm(5, "n1"), up(6, "n1", "New one, back"), rm(7, "c"), up(8, "c", "C revived"), rm(9, "zz"),
               rm(10, "n3"), up(11, "n2", "Two, edited", "")]
    folded, report = fold_item_log(ds, records)
    assert [it.item_id for it in folded.items] == ["a", "c", "n1", "n2"]   # b dropped; new ones in first-upsert order
    by_id = {it.item_id: it for it in folded.items}
    assert by_id["a"] == Item("a", "A again", "text of A again", "culture", "world", 100)   # keeps its subcategory, time
    assert (by_id["c"].title, by_id["n1"].title, by_id["n2"].title, by_id["n2"].category) == \
        ("C revived", "New one, back", "Two, edited", "")
    # b's interactions went with it; every interaction names a catalog item.
    assert folded.item_ids.tolist() == ["a", "c", "a"] and folded.users.tolist() == ["u1", "u2", "u3"]
    assert folded.split_labels.tolist() == [SPLIT_TRAIN, SPLIT_TRAIN, SPLIT_VALID]
    assert folded.timestamps.tolist() == [10, 13, 14]
    assert set(folded.item_ids) <= {it.item_id for it in folded.items}
    assert (report.last_seq, report.added, report.updated, report.dropped, report.interactions_dropped) == \
        (11, 2, 2, 1, 2)
    assert [it.item_id for it in ds.items] == ["a", "b", "c"] and len(ds) == 5   # the input is untouched


def test_no_records_change_nothing():
    ds = dataset()
    folded, report = fold_item_log(ds, [])
    assert folded.items == ds.items and folded.item_ids.tolist() == ds.item_ids.tolist()
    assert report.last_seq == 0 and folded.split_labels is None


def test_read_item_log_reads_every_record_and_a_down_store_fails_the_build(tmp_path):
    spec = f"sqlite:{tmp_path / 'items.db'}"

    async def fill():
        item_log = open_item_log(spec)
        await item_log.append([up(0, "n1", "x"), rm(0, "a")])
        await item_log.close()
    asyncio.run(fill())
    assert [(r.seq, r.item_id) for r in read_item_log(spec)] == [(1, "n1"), (2, "a")]
    (tmp_path / "file").write_text("")
    with pytest.raises(ItemLogUnavailable):
        read_item_log(f"sqlite:{tmp_path / 'file' / 'items.db'}")


def test_a_build_folds_the_log_in_and_records_its_position(tmp_path):
    """A small real build (the `built` fixture's data, one epoch) on a log of upserts and a delete."""
    from offline import datasets
    from offline.build import BuildOptions, build, subset_dataset
    from tests.conftest import DATA, REPO

    catalog = subset_dataset(datasets.load(DATA), 600, 150).items
    doomed, renamed = catalog[3].item_id, catalog[10].item_id
    spec = f"sqlite:{tmp_path / 'items.db'}"

    async def fill():
        item_log = open_item_log(spec)
        await item_log.append([up(0, "online-1", "A brand new documentary about deep sea fish", "Documentary")])
        await item_log.append([up(0, renamed, "Renamed classic", "Drama"), rm(0, doomed)])
        await item_log.append([up(0, "online-2", "A space opera with robots", "Sci-Fi"), rm(0, "online-1"),
                               up(0, "online-1", "Deep sea fish, the director's cut", "Documentary")])
        await item_log.close()
    asyncio.run(fill())

    final = build(BuildOptions(data=DATA, artifacts=tmp_path / "artifacts", model_repo=tmp_path / "model_repository",
                               cache_dir=REPO / ".cache", max_items=600, max_users=150, epochs=1, progress=False,
                               item_log=spec))
    from common.artifacts import open_artifacts
    manifest = open_artifacts(tmp_path / "artifacts").manifest   # verified: checksums, feature spec
    cat = json.loads((final / "catalog.json").read_text())
    assert manifest["item_log_seq"] == 6
    assert manifest["counts"]["items"] == len(cat["item_ids"]) == 600 + 2 - 1
    assert doomed not in cat["item_ids"]
    assert cat["item_ids"][-2:] == ["online-1", "online-2"]
    titles = dict(zip(cat["item_ids"], cat["titles"]))
    categories = dict(zip(cat["item_ids"], cat["categories"]))
    assert titles["online-1"] == "Deep sea fish, the director's cut" and categories["online-2"] == "Sci-Fi"
    assert titles[renamed] == "Renamed classic" and categories[renamed] == "Drama"
    assert np.load(final / "item_text.npy").shape[0] == 601   # every item, the new ones too, encoded

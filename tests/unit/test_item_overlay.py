"""ItemOverlay: every replica that applies the same log, in whatever batches, holds the same state."""
from __future__ import annotations

import numpy as np
import pytest

from core.item_overlay import ItemOverlay
from core.item_records import ItemOp, ItemRecord

DIM = 4
CATALOG = ["c0", "c1", "c2", "c3", "c4"]
CATEGORIES = {"news": 1, "sport": 2}


def overlay(folded_seq: int = 0) -> ItemOverlay:
    return ItemOverlay(list(CATALOG), DIM, dict(CATEGORIES), folded_seq=folded_seq)


def vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def up(seq: int, item_id: str, category: str = "news", seed: int | None = None) -> ItemRecord:
    return ItemRecord(ItemOp.UPSERT, item_id, f"t-{item_id}-{seq}", "text", category,
                      vec(seq if seed is None else seed), seq)


def rm(seq: int, item_id: str) -> ItemRecord:
    return ItemRecord(ItemOp.DELETE, item_id, seq=seq)


LOG = [up(1, "n0"), up(2, "c1", "sport"), rm(3, "c2"), up(4, "n1", "sport"), rm(5, "n0"), up(6, "n2", "other"),
       up(7, "n0"), rm(8, "missing"), up(9, "c2"), up(10, "n3"), rm(11, "n3"), up(12, "n1", "news", seed=99),
       rm(13, "c4"), up(14, "c4"), rm(15, "c4")]


def state(o: ItemOverlay) -> tuple:
    return (dict(o.index), list(o.online_ids), o.vectors.tobytes(), o.category_ids.tolist(),
            o.deleted_mask.tolist(), dict(o.titles), {j: v.tobytes() for j, v in o.replaced.items()},
            o.applied_seq, o.total)


def mirror(o: ItemOverlay, batches: list[list[ItemRecord]]) -> tuple[dict[int, bytes], set[int]]:
    """What a service that only sees AppliedRecords holds: latest vector per index, deleted set."""
    vectors: dict[int, bytes] = {}
    deleted: set[int] = set()
    for batch in batches:
        applied = o.apply(batch)
        for j, v in zip(applied.upserted.tolist(), applied.vectors):
            vectors[j] = v.tobytes()
            deleted.discard(j)
        deleted |= set(applied.deleted.tolist())
    return vectors, deleted


@pytest.mark.parametrize("splits", [[15], [1] * 15, [3, 5, 7], [7, 1, 1, 6], [2, 2, 2, 2, 2, 2, 3]])
def test_the_same_records_in_any_batches_give_the_same_state(splits):
    whole, split = overlay(), overlay()
    want = mirror(whole, [LOG])
    batches, start = [], 0
    for size in splits:
        batches.append(LOG[start:start + size])
        start += size
    got = mirror(split, batches)
    assert state(split) == state(whole)
    assert got == want   # a mirror that follows AppliedRecords agrees too, whatever the batches


def test_indices_come_from_log_order_alone():
    o = overlay()
    o.apply(LOG)
    assert o.online_ids == ["n0", "n1", "n2", "n3"]
    assert [o.index_of(i) for i in ("n0", "n1", "n2", "n3")] == [5, 6, 7, 8]
    assert o.total == 9 and len(o.deleted_mask) == 9 and o.vectors.shape == (4, DIM)
    assert o.vectors[1].tobytes() == vec(99).tobytes()           # n1's latest upsert
    assert o.category_ids.tolist() == [1, 1, 0, 1]               # n2's unknown category -> 0
    assert o.deleted_indices().tolist() == [4, 8]                # c4 (deleted last), n3
    assert o.applied_seq == 15 and o.index_of("missing") is None


def test_a_catalog_id_keeps_its_index_and_gets_its_new_vector():
    o = overlay()
    applied = o.apply([up(1, "c1", "sport", seed=42)])
    assert o.index_of("c1") == 1 and o.total == len(CATALOG) and o.online_ids == []
    assert applied.upserted.tolist() == [1] and applied.categories.tolist() == [2]
    assert applied.vectors[0].tobytes() == vec(42).tobytes()
    assert o.replaced[1].tobytes() == vec(42).tobytes() and o.titles[1] == "t-c1-1"


def test_delete_then_upsert_again_revives_the_same_index():
    o = overlay()
    o.apply([up(1, "n0")])
    gone = o.apply([rm(2, "n0")])
    assert gone.deleted.tolist() == [5] and not o.is_live(5)
    back = o.apply([up(3, "n0", seed=7)])
    assert back.upserted.tolist() == [5] and back.deleted.tolist() == []
    assert o.is_live(5) and o.index_of("n0") == 5 and o.total == 6
    assert o.vectors[0].tobytes() == vec(7).tobytes()
    c = o.apply([rm(4, "c0"), up(5, "c0")])                       # in one batch: live at the end
    assert c.deleted.tolist() == [] and o.is_live(0)


def test_upsert_then_delete_in_one_batch_still_allocates_and_reports_the_index():
    o = overlay()
    applied = o.apply([up(1, "n0"), rm(2, "n0"), up(3, "n1")])
    assert applied.upserted.tolist() == [5, 6] and applied.deleted.tolist() == [5]
    assert not o.is_live(5) and o.is_live(6)


def test_records_the_build_folded_are_skipped():
    # The build folded seqs 1..4 (n0 and n1 became catalog items): the overlay starts after them.
    o = ItemOverlay(CATALOG + ["n0", "n1"], DIM, dict(CATEGORIES), folded_seq=4)
    assert o.applied_seq == 4
    applied = o.apply(LOG[:7])
    assert applied.last_seq == 7
    assert o.is_live(2)                                  # seq 3 (delete c2) was skipped
    assert 1 not in o.replaced                           # seq 2 (upsert c1) was skipped
    assert o.online_ids == ["n2"] and o.index_of("n2") == 7
    assert applied.upserted.tolist() == [5, 7] and applied.deleted.tolist() == []   # n0: deleted, re-upserted


def test_apply_is_idempotent():
    once, twice = overlay(), overlay()
    once.apply(LOG)
    twice.apply(LOG[:9])
    twice.apply(LOG)                     # a replayed prefix and an overlap
    again = twice.apply(LOG[:12])
    assert again.empty and again.last_seq == 15
    assert state(twice) == state(once)


def test_a_malformed_record_is_skipped_the_same_way_everywhere():
    o = overlay()
    bad = [ItemRecord(ItemOp.UPSERT, "x", vector=np.ones(DIM + 1, np.float32), seq=1),
           ItemRecord(ItemOp.UPSERT, "y", vector=None, seq=2),
           ItemRecord(ItemOp.UPSERT, "z", vector=np.full(DIM, np.nan, np.float32), seq=3),
           up(4, "n0")]
    applied = o.apply(bad)
    assert o.rejected == 3 and applied.last_seq == 4
    assert o.online_ids == ["n0"] and o.index_of("n0") == 5     # the bad ones took no index


def test_readers_never_see_an_index_without_its_arrays():
    o = overlay()
    o.apply([up(1, "n0")])
    j = o.index_of("n0")
    assert j is not None and j - o.n_items < len(o.vectors) and j < len(o.deleted_mask)
    assert not o.is_live(-1) and not o.is_live(o.total)

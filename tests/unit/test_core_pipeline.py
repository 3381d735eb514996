"""core.pipeline, core.filters and core.candidates in process, on hand-made data."""
from __future__ import annotations

import asyncio

import faiss
import numpy as np
import pytest

from core.candidates import CandidateGenerator
from core.channels import BertChannel, ItemVectors, PopularChannel
from core.blocked_items import BlockedItems
from core.filters import (BlockedItemsFilter, ExcludedItemsFilter, SeenItemsFilter, apply_filters,
                          retrieval_filters)
from core.pipeline import Step, StepFailed, run_steps, run_steps_async, run_steps_yielding
from core.types import ChannelResult, RetrievalQuery


def blocked(items: set[int], n: int = 200) -> BlockedItems:
    mask = np.zeros(n, bool)
    mask[list(items)] = True
    return BlockedItems(mask)


def ranked(items) -> ChannelResult:
    items = np.asarray(items, np.int64)
    return ChannelResult(items, np.linspace(1.0, 0.1, len(items)).astype(np.float32))


def test_each_filter_reports_what_it_removed_and_why():
    query = RetrievalQuery("u", history=np.array([1, 2]), exclude=np.array([5]))
    result = ranked([1, 3, 5, 7, 2, 9])
    seen = SeenItemsFilter().apply(result, query)
    assert seen.kept.items.tolist() == [3, 5, 7, 9] and seen.removed.tolist() == [1, 2]
    assert seen.reason == "seen"
    assert seen.kept.scores.tolist() == pytest.approx(result.scores[[1, 2, 3, 5]].tolist())
    excluded = ExcludedItemsFilter().apply(seen.kept, query)
    assert excluded.kept.items.tolist() == [3, 7, 9] and excluded.reason == "excluded"
    deleted = BlockedItemsFilter(lambda: blocked({9})).apply(excluded.kept, query)
    assert deleted.kept.items.tolist() == [3, 7] and deleted.removed.tolist() == [9]


def test_apply_filters_counts_removals_per_filter():
    removed: dict[str, int] = {}
    kept = apply_filters(retrieval_filters(lambda: blocked({4})), ranked(range(8)),
                         RetrievalQuery("u", np.array([0, 1]), np.array([2])), removed)
    assert kept.items.tolist() == [3, 5, 6, 7]
    assert removed == {"seen": 2, "excluded": 1, "deleted": 1}


def test_fail_open_step_degrades_fail_closed_step_raises():
    log: list[str] = []

    def boom(ctx):
        raise StepFailed("retrieval_timeout")

    steps = [Step("a", lambda ctx: log.append("a"), fail_open=True),
             Step("b", boom, fail_open=True),
             Step("c", lambda ctx: 1 / 0, fail_open=True),
             Step("d", lambda ctx: log.append("d"), fail_open=False)]
    stage_ms: dict[str, float] = {}
    degraded: list[str] = []
    run_steps(steps, None, stage_ms, degraded)
    assert log == ["a", "d"]
    assert degraded == ["retrieval_timeout", "c_error"]
    assert list(stage_ms) == ["a", "b", "c", "d"]
    with pytest.raises(ZeroDivisionError):
        run_steps([Step("x", lambda ctx: 1 / 0, fail_open=False)], None, {}, [])


def test_async_steps_await_coroutines_in_order():
    order: list[str] = []

    async def hop(ctx):
        await asyncio.sleep(0)
        order.append("hop")

    degraded: list[str] = []
    asyncio.run(run_steps_async([Step("hop", hop, fail_open=True),
                                 Step("sync", lambda ctx: order.append("sync"), fail_open=True)],
                                None, {}, degraded))
    assert order == ["hop", "sync"] and degraded == []


def _generator(deleted: set[int]) -> CandidateGenerator:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(200, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(8))
    index.add_with_ids(vectors, np.arange(200, dtype=np.int64))
    counts = np.arange(200, 0, -1)
    channels = [BertChannel(index, ItemVectors(vectors)), PopularChannel(np.arange(200), counts)]
    deleted_items = blocked(deleted)
    for channel in channels:   # as core.retriever.Retriever does: the searches skip deleted items
        channel.blocked = deleted_items
    return CandidateGenerator(channels, retrieval_filters(lambda: deleted_items), {"bert": 30, "popular": 20})


def test_candidates_never_hold_seen_excluded_or_deleted_items_and_fill_the_list():
    deleted = {int(i) for i in range(100, 140)}
    generator = _generator(deleted)
    query = RetrievalQuery("u", history=np.arange(0, 20), exclude=np.arange(20, 60))
    out = generator.retrieve(query, total=50)
    items = set(out.candidates.items.tolist())
    assert len(items) == 50 == len(out.candidates.items)
    assert not items & (set(range(60)) | deleted)
    assert out.removed["seen"] > 0 and out.removed["excluded"] > 0
    assert list(out.stage_ms) == ["channel_bert", "channel_popular", "merge"]


def test_a_failing_channel_is_skipped_not_fatal():
    class BrokenChannel:
        name = "broken"

        def retrieve(self, query, fetch):
            raise RuntimeError("index gone")

    generator = _generator(set())
    generator.channels["broken"] = BrokenChannel()
    generator.quotas["broken"] = 10
    out = generator.retrieve(RetrievalQuery("u", np.array([3])), total=40)
    assert out.failed == ["broken"] and "broken" in out.skipped
    assert len(out.candidates.items) == 40


def test_overfetch_counts_an_item_blocked_twice_once():
    """Seen and excluded overlap in item 3: counted once. Deleted items (4, 5) add nothing: the
    searches skip them inside FAISS, so a channel is asked for k + 4, not k + 6."""
    from core.filters import blocked_count
    query = RetrievalQuery("u", history=np.array([1, 2, 3]), exclude=np.array([3, 4]))
    assert blocked_count(retrieval_filters(lambda: blocked({4, 5})), query) == 4


def test_yielding_steps_let_the_loop_run_other_work_between_them_with_the_same_policy():
    """run_steps_yielding: what run_steps does (fail-open recorded, fail-closed raised), and the
    event loop runs other callbacks between two steps, never inside one."""
    order: list[str] = []

    def step(name: str, fail: bool = False):
        def run(ctx: list) -> None:
            order.append(name)
            if fail:
                raise StepFailed("channel_x", "boom")
            ctx.append(name)
        return run

    async def other() -> None:
        for _ in range(3):
            order.append("other")
            await asyncio.sleep(0)

    async def go():
        stage_ms: dict[str, float] = {}
        degraded: list[str] = []
        steps = [Step("a", step("a"), fail_open=False), Step("b", step("b", fail=True), fail_open=True, reason="b"),
                 Step("c", step("c"), fail_open=False)]
        done, _ = await asyncio.gather(run_steps_yielding(steps, [], stage_ms, degraded), other())
        return done, stage_ms, degraded

    done, stage_ms, degraded = asyncio.run(go())
    assert done == ["a", "c"] and set(stage_ms) == {"a", "b", "c"} and degraded == ["channel_x"]
    assert order.index("other") < order.index("c") and order[:2] == ["a", "other"]   # interleaved between steps
    with pytest.raises(StepFailed):
        asyncio.run(run_steps_yielding([Step("z", step("z", fail=True), fail_open=False)], [], {}, []))

"""GC pauses are timed into fusionrec_gc_pause_seconds, and what a service loaded is frozen out of
later full collections (common/gc_pauses.py)."""
from __future__ import annotations

import gc

from prometheus_client import REGISTRY

from common.gc_pauses import freeze_loaded, watch_pauses


def count(generation: str) -> float:
    return REGISTRY.get_sample_value("fusionrec_gc_pause_seconds_count", {"generation": generation}) or 0.0


def test_every_collection_is_timed_once_by_generation():
    watch_pauses()
    watch_pauses()   # idempotent: one callback
    before = count("2")
    gc.collect()
    assert count("2") == before + 1


def test_what_was_loaded_is_moved_out_of_the_collected_generations():
    loaded = [[i] for i in range(10_000)]   # tracked containers, as a catalog's
    try:
        freeze_loaded()
        assert gc.get_freeze_count() >= len(loaded)
        assert sum(gc.get_count()) < len(loaded)   # none of it waits in generations 0-2
    finally:
        gc.unfreeze()   # the rest of the test session collects as usual
    assert gc.get_freeze_count() == 0


def test_a_refreeze_collects_a_frozen_cycle_let_go_of_and_freezes_the_rest():
    import weakref

    class Node:
        pass
    a, b = Node(), Node()
    a.other, b.other = b, a          # a cycle: only the cyclic collector frees it
    gone = weakref.ref(a)
    try:
        freeze_loaded()
        del a, b
        gc.collect()
        assert gone() is not None    # frozen: the collector never looks at it
        from common.gc_pauses import refreeze
        refreeze()
        assert gone() is None and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_a_refreeze_does_nothing_while_nothing_is_frozen():
    from common.gc_pauses import refreeze
    gc.unfreeze()
    refreeze()
    assert gc.get_freeze_count() == 0

"""One suite, two real backends: SQLite (embedded, durable) and Redis (a real redis-server started
by the session fixture `redis_url`; the suite fails, not skips, without it)."""
from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from gateway.state_store import UserStateStore, open_store

REPO = Path(__file__).resolve().parents[2]
T0 = 1.7e9   # explicit timestamps: no test depends on the clock unless it tests the TTL


@dataclass
class Backend:
    spec: str
    poison: Callable[[str], None]   # make the store itself fail on any write for this user


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "state.db"

        def poison_sqlite(user: str) -> None:   # a trigger that aborts mid-transaction
            with sqlite3.connect(path) as db:
                db.execute(f"CREATE TRIGGER poison BEFORE INSERT ON history WHEN NEW.user_id = '{user}' "
                           "BEGIN SELECT RAISE(ABORT, 'injected failure'); END")
        return Backend(f"sqlite:{path}", poison_sqlite)

    import redis
    url = request.getfixturevalue("redis_url")
    client = redis.from_url(url)
    client.flushdb()
    client.close()

    def poison_redis(user: str) -> None:   # a key of the wrong type: ZADD on it would fail
        with redis.from_url(url) as c:
            c.set(f"fusionrec:h:{user}", "not a sorted set")
    return Backend(url, poison_redis)


def run(spec: str, fn: Callable[[UserStateStore], object], **kwargs):
    async def go():
        store = open_store(spec, **kwargs)
        try:
            return await fn(store)
        finally:
            await store.close()
    return asyncio.run(go())


def test_recent_is_oldest_first_capped_and_deduped(backend):
    async def go(store):
        await store.add([("u", f"i{j}", T0 + j) for j in range(8)])
        await store.add([("u", "i2", T0 + 100)])            # re-clicked: moves to the end
        await store.add([("u", "i5", T0 + 50), ("u", "i5", T0 + 200), ("u", "i5", T0 + 60)])
        return await store.recent("u")
    assert run(backend.spec, go, cap=5) == ["i4", "i6", "i7", "i2", "i5"]


def test_an_older_event_does_not_move_an_item_back(backend):
    async def go(store):
        await store.add([("u", "a", T0 + 10), ("u", "b", T0 + 20)])
        await store.add([("u", "b", T0 + 1)])               # late arrival of an earlier click
        return await store.recent("u")
    assert run(backend.spec, go) == ["a", "b"]


def test_users_are_isolated_and_unknown_is_empty(backend):
    async def go(store):
        await store.add([("a", "x", T0), ("b", "y", T0), ("a", "z", T0 + 1)])
        return await store.recent("a"), await store.recent("b"), await store.recent("nobody")
    assert run(backend.spec, go) == (["x", "z"], ["y"], [])


def test_ttl_drops_old_entries(backend):
    now = time.time()

    async def go(store):
        await store.add([("u", "old", now - 120), ("u", "new", now - 1), ("u", "newer", now)])
        await store.add([("v", "stale", now - 61)])
        return await store.recent("u"), await store.recent("v")
    assert run(backend.spec, go, ttl_s=60) == (["new", "newer"], [])


@pytest.mark.parametrize("bad", [("u", "", T0), ("", "x", T0), ("u", "x", float("nan")),
                                 ("u", "x", float("inf")), ("u", None, T0), ("u", "x", "soon")])
def test_a_malformed_event_refuses_its_whole_batch(backend, bad):
    async def go(store):
        await store.add([("u", "kept", T0)])
        with pytest.raises(ValueError, match=r"events\[1\]\."):
            await store.add([("u", "a", T0 + 1), bad, ("u", "b", T0 + 2)])
        return await store.recent("u")
    assert run(backend.spec, go) == ["kept"]


def test_a_failure_inside_the_store_applies_nothing(backend):
    """The store itself fails mid-batch (after other users' rows): nothing of the batch remains."""
    async def go(store):
        await store.add([("u", "kept", T0)])
        backend.poison("secret-user")
        with pytest.raises(Exception) as info:   # sqlite3.IntegrityError / redis ResponseError
            await store.add([("u", "a", T0 + 1), ("w", "b", T0 + 2), ("secret-user", "x", T0 + 3),
                             ("u", "c", T0 + 4)])
        assert "secret-user" not in str(info.value)   # errors never carry a user id
        return await store.recent("u"), await store.recent("w")
    assert run(backend.spec, go) == (["kept"], [])


def test_a_failing_batch_among_concurrent_ones_fails_alone(backend):
    """Concurrent batches may share a commit (SQLite group commit): only the bad one is undone."""
    async def go(store):
        await store.add([("u", "warm", T0)])
        backend.poison("secret-user")
        results = await asyncio.gather(
            *(store.add([("u", f"i{j}", T0 + j)]) for j in range(1, 11)),
            store.add([("u", "bad", T0 + 20), ("secret-user", "x", T0 + 20)]),
            *(store.add([("v", f"i{j}", T0 + j)]) for j in range(1, 11)), return_exceptions=True)
        assert [type(r).__name__ for r in results].count("NoneType") == 20 and results[10] is not None
        return await store.recent("u"), await store.recent("v")
    assert run(backend.spec, go) == (["warm", *(f"i{j}" for j in range(1, 11))], [f"i{j}" for j in range(1, 11)])


def test_state_survives_reopening(backend):
    run(backend.spec, lambda s: s.add([("u", "x", T0), ("u", "y", T0 + 1)]))
    assert run(backend.spec, lambda s: s.recent("u")) == ["x", "y"]


def test_an_acknowledged_add_survives_a_kill(backend):
    code = textwrap.dedent("""
        import asyncio, sys
        from gateway.state_store import open_store

        async def main():
            store = open_store(sys.argv[1])
            await store.add([("killed", "i%d" % j, 1.7e9 + j) for j in range(20)])
            print("acked", flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", code, backend.spec], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "acked"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert run(backend.spec, lambda s: s.recent("killed")) == [f"i{j}" for j in range(20)]


def test_concurrent_adds_stay_consistent(backend):
    async def go(store):
        seen: list[list[str]] = []

        async def reader():
            for _ in range(20):
                seen.append(await store.recent("u"))
                await asyncio.sleep(0)
        singles = [store.add([("u", f"i{j}", T0 + j)]) for _ in range(4) for j in range(50)]   # > Redis pool
        batches = [store.add([("u", f"i{j}", T0 + j) for j in range(k, min(k + 10, 50))]) for k in range(0, 50, 5)]
        await asyncio.gather(*singles, *batches, reader(), reader())
        return await store.recent("u"), seen
    final, seen = run(backend.spec, go, cap=20)
    assert final == [f"i{j}" for j in range(30, 50)]
    for snapshot in seen:   # every read is a consistent state: sorted by time, unique, <= cap
        assert len(snapshot) <= 20 and len(set(snapshot)) == len(snapshot)
        assert snapshot == sorted(snapshot, key=lambda i: int(i[1:]))


def test_removed_items_are_forgotten(backend):
    async def go(store):
        await store.add([("u", "x", T0), ("u", "y", T0 + 1), ("v", "x", T0), ("v", "z", T0)])
        await store.remove_items(["x", "never-seen"])
        return await store.recent("u"), await store.recent("v")
    assert run(backend.spec, go) == (["y"], ["z"])


def test_an_empty_batch_is_a_no_op(backend):
    async def go(store):
        await store.add([])
        await store.remove_items([])
        return await store.recent("u")
    assert run(backend.spec, go) == []


@pytest.mark.parametrize("spec", ["postgres://x", "sqlite:", "state.db"])
def test_a_bad_spec_names_the_field(spec):
    with pytest.raises(ValueError, match="state: "):
        open_store(spec)


def test_erase_removes_the_users_history_and_marks_them(backend):
    async def go(store):
        await store.add([("u", f"i{j}", T0 + j) for j in range(4)] + [("v", "x", T0)])
        removed = await store.erase("u", when=T0 + 10)
        state = await store.recent_state("u")
        other = await store.recent_state("v")
        again = await store.erase("u", when=T0 + 5)        # idempotent; an older time does not move the marker
        await store.add([("u", "later", T0 + 20)])           # events after the erase count again
        return removed, state, other, again, await store.recent_state("u"), await store.recent_state("nobody")
    removed, state, other, again, after, nobody = run(backend.spec, go)
    assert removed == 4 and state.items == [] and state.erased_at == T0 + 10
    assert other.items == ["x"] and other.erased_at is None
    assert again == 0 and after.items == ["later"] and after.erased_at == T0 + 10
    assert nobody.items == [] and nobody.erased_at is None


def test_erase_survives_reopening_and_is_ordered_after_queued_adds(backend):
    async def go(store):
        # An add queued just before the erase is erased with the rest (same writer order).
        await asyncio.gather(store.add([("u", "a", T0)]), store.erase("u", when=T0 + 1))
        return await store.recent("u")
    assert run(backend.spec, go) == []
    state = run(backend.spec, lambda s: s.recent_state("u"))
    assert state.items == [] and state.erased_at == T0 + 1


def test_an_event_stamped_before_the_erase_is_not_history_even_if_added_after_it(backend):
    """So an add racing the erase gives the same answer whichever lands first."""
    async def go(store):
        await store.erase("u", when=T0 + 1)
        await store.add([("u", "old", T0), ("u", "new", T0 + 2), ("v", "other", T0)])
        return await store.recent("u"), await store.recent("v")
    assert run(backend.spec, go) == (["new"], ["other"])


def test_erase_refuses_an_empty_user(backend):
    async def go(store):
        with pytest.raises(ValueError, match=r"events\[0\]\.user_id"):
            await store.erase("")
    run(backend.spec, go)


def test_remove_items_never_touches_an_erased_marker(backend):
    async def go(store):
        await store.erase("u", when=T0)
        await store.remove_items(["x"])
        return await store.recent_state("u")
    assert run(backend.spec, go).erased_at == T0

"""One suite, two real backends of the item log: SQLite (a file in tmp_path) and Redis (a real
redis-server: the session fixture `redis_url`, plus a private one a test can kill)."""
from __future__ import annotations

import asyncio
import shutil
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from common.item_log import ItemLog, ItemLogUnavailable, RedisItemLog, SqliteItemLog, open_item_log
from core.item_records import ItemOp, ItemRecord

REPO = Path(__file__).resolve().parents[2]
DIM = 8


@dataclass
class Backend:
    spec: str
    poison: Callable[[], None]     # make the store itself fail any append
    cure: Callable[[], None]       # undo poison


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "items.db"

        def poison_sqlite() -> None:   # aborts mid-transaction, after earlier rows of the batch went in
            with sqlite3.connect(path) as db:
                db.execute(SqliteItemLog._SCHEMA)
                db.execute("CREATE TRIGGER poison BEFORE INSERT ON item_log WHEN NEW.item_id = 'poison' "
                           "BEGIN SELECT RAISE(ABORT, 'injected failure'); END")

        def cure_sqlite() -> None:
            with sqlite3.connect(path) as db:
                db.execute("DROP TRIGGER poison")
        return Backend(f"sqlite:{path}", poison_sqlite, cure_sqlite)

    import redis
    url = request.getfixturevalue("redis_url")
    with redis.from_url(url) as client:
        client.flushdb()

    def poison_redis() -> None:        # a counter of the wrong type: the script must refuse the batch
        with redis.from_url(url) as c:
            c.delete(RedisItemLog.COUNTER)
            c.rpush(RedisItemLog.COUNTER, "not a counter")

    def cure_redis() -> None:
        with redis.from_url(url) as c:
            c.delete(RedisItemLog.COUNTER)
    return Backend(url, poison_redis, cure_redis)


def upsert(item_id: str, seed: int = 0, category: str = "news") -> ItemRecord:
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return ItemRecord(ItemOp.UPSERT, item_id, f"title {item_id}", f"text {item_id}", category, vector)


def delete(item_id: str) -> ItemRecord:
    return ItemRecord(ItemOp.DELETE, item_id)


def run(spec: str, fn: Callable[[ItemLog], object]):
    async def go():
        item_log = open_item_log(spec)
        try:
            return await fn(item_log)
        finally:
            await item_log.close()
    return asyncio.run(go())


def test_append_assigns_increasing_seq_and_round_trips_exactly(backend):
    records = [upsert("a", 1), delete("b"), upsert("c", 2, category="")]
    records[0] = ItemRecord(ItemOp.UPSERT, "a", "Tïtle ✓", "multi\nline", "sport",
                            np.array([1e-38, -0.0, 3.4e38, 1 / 3, -2.5, 7, 1e-45, 0.1], np.float32))

    async def go(item_log):
        first = await item_log.append(records)
        second = await item_log.append([upsert("d", 3)])
        return first, second, await item_log.read(0), await item_log.last_seq()
    first, second, got, last = run(backend.spec, go)
    assert (first, second, last) == (3, 4, 4)
    assert [r.seq for r in got] == [1, 2, 3, 4]
    for want, have in zip(records + [upsert("d", 3)], got):
        assert (have.op, have.item_id, have.title, have.text, have.category) == \
            (want.op, want.item_id, want.title, want.text, want.category)
        if want.vector is None:
            assert have.vector is None
        else:
            assert have.vector.dtype == np.float32
            assert have.vector.tobytes() == want.vector.tobytes()   # bit for bit
    assert got == [replace(r, seq=j + 1) for j, r in enumerate(records + [upsert("d", 3)])]
    assert got[0] != replace(got[0], vector=got[0].vector + 1) and got[1] != got[0]


def test_an_empty_batch_writes_nothing(backend):
    async def go(item_log):
        empty = await item_log.append([])
        await item_log.append([delete("x")])
        return empty, await item_log.append([]), await item_log.read(0)
    empty, after_one, got = run(backend.spec, go)
    assert (empty, after_one, len(got)) == (0, 1, 1)


@pytest.mark.parametrize("bad, field", [
    (ItemRecord(ItemOp.UPSERT, "x", vector=np.array([1.0, np.nan], np.float32)), "records[1].vector"),
    (ItemRecord(ItemOp.UPSERT, "x", vector=np.array([1.0, np.inf], np.float32)), "records[1].vector"),
    (ItemRecord(ItemOp.UPSERT, "x"), "records[1].vector"),
    (ItemRecord(ItemOp.UPSERT, "x", vector=np.zeros((2, 2), np.float32)), "records[1].vector"),
    (ItemRecord(ItemOp.UPSERT, "", vector=np.ones(DIM, np.float32)), "records[1].item_id"),
    (ItemRecord("rename", "x"), "records[1].op"),   # type: ignore[arg-type]
    (ItemRecord(ItemOp.DELETE, "x", title=None), "records[1].title"),   # type: ignore[arg-type]
])
def test_a_malformed_record_refuses_its_whole_batch(backend, bad, field):
    async def go(item_log):
        with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
            await item_log.append([upsert("good"), bad, upsert("good2")])
        return await item_log.read(0), await item_log.last_seq()
    assert run(backend.spec, go) == ([], 0)


def test_a_failure_inside_the_store_applies_nothing(backend):
    async def go(item_log):
        await item_log.append([upsert("before")])
        backend.poison()
        with pytest.raises(ItemLogUnavailable):
            await item_log.append([upsert("a"), upsert("b"), upsert("poison"), upsert("c")])
        backend.cure()
        after = await item_log.append([upsert("after")])
        return after, await item_log.read(0)
    after, got = run(backend.spec, go)
    assert [(r.seq, r.item_id) for r in got] == [(1, "before"), (2, "after")]   # no gap, nothing half-applied
    assert after == 2


def test_read_after_keeps_order_and_limit(backend):
    async def go(item_log):
        for j in range(10):
            await item_log.append([upsert(f"i{j}", j)])
        return (await item_log.read(3, limit=4), await item_log.read(10), await item_log.read(0, limit=100),
                await item_log.read(9))
    middle, past_end, everything, last = run(backend.spec, go)
    assert [r.seq for r in middle] == [4, 5, 6, 7] and [r.item_id for r in middle] == ["i3", "i4", "i5", "i6"]
    assert past_end == []
    assert [r.seq for r in everything] == list(range(1, 11))
    assert [r.item_id for r in last] == ["i9"]


@pytest.mark.parametrize("after, limit, field", [(-1, 10, "after"), (0, 0, "limit"), (1.5, 10, "after")])
def test_a_bad_read_position_names_the_field(backend, after, limit, field):
    async def go(item_log):
        with pytest.raises(ValueError, match=field):
            await item_log.read(after, limit)
    run(backend.spec, go)


def test_read_all_sync_pages_through_everything(backend):
    run(backend.spec, lambda item_log: item_log.append([delete(f"d{j}") for j in range(25)]))
    item_log = open_item_log(backend.spec)
    try:
        got = item_log.read_all_sync()
        tail = item_log.read_all_sync(after=20)
    finally:
        asyncio.run(item_log.close())
    assert [r.seq for r in got] == list(range(1, 26))
    assert [r.item_id for r in tail] == [f"d{j}" for j in range(20, 25)]


def _assert_one_total_order(got: list[ItemRecord], batches: dict[str, list[int]], answers: list[int]) -> None:
    """Dense seqs 1..N; each writer's batch is contiguous, in its order, and ends at the answered seq."""
    assert [r.seq for r in got] == list(range(1, len(got) + 1))
    by_id = {r.item_id: r.seq for r in got}
    assert len(by_id) == len(got) == sum(map(sum, batches.values()))   # no duplicate, none missing
    ends = []
    for name, sizes in batches.items():
        for b, size in enumerate(sizes):
            seqs = [by_id[f"{name}-{b}-{k}"] for k in range(size)]
            assert seqs == list(range(seqs[0], seqs[0] + size))
            ends.append(seqs[-1])
    assert sorted(ends) == sorted(answers)


def test_two_clients_appending_concurrently_get_one_total_order(backend):
    sizes = {w: [1 + (b + i) % 3 for b in range(25)] for i, w in enumerate(["w0", "w1"])}

    async def writer(item_log: ItemLog, name: str) -> list[int]:
        out = []
        for b, size in enumerate(sizes[name]):
            out.append(await item_log.append([delete(f"{name}-{b}-{k}") for k in range(size)]))
        return out

    async def go():
        a, b = open_item_log(backend.spec), open_item_log(backend.spec)
        try:
            answers = await asyncio.gather(writer(a, "w0"), writer(b, "w1"))
            return answers, await a.read(0), await b.read(0)
        finally:
            await a.close()
            await b.close()
    answers, got_a, got_b = asyncio.run(go())
    assert got_a == got_b
    assert len(got_a) == sum(map(sum, sizes.values()))
    _assert_one_total_order(got_a, sizes, answers[0] + answers[1])


WRITER = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, sys.argv[1])
    from common.item_log import open_item_log
    from core.item_records import ItemOp, ItemRecord
    spec, name = sys.argv[2], sys.argv[3]
    async def main():
        item_log = open_item_log(spec)
        for b in range(20):
            print(await item_log.append([ItemRecord(ItemOp.DELETE, f"{name}-{b}-{k}") for k in range(2)]))
        await item_log.close()
    asyncio.run(main())
""")


def test_two_processes_appending_concurrently_get_one_total_order(backend):
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(REPO), backend.spec, name],
                              stdout=subprocess.PIPE, text=True) for name in ("p0", "p1")]
    answers = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        answers += [int(line) for line in out.split()]
    got = run(backend.spec, lambda item_log: item_log.read(0))
    assert len(got) == 80
    _assert_one_total_order(got, {"p0": [2] * 20, "p1": [2] * 20}, answers)


def test_a_new_log_object_sees_everything(backend):
    run(backend.spec, lambda item_log: item_log.append([upsert("a", 1), delete("b")]))
    got = run(backend.spec, lambda item_log: item_log.read(0))
    assert [(r.seq, r.op, r.item_id) for r in got] == [(1, ItemOp.UPSERT, "a"), (2, ItemOp.DELETE, "b")]
    assert got[0].vector.tobytes() == upsert("a", 1).vector.tobytes()
    assert run(backend.spec, lambda item_log: item_log.append([upsert("c")])) == 3


def test_a_bad_spec_names_the_field():
    for spec in ("sqlite:", "postgres://x", "items.db"):
        with pytest.raises(ValueError, match="item log"):
            open_item_log(spec)


# --- the store down -------------------------------------------------------------------------------

def test_sqlite_unwritable_path_is_unavailable(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    spec = f"sqlite:{tmp_path / 'a_file' / 'items.db'}"

    async def go(item_log):
        for call in (item_log.append([upsert("a")]), item_log.read(0), item_log.last_seq()):
            with pytest.raises(ItemLogUnavailable):
                await call
    run(spec, go)


def test_sqlite_locked_by_another_writer_is_unavailable_and_writes_nothing(tmp_path):
    path = tmp_path / "items.db"

    async def go():
        item_log = SqliteItemLog(path, busy_timeout_s=0.2)
        try:
            await item_log.append([upsert("before")])
            holder = sqlite3.connect(path, isolation_level=None)
            holder.execute("BEGIN EXCLUSIVE")   # a stuck writer elsewhere holds the file
            started = time.monotonic()
            with pytest.raises(ItemLogUnavailable):
                await item_log.append([upsert("a"), upsert("b")])
            waited = time.monotonic() - started
            holder.execute("ROLLBACK")
            holder.close()
            after = await item_log.append([upsert("after")])
            return waited, after, await item_log.read(0)
        finally:
            await item_log.close()
    waited, after, got = asyncio.run(go())
    assert waited < 5
    assert after == 2 and [r.item_id for r in got] == ["before", "after"]


def test_sqlite_clients_opening_a_new_file_at_once_all_get_in(tmp_path):
    """Switching a new file to WAL is refused at once ("database is locked", no busy wait) while
    another connection opens it: every client must still get in (once failed 1 run in 10)."""
    async def round_(path: Path) -> list[int]:
        logs = [SqliteItemLog(path) for _ in range(6)]
        try:
            return sorted(await asyncio.gather(*(lg.append([delete(f"x{k}")]) for k, lg in enumerate(logs))))
        finally:
            for lg in logs:
                await lg.close()
    for r in range(30):
        assert asyncio.run(round_(tmp_path / f"r{r}" / "items.db")) == [1, 2, 3, 4, 5, 6]


def test_sqlite_calls_do_not_block_the_event_loop(tmp_path):
    """A commit waiting on the write lock leaves the loop free (ticks keep coming)."""
    path = tmp_path / "items.db"

    async def go():
        item_log = SqliteItemLog(path, busy_timeout_s=0.5)
        await item_log.append([upsert("warm")])
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)
        ticker = asyncio.create_task(tick())
        with pytest.raises(ItemLogUnavailable):
            await item_log.append([upsert("a")])
        ticker.cancel()
        holder.execute("ROLLBACK")
        holder.close()
        await item_log.close()
        return ticks
    assert asyncio.run(go()) >= 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(port: int, folder: Path) -> subprocess.Popen:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is required"
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            assert proc.poll() is None, "redis-server exited"
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("redis-server did not start")


def test_redis_down_is_unavailable_and_the_log_resumes_whole(tmp_path):
    port = _free_port()
    proc = _start_redis(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"

    async def go():
        nonlocal proc
        item_log = open_item_log(url)
        try:
            await item_log.append([upsert("a", 1), upsert("b", 2)])
            proc.kill()   # SIGKILL: the server is gone mid-session
            proc.wait(10)
            for call in (item_log.append([upsert("lost")]), item_log.read(0), item_log.last_seq()):
                with pytest.raises(ItemLogUnavailable):
                    await call
            proc = _start_redis(port, tmp_path)   # back, from its fsynced append-only file
            after = await item_log.append([delete("a")])
            return after, await item_log.read(0)
        finally:
            await item_log.close()
    try:
        after, got = asyncio.run(go())
    finally:
        proc.kill()
        proc.wait(10)
    assert after == 3
    assert [(r.seq, r.item_id) for r in got] == [(1, "a"), (2, "b"), (3, "a")]


def test_redis_closed_port_is_unavailable():
    url = f"redis://127.0.0.1:{_free_port()}/0"

    async def go(item_log):
        for call in (item_log.append([upsert("a")]), item_log.read(0), item_log.last_seq()):
            with pytest.raises(ItemLogUnavailable):
                await call
    run(url, go)
    with pytest.raises(ItemLogUnavailable):
        open_item_log(url).read_all_sync()

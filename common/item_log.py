"""The item log: the one durable owner of online item state, shared by every replica.

An append-only, ordered log of ItemRecords (core/item_records.py). append() writes a whole batch
or nothing and gives each record the next position (`seq`, dense and strictly increasing across
every writer); read(after) returns the records after a position, in order. Index allocation is
derived from that order (core/item_overlay.py), so the log is all a replica needs after a restart.

Backends (same semantics, one test suite: tests/unit/test_item_log.py):
- sqlite:<path>  one machine; several processes may share the file. WAL + synchronous=FULL (a
  returned append survives a kill and a power cut); each append is one BEGIN IMMEDIATE ... COMMIT,
  which holds the file's write lock, so seqs (AUTOINCREMENT) are allocated and become visible in
  order with no gap. Blocking calls run on two threads of their own (one writer connection, one
  reader connection: a tail read never waits behind a commit's fsync), never on the event loop.
- redis://host:port/db  several machines: the Stream `fusionrec:{items}`, entry id `<seq>-0` chosen
  explicitly, so read(after) is `XRANGE key <after+1>-0 + COUNT limit`. One Lua script per batch
  checks everything, then XADDs every record and advances the counter `fusionrec:{items}:seq`;
  Redis runs a script without interleaving other clients, so a batch is whole and seqs are dense.
  Redis durability is the server's: run it with appendonly yes (appendfsync always for the
  guarantee SQLite gives).

An append that fails with ItemLogUnavailable wrote nothing, except when the connection broke
after the store received the batch (a timeout): then the batch is wholly in or wholly out, never
partly. Upserts and deletes are idempotent in effect, so a retry is harmless.
"""
from __future__ import annotations

import asyncio
import sqlite3
import threading
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np

from common.sqlite_wal import enable_wal
from core.item_records import ItemOp, ItemRecord

T = TypeVar("T")
Row = tuple[str, str, str, str, str, bytes | None]   # op, item_id, title, text, category, vector


class ItemLogUnavailable(RuntimeError):
    """The log's store cannot be reached: nothing was appended (callers answer UNAVAILABLE)."""


class ItemLog(ABC):
    @abstractmethod
    async def append(self, records: Sequence[ItemRecord]) -> int:
        """Append all records atomically (their `seq` is ignored and assigned); returns the last
        seq written (last_seq() for an empty batch). ValueError for a malformed record (nothing
        written); ItemLogUnavailable when the store is down (nothing appended)."""

    @abstractmethod
    async def read(self, after: int, limit: int = 10_000) -> list[ItemRecord]:
        """Records with seq > after, oldest first, at most `limit`. Raises ItemLogUnavailable."""

    @abstractmethod
    async def last_seq(self) -> int:
        """The newest position (0 for an empty log). Raises ItemLogUnavailable."""

    @abstractmethod
    async def close(self) -> None: ...

    def read_all_sync(self, after: int = 0) -> list[ItemRecord]:
        """Every record after `after`, for the offline build (no event loop there: do not call
        from inside a running loop)."""
        async def collect() -> list[ItemRecord]:
            out: list[ItemRecord] = []
            while True:
                batch = await self.read(out[-1].seq if out else after)
                if not batch:
                    return out
                out.extend(batch)
        return asyncio.run(collect())


def encode_records(records: Sequence[ItemRecord]) -> list[Row]:
    """Check every record, then encode it; ValueError names the first bad one by position, so a
    malformed batch is refused before anything is written."""
    rows: list[Row] = []
    for i, r in enumerate(records):
        try:
            op = ItemOp(r.op)
        except ValueError:
            raise ValueError(f"records[{i}].op: must be one of {[o.value for o in ItemOp]}") from None
        if not isinstance(r.item_id, str) or not r.item_id:
            raise ValueError(f"records[{i}].item_id: must be a non-empty string")
        for name in ("title", "text", "category"):
            if not isinstance(getattr(r, name), str):
                raise ValueError(f"records[{i}].{name}: must be a string")
        blob = None
        if op is ItemOp.UPSERT:
            if r.vector is None:
                raise ValueError(f"records[{i}].vector: an upsert needs its text vector")
            vector = np.asarray(r.vector, np.float32)
            if vector.ndim != 1 or not vector.size:
                raise ValueError(f"records[{i}].vector: must be a non-empty 1-d vector")
            if not np.isfinite(vector).all():
                raise ValueError(f"records[{i}].vector: must be finite")
            blob = vector.astype("<f4").tobytes()
        rows.append((op.value, r.item_id, r.title, r.text, r.category, blob))
    return rows


def decode_record(seq: int, op: str, item_id: str, title: str, text: str, category: str,
                  vector: bytes | None) -> ItemRecord:
    return ItemRecord(ItemOp(op), item_id, title, text, category,
                      None if vector is None else np.frombuffer(vector, "<f4").astype(np.float32), seq)


def _check_position(after: int, limit: int) -> None:
    if isinstance(after, bool) or not isinstance(after, (int, np.integer)) or after < 0:
        raise ValueError(f"after: must be an integer >= 0, got {after!r}")
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ValueError(f"limit: must be an integer >= 1, got {limit!r}")


class SqliteWorker:
    """One thread owning one SQLite connection: blocking calls leave the event loop, and the
    connection is only ever used by its thread. The connection is opened on first use and again
    after a failure to open, so a store that comes back is picked up without a restart."""

    def __init__(self, name: str, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._db: sqlite3.Connection | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._run, fn)

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            self._db = self._connect()
        return fn(self._db)

    def close(self) -> None:
        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None
        self._pool.submit(shut).result()
        self._pool.shutdown(wait=True)


class SqliteItemLog(ItemLog):
    _SCHEMA = (
        "CREATE TABLE IF NOT EXISTS item_log ("
        " seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL CHECK (op IN ('upsert', 'delete')),"
        " item_id TEXT NOT NULL CHECK (item_id <> ''), title TEXT NOT NULL, text TEXT NOT NULL,"
        " category TEXT NOT NULL, vector BLOB)"
    )
    _COLUMNS = "op, item_id, title, text, category, vector"

    def __init__(self, path: Path | str, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._writer = SqliteWorker("item-log-write", self._open)
        self._reader = SqliteWorker("item-log-read", self._open)
        self._closed = threading.Event()

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; append opens its own.
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        try:
            db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")   # other writers, briefly
            enable_wal(db, self.busy_timeout_s)   # persistent in the file; readers never block writers
            db.execute("PRAGMA synchronous=FULL")    # fsync the WAL at every commit
            # Under the write lock: a schema change from a stale snapshot would fail at once
            # (SQLITE_BUSY_SNAPSHOT, no busy wait) when another client created the table meanwhile.
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'item_log'").fetchone():
                db.execute("BEGIN IMMEDIATE")
                db.execute(self._SCHEMA)
                db.execute("COMMIT")
        except BaseException:
            db.close()
            raise
        return db

    async def _call(self, worker: SqliteWorker, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed.is_set():
            raise ItemLogUnavailable("item log: closed")
        try:
            return await worker.call(fn)
        except (sqlite3.Error, OSError) as e:   # locked past busy_timeout, unwritable, disk full, corrupt
            raise ItemLogUnavailable(f"item log: sqlite {type(e).__name__}: {e}") from None

    async def append(self, records: Sequence[ItemRecord]) -> int:
        rows = encode_records(records)
        if not rows:
            return await self.last_seq()

        def write(db: sqlite3.Connection) -> int:
            db.execute("BEGIN IMMEDIATE")   # the write lock now: seqs are contiguous and commit in order
            try:
                db.executemany(f"INSERT INTO item_log ({self._COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", rows)
                last = db.execute("SELECT last_insert_rowid()").fetchone()[0]
                db.execute("COMMIT")        # durable (synchronous=FULL) before the caller hears of it
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return int(last)
        return await self._call(self._writer, write)

    async def read(self, after: int, limit: int = 10_000) -> list[ItemRecord]:
        _check_position(after, limit)

        def select(db: sqlite3.Connection) -> list[ItemRecord]:
            rows = db.execute(f"SELECT seq, {self._COLUMNS} FROM item_log WHERE seq > ? ORDER BY seq LIMIT ?",
                              (int(after), int(limit))).fetchall()
            return [decode_record(*row) for row in rows]
        return await self._call(self._reader, select)

    async def last_seq(self) -> int:
        return await self._call(
            self._reader, lambda db: int(db.execute("SELECT coalesce(max(seq), 0) FROM item_log").fetchone()[0]))

    async def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            await asyncio.to_thread(self._writer.close)
            await asyncio.to_thread(self._reader.close)


def open_item_log(spec: str) -> ItemLog:
    """sqlite:<path> or redis://host:port/db (also rediss://, unix://): the user-state store's form."""
    if not isinstance(spec, str):
        raise ValueError("item log: expected sqlite:<path> or redis://host:port/db")
    if spec.startswith("sqlite:"):
        path = spec[len("sqlite:"):]
        if not path:
            raise ValueError("item log: sqlite: needs a path, e.g. sqlite:run/items.db")
        return SqliteItemLog(Path(path))
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisItemLog(spec)
    raise ValueError(f"item log: expected sqlite:<path> or redis://host:port/db, got {spec!r}")


# Check, then write: nothing is written unless the keys hold the right types, so the script cannot
# fail half-way (Redis does not roll back a script's earlier writes). The next seq is one past the
# larger of the counter and the stream's newest entry (a lost counter cannot reuse a position).
# KEYS: stream, counter. ARGV: 6 values per record (op, item_id, title, text, category, vector).
_APPEND_LUA = """
local stream, counter = KEYS[1], KEYS[2]
local kind = redis.call('TYPE', stream)['ok']
if kind ~= 'stream' and kind ~= 'none' then
  return redis.error_reply('item log: the stream key holds a ' .. kind)
end
kind = redis.call('TYPE', counter)['ok']
if kind ~= 'string' and kind ~= 'none' then
  return redis.error_reply('item log: the counter key holds a ' .. kind)
end
local last = tonumber(redis.call('GET', counter) or '0')
if last == nil then return redis.error_reply('item log: the counter is not a number') end
local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
if #newest > 0 then
  local s = tonumber(string.match(newest[1][1], '^(%d+)-'))
  if s > last then last = s end
end
local n = #ARGV / 6
for i = 0, n - 1 do
  local a = i * 6
  redis.call('XADD', stream, string.format('%d-0', last + i + 1), 'op', ARGV[a + 1], 'item_id', ARGV[a + 2],
             'title', ARGV[a + 3], 'text', ARGV[a + 4], 'category', ARGV[a + 5], 'vector', ARGV[a + 6])
end
redis.call('SET', counter, string.format('%d', last + n))
return last + n
"""


class RedisItemLog(ItemLog):
    # One hash tag: both keys live in one slot, so the append script also runs on a Redis Cluster.
    STREAM = "fusionrec:{items}"
    COUNTER = "fusionrec:{items}:seq"

    def __init__(self, url: str, timeout_s: float = 2.0, max_connections: int = 16) -> None:
        import redis.asyncio as redis   # only deployments that use Redis need the package
        self.url = url
        self.timeout_s = timeout_s
        # Bytes in and out (vectors are raw float32); timeouts: a dead Redis fails fast.
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout_s,
            socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.redis = redis.Redis.from_pool(pool)
        self._append_script = self.redis.register_script(_APPEND_LUA)   # EVALSHA, reloaded on NOSCRIPT

    @staticmethod
    def _unavailable(e: BaseException) -> ItemLogUnavailable:
        return ItemLogUnavailable(f"item log: redis {type(e).__name__}")

    async def append(self, records: Sequence[ItemRecord]) -> int:
        rows = encode_records(records)
        if not rows:
            return await self.last_seq()
        args: list[str | bytes] = []
        for op, item_id, title, text, category, blob in rows:
            args += [op, item_id, title, text, category, blob or b""]
        try:
            return int(await self._append_script(keys=[self.STREAM, self.COUNTER], args=args))
        except (_redis_errors() + (OSError, asyncio.TimeoutError)) as e:
            raise self._unavailable(e) from None

    async def read(self, after: int, limit: int = 10_000) -> list[ItemRecord]:
        _check_position(after, limit)
        try:
            entries = await self.redis.xrange(self.STREAM, f"{int(after) + 1}-0", "+", count=int(limit))
        except (_redis_errors() + (OSError, asyncio.TimeoutError)) as e:
            raise self._unavailable(e) from None
        return [_decode_entry(entry_id, fields) for entry_id, fields in entries]

    async def last_seq(self) -> int:
        try:
            newest = await self.redis.xrevrange(self.STREAM, "+", "-", count=1)
        except (_redis_errors() + (OSError, asyncio.TimeoutError)) as e:
            raise self._unavailable(e) from None
        return _seq_of(newest[0][0]) if newest else 0

    def read_all_sync(self, after: int = 0) -> list[ItemRecord]:
        # The synchronous client: the asyncio pool's connections belong to one event loop.
        import redis
        out: list[ItemRecord] = []
        try:
            with redis.Redis.from_url(self.url, socket_timeout=self.timeout_s,
                                      socket_connect_timeout=self.timeout_s) as client:
                while True:
                    start = out[-1].seq if out else after
                    entries = client.xrange(self.STREAM, f"{start + 1}-0", "+", count=10_000)
                    if not entries:
                        return out
                    out += [_decode_entry(entry_id, fields) for entry_id, fields in entries]
        except (redis.RedisError, OSError) as e:
            raise self._unavailable(e) from None

    async def close(self) -> None:
        await self.redis.aclose()


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis
    return (redis.RedisError,)


def _seq_of(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


def _decode_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> ItemRecord:
    text = {k.decode(): v.decode() for k, v in fields.items() if k != b"vector"}
    blob = fields.get(b"vector") or None   # b"" for a delete
    return decode_record(_seq_of(entry_id), text["op"], text["item_id"], text["title"], text["text"],
                         text["category"], blob)

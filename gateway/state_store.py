"""Durable user state: recent history per user, one async interface, two real backends.

Semantics (both backends, one test suite): recent() is the user's item ids oldest first, at most
`cap`, one entry per item at its latest timestamp (a re-clicked item moves to the end; an older,
late-arriving event never moves it back), entries older than `ttl_s` dropped. Ties in time are
ordered by item id (byte order) in both backends. add() applies a whole batch or none of it.

- SqliteUserStateStore: embedded default for one machine. WAL mode + synchronous=FULL: a commit
  fsyncs the WAL, so an add() that returned survives a process kill and a power cut. Writes run on
  one writer thread (the fsync, ~4 ms on a VM disk, must not stall the event loop), which commits
  whatever batches queued up meanwhile in one transaction: one fsync for many callers under load.
  Atomicity: each batch runs inside its own SAVEPOINT (ROLLBACK TO on error: that batch alone is
  undone), and callers are answered only after the COMMIT. Reads run inline on the loop on their
  own connection (~0.1 ms; WAL readers never wait for the writer).
- RedisUserStateStore: shared by several gateway replicas. One sorted set per user, key
  `fusionrec:h:<user_id>`, member = item id, score = timestamp. A batch is one Lua script: it checks
  every key and score first and writes only if all are good, and Redis runs a script without
  interleaving other clients (MULTI/EXEC would not do: it does not roll back a failed command).
  TTL: a score cutoff on read and write, plus EXPIRE so idle users' keys go away.

Erasing a user (DeleteUserData): erase() removes every recent-history entry of the user and sets
an erased marker with its time, atomically (SQLite: one transaction on the writer thread, ordered
with the adds queued before it; Redis: one Lua script). The marker stays: readers see it with the
history (recent_state) and treat the user as unknown to the build (its user_history.npz and CF
vector predate the erase). add() keeps no event stamped at or before the user's erase time, so
the result does not depend on whether an add racing the erase lands first (Redis gives no order
between two clients' commands); events stamped after the erase are history again.

User ids are stored, never logged: error messages name positions (`events[3].item_id`), not values.
"""
from __future__ import annotations

import asyncio
import math
import queue
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from common.sqlite_wal import enable_wal

Event = tuple[str, str, float]   # (user_id, item_id, unix timestamp)


@dataclass(frozen=True)
class UserRecent:
    """One read of a user's state: recent history, and when their data was erased (None: never)."""
    items: list[str]
    erased_at: float | None = None


class UserStateStore(ABC):
    def __init__(self, cap: int = 100, ttl_s: float | None = None) -> None:
        if cap < 1:
            raise ValueError(f"cap: must be >= 1, got {cap}")
        if ttl_s is not None and not ttl_s > 0:
            raise ValueError(f"ttl_s: must be > 0 or None, got {ttl_s}")
        self.cap = cap
        self.ttl_s = ttl_s

    def _cutoff(self) -> float:
        """Oldest timestamp still kept (-inf without a TTL)."""
        return time.time() - self.ttl_s if self.ttl_s else -math.inf

    @staticmethod
    def _check(events: Sequence[Event]) -> None:
        """Refuse a batch with any malformed event before anything is written."""
        for i, (user, item, ts) in enumerate(events):
            if not isinstance(user, str) or not user:
                raise ValueError(f"events[{i}].user_id: must be a non-empty string")
            if not isinstance(item, str) or not item:
                raise ValueError(f"events[{i}].item_id: must be a non-empty string")
            if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
                raise ValueError(f"events[{i}].timestamp: must be a finite number")

    @abstractmethod
    async def recent(self, user_id: str) -> list[str]:
        """Item ids, oldest first, at most cap, deduped, none older than ttl_s."""

    @abstractmethod
    async def add(self, events: Sequence[Event]) -> None:
        """Apply a whole batch atomically: all events or none (ValueError for a malformed one)."""

    @abstractmethod
    async def remove_items(self, item_ids: Sequence[str]) -> None:
        """Forget items deleted from the catalog (readers filter deleted items anyway)."""

    @abstractmethod
    async def recent_state(self, user_id: str) -> UserRecent:
        """recent() and the erased marker, in one read."""

    @abstractmethod
    async def erase(self, user_id: str, when: float | None = None) -> int:
        """Remove all of the user's history and mark them erased at `when` (now by default), in one
        atomic step; returns the history entries removed. Idempotent (a second erase returns 0)."""

    @abstractmethod
    async def close(self) -> None: ...


class SqliteUserStateStore(UserStateStore):
    _SCHEMA = (
        "CREATE TABLE IF NOT EXISTS history ("
        " user_id TEXT NOT NULL CHECK (user_id <> ''), item_id TEXT NOT NULL CHECK (item_id <> ''),"
        " ts REAL NOT NULL, PRIMARY KEY (user_id, item_id)) WITHOUT ROWID",
        "CREATE INDEX IF NOT EXISTS history_by_time ON history (user_id, ts)",
        "CREATE TABLE IF NOT EXISTS erased (user_id TEXT PRIMARY KEY NOT NULL, ts REAL NOT NULL) WITHOUT ROWID",
    )
    MAX_GROUP = 256   # write requests committed together under load (one fsync for all)

    def __init__(self, path: Path, cap: int = 100, ttl_s: float | None = None) -> None:
        super().__init__(cap, ttl_s)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._writer = self._connect(path)
        enable_wal(self._writer, timeout_s=2.0)   # persistent in the file; retried: see common/sqlite_wal
        for statement in self._SCHEMA:
            self._writer.execute(statement)
        self._reader = self._connect(path)
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write_loop, name="user-state-sqlite", daemon=True)
        self._thread.start()

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; the writer opens its own.
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA synchronous=FULL")   # fsync the WAL at every commit
        db.execute("PRAGMA busy_timeout=2000")  # another process holding the write lock briefly
        return db

    async def recent(self, user_id: str) -> list[str]:
        return self._recent(user_id)

    async def recent_state(self, user_id: str) -> UserRecent:
        # One read transaction: the history and the marker from the same snapshot.
        self._reader.execute("BEGIN")
        try:
            items = self._recent(user_id)
            row = self._reader.execute("SELECT ts FROM erased WHERE user_id = ?", (user_id,)).fetchone()
        finally:
            self._reader.execute("COMMIT")
        return UserRecent(items, None if row is None else float(row[0]))

    async def erase(self, user_id: str, when: float | None = None) -> int:
        self._check([(user_id, "-", 0.0)])
        return await self._submit(self._erase, [user_id, time.time() if when is None else float(when)])

    def _recent(self, user_id: str) -> list[str]:
        # Inline: an indexed range read of <= cap rows, ~0.1 ms from the page cache.
        rows = self._reader.execute(
            "SELECT item_id FROM (SELECT item_id, ts FROM history WHERE user_id = ? AND ts >= ? "
            "ORDER BY ts DESC, item_id DESC LIMIT ?) ORDER BY ts, item_id",
            (user_id, self._cutoff(), self.cap)).fetchall()
        return [r[0] for r in rows]

    async def add(self, events: Sequence[Event]) -> None:
        self._check(events)
        if events:
            await self._submit(self._add, list(events))

    async def remove_items(self, item_ids: Sequence[str]) -> None:
        if item_ids:
            await self._submit(self._remove, list(item_ids))

    async def close(self) -> None:
        self._queue.put(None)   # the writer finishes what was queued first
        await asyncio.to_thread(self._thread.join)
        self._reader.close()
        self._writer.close()

    def _submit(self, apply: Callable[[list], Any], arg: list) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._queue.put(_Write(apply, arg, loop, done))
        return done

    def _write_loop(self) -> None:
        """Group commit: take every queued write (up to MAX_GROUP), apply each inside its own
        SAVEPOINT (a failing one rolls back alone), COMMIT once, then acknowledge them all."""
        db, stop = self._writer, False
        while not stop:
            group = [self._queue.get()]
            while len(group) < self.MAX_GROUP and not self._queue.empty():
                group.append(self._queue.get())
            if None in group:
                stop, group = True, [w for w in group if w is not None]
            if not group:
                continue
            errors: list[BaseException | None] = []
            results: list[Any] = []
            try:
                db.execute("BEGIN IMMEDIATE")
                for write in group:
                    db.execute("SAVEPOINT batch")
                    try:
                        results.append(write.apply(write.arg))
                        db.execute("RELEASE batch")
                        errors.append(None)
                    except Exception as e:  # noqa: BLE001 - handed to that batch's caller
                        db.execute("ROLLBACK TO batch")
                        db.execute("RELEASE batch")
                        results.append(None)
                        errors.append(e)
                db.execute("COMMIT")   # durable (synchronous=FULL) before anyone is told "done"
            except Exception as e:  # noqa: BLE001 - the whole group failed: none of it applied
                if db.in_transaction:
                    db.execute("ROLLBACK")
                errors, results = [e] * len(group), [None] * len(group)
            for write, error, result in zip(group, errors, results):
                try:
                    write.loop.call_soon_threadsafe(_settle, write.done, error, result)
                except RuntimeError:   # that caller's event loop is gone: nobody to tell
                    pass

    def _add(self, events: list[Event]) -> None:
        db, cutoff = self._writer, self._cutoff()
        db.executemany(
            "INSERT INTO history (user_id, item_id, ts) VALUES (?, ?, ?) "
            "ON CONFLICT (user_id, item_id) DO UPDATE SET ts = max(ts, excluded.ts)", events)
        for user in dict.fromkeys(e[0] for e in events):   # trim each touched user: erase, TTL, then cap
            db.execute("DELETE FROM history WHERE user_id = ?1 AND (ts < ?2 "
                       "OR ts <= (SELECT ts FROM erased WHERE user_id = ?1) OR item_id IN ("
                       "SELECT item_id FROM history WHERE user_id = ?1 "
                       "ORDER BY ts DESC, item_id DESC LIMIT -1 OFFSET ?3))", (user, cutoff, self.cap))

    def _erase(self, arg: list) -> int:
        user_id, when = arg
        removed = self._writer.execute("DELETE FROM history WHERE user_id = ?", (user_id,)).rowcount
        self._writer.execute("INSERT INTO erased (user_id, ts) VALUES (?, ?) "
                             "ON CONFLICT (user_id) DO UPDATE SET ts = max(ts, excluded.ts)", (user_id, when))
        return removed

    def _remove(self, item_ids: list[str]) -> None:
        # A table scan per chunk (no index on item_id: deletes are rare, adds are not).
        for start in range(0, len(item_ids), 500):   # stay under SQLite's bound-parameter limit
            chunk = item_ids[start:start + 500]
            self._writer.execute(f"DELETE FROM history WHERE item_id IN ({','.join('?' * len(chunk))})", chunk)


@dataclass
class _Write:
    apply: Callable[[list], Any]
    arg: list
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[Any]


def _settle(done: asyncio.Future[Any], error: BaseException | None, result: Any = None) -> None:
    if done.cancelled():   # the caller gave up; the write itself stands (or not) all the same
        return
    if error is None:
        done.set_result(result)
    else:
        done.set_exception(error)


# Check everything, then write: a script runs without interleaving, and nothing is written unless
# every key and score is good, so a batch is all or nothing. Errors name positions, not users.
# KEYS: one history key per user, then (same order) each user's erase-marker key. ARGV: cap,
# cutoff ('-inf' = no TTL), expire seconds (0 = none), then per user: n, then n (score, member) pairs.
_ADD_LUA = """
local cap, cutoff, expire = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local users = #KEYS / 2
local pos = 4
for i = 1, users do
  local key = KEYS[i]
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'zset' and kind ~= 'none' then
    return redis.error_reply('state: key ' .. i .. ' of the batch holds a ' .. kind .. ', not a zset')
  end
  local n = tonumber(ARGV[pos])
  for j = 1, n do
    local s = tonumber(ARGV[pos + 2 * j - 1])
    if s == nil or s ~= s or s == math.huge or s == -math.huge then
      return redis.error_reply('state: bad score in the batch')
    end
  end
  pos = pos + 1 + 2 * n
end
pos = 4
for i = 1, users do
  local key = KEYS[i]
  local n = tonumber(ARGV[pos])
  for first = 1, n, 500 do            -- chunks keep unpack() under Lua's stack limit
    local args = {}
    for j = first, math.min(n, first + 499) do
      args[#args + 1] = ARGV[pos + 2 * j - 1]
      args[#args + 1] = ARGV[pos + 2 * j]
    end
    redis.call('ZADD', key, 'GT', unpack(args))   -- GT: a re-click moves the item, an older event does not
  end
  local erased = redis.call('GET', KEYS[users + i])   -- nothing stamped at or before an erase stays
  if erased then redis.call('ZREMRANGEBYSCORE', key, '-inf', erased) end
  if cutoff ~= '-inf' then redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. cutoff) end
  redis.call('ZREMRANGEBYRANK', key, 0, -cap - 1)
  if expire > 0 then redis.call('EXPIRE', key, expire) end
  pos = pos + 1 + 2 * n
end
return users
"""

# Erase one user: count and drop the history, set the marker (the later time wins), in one script.
# KEYS: history key, marker key. ARGV: erase time.
_ERASE_LUA = """
local kind = redis.call('TYPE', KEYS[1])['ok']
local removed = 0
if kind == 'zset' then removed = redis.call('ZCARD', KEYS[1]) end
redis.call('DEL', KEYS[1])
local old = tonumber(redis.call('GET', KEYS[2]) or '-inf')
if old == nil or tonumber(ARGV[1]) > old then redis.call('SET', KEYS[2], ARGV[1]) end
return removed
"""


class RedisUserStateStore(UserStateStore):
    PREFIX = "fusionrec:h:"
    ERASED_PREFIX = "fusionrec:erased:"   # outside PREFIX: remove_items' SCAN never touches a marker

    def __init__(self, url: str, cap: int = 100, ttl_s: float | None = None,
                 timeout_s: float = 1.0, max_connections: int = 64) -> None:
        super().__init__(cap, ttl_s)
        import redis.asyncio as redis   # only deployments that use Redis need the package
        # A blocking pool: a burst beyond max_connections waits for a free connection instead of
        # failing ("Too many connections"). Timeouts: a dead Redis fails fast (the caller
        # degrades) instead of hanging a request. Options in the URL (?socket_timeout=...) win.
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout_s, decode_responses=True,
            socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.redis = redis.Redis.from_pool(pool)   # the client owns the pool: aclose() closes it
        self._add_script = self.redis.register_script(_ADD_LUA)   # EVALSHA, reloaded on NOSCRIPT
        self._erase_script = self.redis.register_script(_ERASE_LUA)

    def _range_args(self, user_id: str) -> tuple[tuple, dict]:
        cutoff = "-inf" if self.ttl_s is None else repr(self._cutoff())
        return (self.PREFIX + user_id, "+inf", cutoff), dict(desc=True, byscore=True, offset=0, num=self.cap)

    async def recent(self, user_id: str) -> list[str]:
        args, kwargs = self._range_args(user_id)
        return (await self.redis.zrange(*args, **kwargs))[::-1]

    async def recent_state(self, user_id: str) -> UserRecent:
        args, kwargs = self._range_args(user_id)
        async with self.redis.pipeline(transaction=True) as pipe:   # one round trip, one snapshot
            pipe.zrange(*args, **kwargs)
            pipe.get(self.ERASED_PREFIX + user_id)
            newest, marker = await pipe.execute()
        return UserRecent(newest[::-1], None if marker is None else float(marker))

    async def erase(self, user_id: str, when: float | None = None) -> int:
        self._check([(user_id, "-", 0.0)])
        when = time.time() if when is None else float(when)
        return int(await self._erase_script(keys=[self.PREFIX + user_id, self.ERASED_PREFIX + user_id],
                                            args=[repr(when)]))

    async def add(self, events: Sequence[Event]) -> None:
        self._check(events)
        if not events:
            return
        by_user: dict[str, dict[str, float]] = defaultdict(dict)
        for user, item, ts in events:
            by_user[user][item] = max(float(ts), by_user[user].get(item, -math.inf))
        args: list[str | int] = [self.cap, "-inf" if self.ttl_s is None else repr(self._cutoff()),
                                 math.ceil(self.ttl_s) + 1 if self.ttl_s else 0]
        for items in by_user.values():
            args.append(len(items))
            for item, ts in items.items():
                args += [repr(ts), item]
        await self._add_script(keys=[*(self.PREFIX + u for u in by_user), *(self.ERASED_PREFIX + u for u in by_user)],
                               args=args)

    async def remove_items(self, item_ids: Sequence[str]) -> None:
        # Eager but not atomic across users: SCAN every history key, ZREM per page of keys.
        if not item_ids:
            return
        cursor = 0
        while True:
            cursor, keys = await self.redis.scan(cursor, match=self.PREFIX + "*", count=1000)
            if keys:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.zrem(key, *item_ids)
                    await pipe.execute()
            if cursor == 0:
                return

    async def close(self) -> None:
        await self.redis.aclose()


def open_store(spec: str, cap: int = 100, ttl_s: float | None = None) -> UserStateStore:
    """'sqlite:<path>' or 'redis://host:port/db' (also rediss://, unix://)."""
    if spec.startswith("sqlite:"):
        path = spec[len("sqlite:"):]
        if not path:
            raise ValueError("state: sqlite: needs a path, e.g. sqlite:run/state.db")
        return SqliteUserStateStore(Path(path), cap, ttl_s)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisUserStateStore(spec, cap, ttl_s)
    raise ValueError(f"state: expected sqlite:<path> or redis://host:port/db, got {spec!r}")

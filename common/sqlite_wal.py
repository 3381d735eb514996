"""SQLite in WAL mode, shared by the stores that several processes open on one file."""
from __future__ import annotations

import sqlite3
import time


def enable_wal(db: sqlite3.Connection, timeout_s: float) -> None:
    """Switch the file to WAL. The switch takes an exclusive lock and SQLite answers "database is
    locked" at once, without its busy handler, when another connection opens the new file at the
    same moment: retry until the timeout (a file already in WAL answers at once)."""
    deadline = time.monotonic() + timeout_s
    while db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        try:
            db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)

"""Durable append-only event log, readable by the next offline build.

One CSV file per UTC day (`events-YYYYMMDD.csv`, by the time of writing) in the generic dataset's
interactions.csv format (`user_id,item_id,timestamp,event,value`); `export()` joins the days into
one interactions.csv for `generic:` loading. append() writes a whole batch with one write() and
fdatasyncs before returning: an acknowledged batch survives a kill of the process (and a power cut)
right after. One writer process per folder (several gateway replicas need one folder each).

Erasing a user: append_tombstone(user_id) writes one row `user_id,,<time>,erase,0` (fsynced like a
batch). export() drops every event of that user logged before their last tombstone (log order:
day files in order, rows in order; not the event timestamps, which clients set) and the tombstone
rows themselves, so the next build never sees the erased events; events logged after it are kept.
The raw day files keep the rows until they are deleted (retention): only export() reads them.

Crash recovery: a batch torn by a crash mid-write was never acknowledged; the first append to a file
in a process cuts such a partial last line off, so it cannot glue onto the next batch's first row.
"""
from __future__ import annotations

import csv
import io
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from core.limits import EVENT_FUTURE_SKEW_S

HEADER = "user_id,item_id,timestamp,event,value\n"
TOMBSTONE = "erase"   # the event column of a tombstone row (not an event type the API accepts)
FUTURE_SKEW_S = EVENT_FUTURE_SKEW_S   # an accepted event may be stamped this far ahead of its logging


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    type: str          # click, purchase, add_to_cart, like, impression (the loader's event names)
    timestamp: float   # unix seconds
    value: float = 1.0


def _fsync_dir(folder: Path) -> None:
    """Make a new file's directory entry durable too."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode(events: Sequence[Event]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for i, e in enumerate(events):
        for name in ("user_id", "item_id", "type"):
            if any(c in getattr(e, name) for c in "\r\n"):   # one record per line: recovery relies on it
                raise ValueError(f"events[{i}].{name}: must not contain line breaks")
        writer.writerow((e.user_id, e.item_id, f"{e.timestamp:.3f}", e.type, repr(float(e.value))))
    return buffer.getvalue().encode("utf-8")


class EventLog:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()   # append() is called from worker threads
        self._recovered: set[Path] = set()

    def path_for(self, when: float) -> Path:
        return self.folder / f"events-{time.strftime('%Y%m%d', time.gmtime(when))}.csv"

    def append(self, events: Sequence[Event]) -> None:
        """Write the batch and fsync; returns only once it is durable. Blocking: call it off the loop."""
        if not events:
            return
        data = _encode(events)   # a bad event refuses the batch before anything is written
        with self._lock:
            path = self.path_for(time.time())
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                created = path not in self._recovered and self._recover(fd, path)
                if os.fstat(fd).st_size == 0:   # new, or left empty by a crash: header first
                    data = HEADER.encode() + data
                os.write(fd, data)   # one write: batches never interleave
                os.fdatasync(fd)
            finally:
                os.close(fd)
            if created:
                _fsync_dir(self.folder)

    def append_tombstone(self, user_id: str, when: float | None = None) -> None:
        """Mark every earlier event of the user as erased for export(); durable when it returns.
        Blocking: call it off the loop."""
        self.append([Event(user_id, "", TOMBSTONE, time.time() if when is None else when, 0.0)])

    def _recover(self, fd: int, path: Path) -> bool:
        """Cut a torn last line (a crash mid-write). True when the file is new to this process."""
        self._recovered.add(path)
        size = os.fstat(fd).st_size
        if size == 0:
            return True
        tail = os.pread(fd, min(size, 1 << 16), max(0, size - (1 << 16)))
        if tail.endswith(b"\n"):
            return False
        cut = tail.rfind(b"\n")
        if cut >= 0 or len(tail) == size:
            os.ftruncate(fd, size - len(tail) + cut + 1)   # cut == -1: the whole file was torn
        else:   # no line break in 64 KiB: never cut acknowledged rows, just end the odd line
            os.write(fd, b"\n")
        os.fsync(fd)
        return False

    def files(self) -> list[Path]:
        """The log's files, oldest day first."""
        return sorted(self.folder.glob("events-*.csv"))

    def _lines(self):
        """(position, line, parsed row) of every complete row, in log order."""
        position = 0
        for file in self.files():
            with open(file, encoding="utf-8", newline="") as f:
                first = f.readline()
                if not first:   # created, then a crash before the first write
                    continue
                if first != HEADER:
                    raise ValueError(f"{file}: not an event log file (header)")
                for line in f:
                    if line.endswith("\n"):   # skip a torn last line the writer has not cut yet
                        position += 1
                        yield position, line, next(csv.reader([line]))

    def tombstones(self) -> dict[str, tuple[int, float]]:
        """user id -> (log position, time) of their last tombstone."""
        return {row[0]: (position, float(row[2])) for position, _, row in self._lines()
                if len(row) >= 4 and row[3] == TOMBSTONE}

    def export(self, dest: Path) -> int:
        """This folder alone as one interactions.csv (see export_event_logs)."""
        return export_event_logs([self.folder], dest)


def export_event_logs(folders: Sequence[Path], dest: Path) -> int:
    """Join every day of every gateway's log folder into one interactions.csv at dest (one header),
    less the events of erased users; returns the rows written.

    A tombstone erases, in its own folder, the user's events logged before it (log order); in the
    other folders (other gateways, whose order cannot be compared) the user's events whose
    timestamp is at most the tombstone's time plus the accepted clock skew, i.e. every event about
    the time before the erase. Two passes: memory grows with the erased users, not with the logs."""
    logs = [EventLog(f) for f in folders]
    erased = [log.tombstones() for log in logs]
    cutoff: dict[str, float] = {}   # user -> latest tombstone time over all folders
    for marks in erased:
        for user, (_, when) in marks.items():
            cutoff[user] = max(cutoff.get(user, when), when)
    rows = 0
    with open(dest, "w", encoding="utf-8", newline="") as out:
        out.write(HEADER)
        for log, own in zip(logs, erased):
            for position, line, row in log._lines():
                if len(row) < 4 or row[3] == TOMBSTONE:
                    continue
                user = row[0]
                if own.get(user, (0, 0.0))[0] > position:
                    continue
                if user in cutoff and user not in own and float(row[2]) <= cutoff[user] + FUTURE_SKEW_S:
                    continue
                out.write(line)
                rows += 1
    return rows

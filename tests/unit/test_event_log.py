"""The durable event log: order, durability against SIGKILL, torn-tail recovery, and loading
through the generic dataset loader as interactions."""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gateway.event_log import HEADER, Event, EventLog
from offline.datasets.generic import load_generic

REPO = Path(__file__).resolve().parents[2]
T0 = 1.7e9


def rows(log: EventLog) -> list[list[str]]:
    out = []
    for file in log.files():
        with open(file, newline="") as f:
            reader = csv.reader(f)
            assert next(reader) == HEADER.strip().split(",")
            out += list(reader)
    return out


def test_batches_read_back_in_order(tmp_path):
    log = EventLog(tmp_path / "events")
    log.append([Event("u1", "a", "click", T0), Event("u1", "b", "purchase", T0 + 1, 3.0)])
    log.append([Event("u2", "a", "click", T0 + 2), Event('odd,"user"', "b", "like", T0 + 3.25, 0.5)])
    log.append([])
    assert len(log.files()) == 1
    assert rows(log) == [["u1", "a", "1700000000.000", "click", "1.0"],
                         ["u1", "b", "1700000001.000", "purchase", "3.0"],
                         ["u2", "a", "1700000002.000", "click", "1.0"],
                         ['odd,"user"', "b", "1700000003.250", "like", "0.5"]]


def test_a_new_log_object_appends_to_the_same_file(tmp_path):
    EventLog(tmp_path).append([Event("u", "a", "click", T0)])
    EventLog(tmp_path).append([Event("u", "b", "click", T0 + 1)])
    assert [r[1] for r in rows(EventLog(tmp_path))] == ["a", "b"]


def test_the_log_loads_through_the_generic_loader(tmp_path):
    log = EventLog(tmp_path / "events")
    log.append([Event("u1", "a", "click", T0), Event("u1", "b", "purchase", T0 + 1),
                Event("u2", "a", "impression", T0 + 2), Event("u2", "b", "add_to_cart", T0 + 3)])
    log.append([Event("u2", "a", "like", T0 + 4)])
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "items.jsonl").write_text("".join(json.dumps({"id": i, "title": f"item {i}"}) + "\n" for i in "ab"))
    assert log.export(folder / "interactions.csv") == 5
    ds = load_generic(folder)
    assert not ds.report.malformed
    got = {(u, i): (int(t), float(v)) for u, i, t, v in zip(ds.users, ds.item_ids, ds.timestamps, ds.values)}
    assert got == {("u1", "a"): (T0, 1.0), ("u1", "b"): (T0 + 1, 3.0),   # loader weights: purchase 3
                   ("u2", "b"): (T0 + 3, 2.0), ("u2", "a"): (T0 + 4, 1.0)}   # impression dropped


def test_an_acknowledged_batch_survives_sigkill(tmp_path):
    code = textwrap.dedent("""
        import sys, time
        from gateway.event_log import Event, EventLog
        EventLog(sys.argv[1]).append([Event("u", "i%d" % j, "click", 1.7e9 + j) for j in range(100)])
        print("acked", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "events")],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "acked"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert [r[1] for r in rows(EventLog(tmp_path / "events"))] == [f"i{j}" for j in range(100)]


def test_a_torn_tail_from_a_crash_is_cut_before_the_next_batch(tmp_path):
    log = EventLog(tmp_path)
    log.append([Event("u", "a", "click", T0)])
    with open(log.files()[0], "a") as f:
        f.write("u,b,17000")   # a batch torn mid-write: never acknowledged
    later = EventLog(tmp_path)   # the restarted process
    assert later.export(tmp_path / "before.csv") == 1   # export skips the torn line too
    later.append([Event("u", "c", "click", T0 + 2)])
    assert [r[1:3] for r in rows(later)] == [["a", "1700000000.000"], ["c", "1700000002.000"]]


def test_a_file_torn_before_its_header_is_complete_starts_over(tmp_path):
    log = EventLog(tmp_path)
    log.path_for(time.time()).write_text("user_id,item_")
    log.append([Event("u", "a", "click", T0)])
    assert rows(log) == [["u", "a", "1700000000.000", "click", "1.0"]]


def test_a_line_break_in_a_field_refuses_the_batch(tmp_path):
    log = EventLog(tmp_path)
    with pytest.raises(ValueError, match=r"events\[1\]\.user_id"):
        log.append([Event("u", "a", "click", T0), Event("u\nv", "a", "click", T0)])
    assert log.files() == []


def test_a_tombstone_drops_the_users_earlier_events_from_the_export(tmp_path):
    from gateway.event_log import TOMBSTONE
    log = EventLog(tmp_path / "events")
    log.append([Event("gone", "a", "click", T0), Event("kept", "a", "click", T0)])
    log.append_tombstone("gone", when=T0 + 10)
    log.append([Event("gone", "b", "click", T0 + 20)])
    log.append_tombstone("other-never-logged", when=T0 + 30)
    assert [r[3] for r in rows(log)].count(TOMBSTONE) == 2       # the raw file keeps the tombstones
    assert {u: p for u, (p, _) in log.tombstones().items()} == {"gone": 3, "other-never-logged": 5}
    assert log.export(tmp_path / "out.csv") == 2
    exported = (tmp_path / "out.csv").read_text().splitlines()
    assert exported == [HEADER.strip(), "kept,a,1700000000.000,click,1.0", "gone,b,1700000020.000,click,1.0"]


def test_a_second_tombstone_drops_what_came_between(tmp_path):
    log = EventLog(tmp_path)
    log.append([Event("u", "a", "click", T0)])
    log.append_tombstone("u", when=T0 + 1)
    log.append([Event("u", "b", "click", T0 + 2)])
    log.append_tombstone("u", when=T0 + 3)
    log.append([Event("u", "c", "click", T0 + 4)])
    assert log.export(tmp_path / "out.csv") == 1
    assert (tmp_path / "out.csv").read_text().splitlines()[1].startswith("u,c,")


def test_a_tombstone_in_one_gateways_folder_erases_the_user_in_every_folder(tmp_path):
    """Several gateways log to folders of their own: an erase taken by gateway A also drops the
    user's events about the time before it that gateway B logged (by timestamp: the two logs'
    orders cannot be compared); later events in B, and other users, are kept."""
    from gateway.event_log import FUTURE_SKEW_S, export_event_logs
    a, b = EventLog(tmp_path / "events-a"), EventLog(tmp_path / "events-b")
    b.append([Event("gone", "x", "click", T0), Event("kept", "x", "click", T0)])
    a.append([Event("gone", "y", "click", T0 + 1)])
    a.append_tombstone("gone", when=T0 + 100)
    b.append([Event("gone", "z", "click", T0 + 100 + FUTURE_SKEW_S + 1)])   # after the erase
    assert export_event_logs([a.folder, b.folder], tmp_path / "out.csv") == 2
    exported = [line.split(",")[:2] for line in (tmp_path / "out.csv").read_text().splitlines()[1:]]
    assert exported == [["kept", "x"], ["gone", "z"]]
    assert load_generic_rows(tmp_path / "out.csv") == 2


def load_generic_rows(path: Path) -> int:
    """The export is what the build's generic: reader takes (items come from the catalog, so only count rows)."""
    with open(path, newline="") as f:
        return sum(1 for _ in csv.DictReader(f))

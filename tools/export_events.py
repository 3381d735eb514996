"""Join the gateways' durable event logs into one interactions.csv for the next build
(`fusionrec build --data generic:<folder>` with the catalog's items.jsonl beside it), leaving out
every event of erased users (DeleteUserData tombstones, applied across all the folders given)."""
from __future__ import annotations

import argparse
from pathlib import Path

from gateway.event_log import export_event_logs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--event-log", type=Path, nargs="+", default=[Path("run/events")],
                   help="event-log folders, one per gateway (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="interactions.csv to write")


def run(args: argparse.Namespace) -> int:
    missing = [str(f) for f in args.event_log if not f.is_dir()]
    if missing:
        print(f"--event-log: no such folder: {', '.join(missing)}")
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = export_event_logs(args.event_log, args.out)
    print(f"{rows} events from {len(args.event_log)} log folder(s) written to {args.out}")
    return 0

"""Loaded artifact versions kept at the item log's head: what retrieval and ranking share.

- offer_followed: a freshly loaded version subscribes to the follower from the log position its
  build folded in, replays the log, and only then is offered; so neither a start (the service
  reports SERVING after its first version is offered) nor a swap serves a version that lacks an
  acknowledged upsert or delete. While the store cannot be read the replay waits and retries (the
  old version, if any, keeps serving).
- catch_up: a request naming a newer log position than this replica has applied syncs first,
  bounded by its deadline; if that fails it serves what it has.
- tail: the follower's background loop, kept alive through an unexpected error (logged).
- service_status: the Status RPC's answer (versions and log position).
"""
from __future__ import annotations

import asyncio
from typing import Callable, Sequence, TypeVar

from common.item_follower import ItemLogFollower
from common.logs import get_logger
from common.versions import VersionSet
from core.item_records import ItemRecord
from protos import fusionrec_pb2 as pb

T = TypeVar("T")
log = get_logger("followed_versions")

REPLAY_RETRY_S = 1.0     # between replay attempts while the item log's store is down
CATCH_UP_MAX_S = 0.1     # the most a request waits for this replica to reach its log position
CATCH_UP_SHARE = 0.5     # of the request's remaining deadline


async def offer_followed(versions: VersionSet[T], follower: ItemLogFollower, version: str, value: T,
                         apply: Callable[[Sequence[ItemRecord]], object], from_seq: int,
                         retry_s: float = REPLAY_RETRY_S) -> None:
    """Subscribe `value` (apply gets every record after from_seq), replay, then offer it; the
    versions this drops stop following the log."""
    follower.subscribe(version, apply, from_seq)
    try:
        while not await follower.sync():
            log.warning("item log unreadable: the version waits for its replay before it is offered",
                        extra={"version": version, "retry_s": retry_s})
            await asyncio.sleep(retry_s)
    except BaseException:
        follower.unsubscribe(version)   # cancelled (shutdown): nothing follows a version never offered
        raise
    for dropped in versions.add(version, value):
        follower.unsubscribe(dropped)
    log.info("version replayed the item log", extra={"version": version, "item_log_seq": follower.applied_seq})


async def catch_up(follower: ItemLogFollower, min_seq: int, time_remaining_s: float | None) -> bool:
    """Sync until min_seq is applied, within the request's deadline; True when reached."""
    if min_seq <= follower.applied_seq:
        return True
    budget = CATCH_UP_MAX_S if time_remaining_s is None else min(CATCH_UP_MAX_S, time_remaining_s * CATCH_UP_SHARE)
    try:
        return await asyncio.wait_for(follower.sync(min_seq), max(budget, 0.0))
    except TimeoutError:
        return False


async def tail(follower: ItemLogFollower, retry_s: float = REPLAY_RETRY_S) -> None:
    """follower.run() forever (cancel to stop): an error in a mirror must not end the tailing."""
    while True:
        try:
            await follower.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("item log tail failed; retrying", extra={"retry_s": retry_s})
            await asyncio.sleep(retry_s)


def service_status(versions: VersionSet, follower: ItemLogFollower) -> pb.ServiceStatus:
    return pb.ServiceStatus(loaded_versions=versions.names(), newest_version=versions.newest,
                            item_log_seq=follower.applied_seq, item_log_ok=follower.ok)

"""Hot swap of artifact versions while serving.

A service keeps the versions it has loaded side by side (at most `keep`), serves the one a request
names (item indices are version-specific), and watches the artifact root's LATEST pointer: a new
version is loaded off the event loop, verified, and only then offered. A version that fails to
load is refused with a logged reason and the old one keeps serving.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Awaitable, Callable, Generic, TypeVar

import grpc

from common.artifacts import LATEST, ArtifactError, ArtifactSet, open_artifacts
from common.gc_pauses import refreeze
from common.logs import get_logger

T = TypeVar("T")
log = get_logger("versions")


class UnknownVersion(LookupError):
    """The request names a version this process has not loaded (or has already dropped)."""


class VersionSet(Generic[T]):
    def __init__(self, keep: int = 2) -> None:
        self.loaded: dict[str, T] = {}
        self.newest: str = ""
        self.keep = keep

    def get(self, version: str = "") -> T:
        key = version or self.newest
        try:
            return self.loaded[key]
        except KeyError:
            raise UnknownVersion(f"artifact_version: {key!r} is not loaded here (have {sorted(self.loaded)})") from None

    def add(self, version: str, value: T) -> list[str]:
        """Offer `version` (it becomes the newest); returns the versions dropped to keep `keep`."""
        self.loaded[version] = value
        self.newest = version
        dropped = sorted(self.loaded, key=int)[:-self.keep]
        for old in dropped:
            del self.loaded[old]
        return dropped

    def names(self) -> list[str]:
        """Loaded versions, oldest first."""
        return sorted(self.loaded, key=int)


async def version_or_abort(versions: "VersionSet[T]", version: str, context: grpc.aio.ServicerContext) -> T:
    """The loaded version a request names; FAILED_PRECONDITION (the caller retries or waits) if none."""
    try:
        return versions.get(version)
    except UnknownVersion as e:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))


def pointed_version(root: Path) -> str | None:
    pointer = Path(root) / LATEST
    try:
        return pointer.read_text().strip()
    except OSError:
        return None


async def watch_versions(root: Path, current: str, load: Callable[[ArtifactSet], Awaitable[None]],
                         interval_s: float = 0.5, refused: set[str] | None = None) -> None:
    """Poll root/LATEST forever; call `load` for each new, verified version (oldest first)."""
    refused = set() if refused is None else refused
    seen = current
    while True:
        await asyncio.sleep(interval_s)
        version = pointed_version(root)
        if version is None or version == seen or version in refused:
            continue
        try:
            artifacts = await asyncio.to_thread(open_artifacts, Path(root) / version)
            await load(artifacts)
        except (ArtifactError, ValueError, OSError, RuntimeError) as e:
            refused.add(version)
            log.error("artifact version refused; the old one keeps serving",
                      extra={"version": version, "reason": str(e), "serving": seen})
            continue
        log.info("artifact version loaded", extra={"version": version, "previous": seen})
        seen = version
        refreeze()   # a version let go of is collected (cycles included), the new one frozen

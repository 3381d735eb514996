"""Versioned artifact sets: artifacts/<version>/ with a manifest.json that is checked at load.

A set is written to a temporary folder, verified, then renamed into place, and LATEST is updated
last, so a reader never sees a half-written version.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.features import FEATURE_SPEC_VERSION

MANIFEST = "manifest.json"
LATEST = "LATEST"


class ArtifactError(RuntimeError):
    """An artifact set is missing, corrupt or does not match what the service expects."""


# One mapping per shared table per process (see ArtifactSet.shared_table); weak: a version's pages
# are unmapped once nothing of it holds them (hot swap).
_shared_tables: "weakref.WeakValueDictionary[Path, np.ndarray]" = weakref.WeakValueDictionary()
_shared_lock = threading.Lock()   # services load their versions in worker threads, in parallel

MADV_POPULATE_READ = 22   # Linux >= 5.14; Python's mmap module does not name it before 3.12


def populate(table: np.ndarray) -> None:
    """Map every page of a read-only memory-mapped array now: one madvise where the kernel has
    MADV_POPULATE_READ, else a read of one value per 4 KiB page."""
    view = getattr(table, "_mmap", None)
    if view is not None:
        try:
            view.madvise(MADV_POPULATE_READ)
            return
        except (OSError, ValueError):
            pass
    flat = table.reshape(-1)
    step = max(1, 4096 // max(flat.itemsize, 1))
    for lo in range(0, len(flat), 1 << 26):   # chunks: the strided copy stays small
        flat[lo:lo + (1 << 26):step].sum()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def next_version(root: Path) -> int:
    versions = [int(p.name) for p in Path(root).glob("[0-9]*") if p.name.isdigit()]
    return max(versions, default=0) + 1


def latest_dir(root: Path) -> Path:
    """The folder LATEST points at; `root` may also be a version folder itself."""
    root = Path(root)
    if (root / MANIFEST).exists():
        return root
    pointer = root / LATEST
    if not pointer.exists():
        raise ArtifactError(f"{root}: no {LATEST} file and no {MANIFEST}; run `make artifacts` first")
    return root / pointer.read_text().strip()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = dict(manifest, feature_spec_version=FEATURE_SPEC_VERSION,
                    files={p.name: sha256_file(p) for p in files})
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def publish(root: Path, staging: Path, version: int) -> Path:
    """Atomically move a finished staging folder to root/<version> and point LATEST at it."""
    final = Path(root) / str(version)
    os.replace(staging, final)
    tmp = Path(root) / f".{LATEST}.tmp"
    tmp.write_text(str(version))
    os.replace(tmp, Path(root) / LATEST)
    return final


@dataclass(frozen=True)
class ArtifactSet:
    folder: Path
    manifest: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    def path(self, name: str) -> Path:
        return self.folder / name

    def npy(self, name: str, mmap: bool = False) -> np.ndarray:
        return np.load(self.folder / name, mmap_mode="r" if mmap else None, allow_pickle=False)

    def shared_table(self, name: str) -> np.ndarray:
        """A large table read by random rows on every request (item_text.npy): memory-mapped, so
        the processes of one node share one copy of its pages (retrieval and ranking both map it),
        and populated now. Left lazy, the first touch of each row cost a page fault that maps its
        whole page-cache folio (measured at 1M items: 300 cold rows 3.9 ms, warm 0.6 ms; on a
        kernel caching files in large folios each touched 1.5 KB row mapped ~0.5 MB), so latency
        grew with the catalog until the whole file was mapped anyway.
        One mapping per file per process: the colocated gateway's retrieval and ranking get the
        same array (mapped twice, the 1M-item table counted 1.5 GB twice in the process's RSS)."""
        path = (self.folder / name).resolve()
        with _shared_lock:
            table = _shared_tables.get(path)
            if table is None:
                table = self.npy(name, mmap=True)
                populate(table)
                _shared_tables[path] = table
        return table

    def json(self, name: str) -> Any:
        return json.loads((self.folder / name).read_text())


def open_artifacts(root: Path, verify_checksums: bool = True) -> ArtifactSet:
    """Open and verify the set at root (a version folder, or a root with LATEST).

    Raises ArtifactError naming what differs: a missing or changed file, another feature spec.
    """
    folder = latest_dir(root)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{folder}/{MANIFEST}: unreadable ({e})") from e
    if manifest.get("feature_spec_version") != FEATURE_SPEC_VERSION:
        raise ArtifactError(
            f"{folder}: feature_spec_version {manifest.get('feature_spec_version')!r} "
            f"!= service's {FEATURE_SPEC_VERSION!r}; rebuild with `make artifacts`")
    for name, expected in manifest.get("files", {}).items():
        path = folder / name
        if not path.exists():
            raise ArtifactError(f"{folder}: file {name} listed in the manifest is missing")
        if verify_checksums and sha256_file(path) != expected:
            raise ArtifactError(f"{folder}: checksum of {name} differs from the manifest")
    return ArtifactSet(folder, manifest)


def check_shape(name: str, array: np.ndarray, rows: int, dim: int | None = None) -> None:
    """Refuse an array whose shape disagrees with the manifest's counts and dims."""
    if array.shape[0] != rows or (dim is not None and (array.ndim != 2 or array.shape[1] != dim)):
        want = f"({rows}, {dim})" if dim is not None else f"({rows}, ...)"
        raise ArtifactError(f"{name}: shape {array.shape} does not match the manifest's {want}")

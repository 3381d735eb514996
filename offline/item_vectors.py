"""Bring your own embeddings: item vectors computed elsewhere replace the build's text encoding.

Input: `FILE.npy` ([m, d] float array) with its ids, one per line, in `FILE.ids.txt` beside it (or a
file named explicitly); or `FILE.parquet` with an `item_id` column and one list-of-floats column
(needs pyarrow, which is not in requirements.txt: without it parquet is refused with a hint).

Checks, each an ItemVectorsError naming the file and the rule:
  * every row has the same dimension, equal to the configured text space (the text encoder's);
  * no NaN / inf; no zero-norm row (a zero vector has no direction to normalise);
  * ids unique and as many as rows;
  * every catalog item has a vector. Missing ones fail the build (with their count and a few ids)
    unless the caller can encode them with the same model (`encode_missing`): then only those are
    encoded, and only when the vectors were declared to come from the build's own encoder.
Ids not in the catalog are listed (a few) and ignored. Rows are L2-normalised (the text space is
searched by inner product, as the encoder's unit vectors are).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from common.artifacts import sha256_file
from common.logs import get_logger

log = get_logger("offline.item_vectors")
SHOW = 5            # ids quoted in a message
MIN_NORM = 1e-12    # below this a row counts as zero
BLOCK = 65_536      # rows checked at a time


class ItemVectorsError(ValueError):
    """Brought vectors that break a rule: the message names the file and the rule."""


@dataclass(frozen=True)
class BroughtVectors:
    """Vectors aligned with the catalog, unit rows, plus what the manifest records about them."""
    vectors: np.ndarray        # [n_catalog, d] float32, unit rows
    file: str
    sha256: str
    dim: int
    rows: int                  # rows in the file
    encoded: int               # catalog items missing from the file and encoded instead
    unknown: int               # ids in the file the catalog lacks (ignored)

    def describe(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "dim": self.dim, "rows": self.rows,
                "encoded": self.encoded, "unknown_ids_ignored": self.unknown}


def ids_file_for(path: Path) -> Path:
    """vectors.npy -> vectors.ids.txt (the sibling ids file)."""
    return path.with_suffix(".ids.txt")




def _quote(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:SHOW])
    return shown + (f" and {len(ids) - SHOW} more" if len(ids) > SHOW else "")


def read_vectors(path: Path, ids_path: Path | None = None) -> tuple[list[str], np.ndarray]:
    """(ids, [m, d] float32) from .npy + ids file or from parquet; shape and id rules checked here."""
    path = Path(path)
    if not path.is_file():
        raise ItemVectorsError(f"{path}: no such file")
    if path.suffix == ".npy":
        return _read_npy(path, Path(ids_path) if ids_path else ids_file_for(path))
    if path.suffix == ".parquet":
        if ids_path:
            raise ItemVectorsError(f"{path}: parquet carries its ids in the item_id column; "
                                   "--item-vector-ids is for .npy only")
        return _read_parquet(path)
    raise ItemVectorsError(f"{path}: item vectors must be .npy (+ ids file) or .parquet, got {path.suffix!r}")


def _read_npy(path: Path, ids_path: Path) -> tuple[list[str], np.ndarray]:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:   # object arrays need pickle: refused
        raise ItemVectorsError(f"{path}: not a numeric .npy array ({e})") from None
    if array.ndim != 2:
        raise ItemVectorsError(f"{path}: dimension must be the same for every row: want a 2-D "
                               f"[items, dim] array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ItemVectorsError(f"{path}: vectors must be floats, got dtype {array.dtype}")
    if not ids_path.is_file():
        raise ItemVectorsError(f"{path}: ids file {ids_path} not found (one item id per line, "
                               "row order; or name it with --item-vector-ids)")
    ids = ids_path.read_text(encoding="utf-8").splitlines()
    if len(ids) != array.shape[0]:
        raise ItemVectorsError(f"{ids_path}: {len(ids)} ids for {array.shape[0]} rows in {path}: "
                               "need exactly one id per row")
    return _unique(ids, ids_path), np.array(array, np.float32)   # our own copy: normalised in place


def _read_parquet(path: Path) -> tuple[list[str], np.ndarray]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ItemVectorsError(f"{path}: reading parquet needs pyarrow, which is not installed; "
                               "convert to .npy + .ids.txt (or pip install pyarrow)") from None
    table = pq.read_table(path)
    if "item_id" not in table.column_names:
        raise ItemVectorsError(f"{path}: parquet needs an item_id column, has {table.column_names}")
    others = [c for c in table.column_names if c != "item_id"]
    if len(others) != 1:
        raise ItemVectorsError(f"{path}: parquet needs exactly one vector column beside item_id, has {others}")
    ids = [str(i) for i in table.column("item_id").to_pylist()]
    rows = table.column(others[0]).to_pylist()
    dims = {len(r) if r is not None else 0 for r in rows}
    if len(dims) > 1:
        bad = [ids[j] for j, r in enumerate(rows) if (len(r) if r is not None else 0) != len(rows[0] or [])]
        raise ItemVectorsError(f"{path}: dimension must be the same for every row: found {sorted(dims)} "
                               f"(rows differing from the first: {_quote(bad)})")
    return _unique(ids, path), np.asarray(rows, np.float32).reshape(len(rows), dims.pop() if dims else 0)


def _unique(ids: list[str], file: Path) -> list[str]:
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dupes = [i for i in ids if i in seen or seen.add(i)]
        raise ItemVectorsError(f"{file}: item ids must be unique, repeated: {_quote(dupes)}")
    return ids


def check_rows(ids: list[str], vectors: np.ndarray, expected_dim: int, file: Path, space: str) -> np.ndarray:
    """Dimension, finiteness and norm rules; returns the unit rows [m, d] float32."""
    if vectors.shape[1] != expected_dim:
        raise ItemVectorsError(f"{file}: dimension must match the text space ({space}: {expected_dim}), "
                               f"got {vectors.shape[1]}")
    vectors = vectors.astype(np.float32, copy=False)
    # Row figures in blocks: whole-array temporaries would double a 1M x 384 catalog's 1.5 GB.
    blocks = range(0, len(vectors), BLOCK)
    finite = np.concatenate([np.isfinite(vectors[lo:lo + BLOCK]).all(axis=1) for lo in blocks] or [np.ones(0, bool)])
    if not finite.all():
        bad = [ids[j] for j in np.flatnonzero(~finite)]
        raise ItemVectorsError(f"{file}: vectors must be finite (no NaN/inf): {len(bad)} rows are not: {_quote(bad)}")
    norms = np.concatenate([np.linalg.norm(vectors[lo:lo + BLOCK], axis=1) for lo in blocks] or [np.ones(0, np.float32)])
    zero = norms < MIN_NORM
    if zero.any():
        bad = [ids[j] for j in np.flatnonzero(zero)]
        raise ItemVectorsError(f"{file}: zero-norm rows are rejected (no direction to normalise): "
                               f"{len(bad)} rows: {_quote(bad)}")
    vectors /= norms[:, None].astype(np.float32)   # in place, for the same reason
    return vectors


def load_brought_vectors(path: Path, catalog_ids: Sequence[str], expected_dim: int, space: str,
                         ids_path: Path | None = None,
                         encode_missing: Callable[[list[int]], np.ndarray] | None = None) -> BroughtVectors:
    """Read, check and align brought vectors with the catalog's item order.

    encode_missing(catalog rows) -> their vectors, or None: then a catalog item without a vector
    fails the build."""
    path = Path(path)
    ids, raw = read_vectors(path, ids_path)
    unit = check_rows(ids, raw, expected_dim, path, space)
    row_of = {i: j for j, i in enumerate(ids)}
    catalog_ids = list(catalog_ids)
    missing = [j for j, i in enumerate(catalog_ids) if i not in row_of]
    if missing and encode_missing is None:
        raise ItemVectorsError(
            f"{path}: every catalog item needs a vector: {len(missing)} of {len(catalog_ids)} are missing "
            f"({_quote([catalog_ids[j] for j in missing])}); add them, or declare the vectors come from the "
            "build's own encoder (--item-vectors-same-encoder) to encode only those")
    known = set(catalog_ids)
    unknown = [i for i in ids if i not in known]
    if unknown:
        log.warning("brought vectors for unknown items ignored",
                    extra={"file": str(path), "count": len(unknown), "first": unknown[:SHOW]})
    if ids == catalog_ids:   # the common case (the file written in catalog order): no copy
        out = unit
    else:
        out = np.zeros((len(catalog_ids), expected_dim), np.float32)
        present = [j for j, i in enumerate(catalog_ids) if i in row_of]
        out[present] = unit[[row_of[catalog_ids[j]] for j in present]]
        del unit
    if missing:
        encoded = np.asarray(encode_missing(missing), np.float32)
        out[missing] = check_rows([catalog_ids[j] for j in missing], encoded, expected_dim,
                                  path, f"{space}, encoded")
        log.info("catalog items without a brought vector encoded", extra={"count": len(missing)})
    return BroughtVectors(out, str(path), sha256_file(path), expected_dim, len(ids), len(missing), len(unknown))

"""A synthetic catalog of any size with embedding-like item vectors, for the scale benchmark.

Structure (numpy, seeded: same arguments -> same files):
  * items have latent factors z in R^LATENT: a topic centre (TOPICS of them) plus item noise;
  * an item's vector is z mapped to DIM dims by one fixed random linear map, plus isotropic noise
    (NOISE of the signal's norm), L2-normalised: low-rank + noise like real text embeddings, whose
    spectrum is dominated by a few directions, not uniform random points on the sphere;
  * users follow the same latent structure: each has a preferred topic and a preference vector
    near its centre, and picks ~80% of their items from that topic (those scoring highest against
    the preference, Gumbel-perturbed), the rest by a Zipf-like popularity over the whole catalog.
Written as the generic dataset (items.jsonl + interactions.csv, offline/datasets/generic.py) plus
`vectors.npy` + `vectors.ids.txt` for the build's --item-vectors.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

LATENT = 32
DIM = 384          # all-MiniLM-L6-v2's dimension: the configured text space
TOPICS = 64
ITEM_SPREAD = 0.8  # item factors around their topic centre
NOISE = 0.5        # noise norm relative to the signal's
ON_TOPIC = 0.8
CHUNK = 65_536     # rows mapped at a time: bounds memory at 1M items
START_TS = 1_700_000_000


@dataclass(frozen=True)
class LatentSpec:
    n_items: int
    n_users: int
    per_user: tuple[int, int] = (10, 50)   # interactions per user, inclusive range
    seed: int = 0
    latent: int = LATENT
    dim: int = DIM
    noise: float = NOISE

    def stamp(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def default_users(n_items: int) -> int:
    """Users stay nearly flat (1,000 up to 100k items, 2,000 at 1M): the build's per-user stages
    (quotas, ranker, re-ranker) then cost about the same at every size, and what grows is what
    grows with the catalog (vectors, indexes, item-to-item, tables)."""
    return int(np.clip(n_items // 500, 1000, 2000))


@dataclass
class LatentCatalog:
    vectors: np.ndarray      # [n, dim] float32 unit rows
    factors: np.ndarray      # [n, latent] float32
    topics: np.ndarray       # [n] int topic of each item
    users: np.ndarray        # [m] user row of each interaction
    items: np.ndarray        # [m] item row
    timestamps: np.ndarray   # [m] int64


def item_vectors(factors: np.ndarray, spec: LatentSpec, rng: np.random.Generator,
                 progress: bool = False) -> np.ndarray:
    mix = (rng.standard_normal((spec.latent, spec.dim)) / np.sqrt(spec.latent)).astype(np.float32)
    out = np.empty((len(factors), spec.dim), np.float32)
    for lo in tqdm(range(0, len(factors), CHUNK), desc="vectors", unit="chunk", disable=not progress):
        signal = factors[lo:lo + CHUNK] @ mix
        signal /= np.linalg.norm(signal, axis=1, keepdims=True) + 1e-12
        noise = rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(spec.noise / np.sqrt(spec.dim))
        rows = signal + noise
        out[lo:lo + CHUNK] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def generate(spec: LatentSpec, progress: bool = False) -> LatentCatalog:
    rng = np.random.default_rng(spec.seed)
    n = spec.n_items
    centres = rng.standard_normal((TOPICS, spec.latent)).astype(np.float32)
    topics = rng.integers(0, TOPICS, n)
    factors = centres[topics] + ITEM_SPREAD * rng.standard_normal((n, spec.latent), dtype=np.float32)
    vectors = item_vectors(factors, spec, rng, progress)
    # Zipf-like popularity over a random order of the items.
    popularity = 1.0 / (rng.permutation(n) + 10.0) ** 0.8
    popularity /= popularity.sum()
    by_topic = [np.flatnonzero(topics == t) for t in range(TOPICS)]
    users, items, stamps = [], [], []
    lo, hi = spec.per_user
    for u in tqdm(range(spec.n_users), desc="users", unit="user", disable=not progress):
        t = int(rng.integers(TOPICS))
        preference = centres[t] + 0.5 * rng.standard_normal(spec.latent, dtype=np.float32)
        length = int(rng.integers(lo, hi + 1))
        n_on = min(int(round(ON_TOPIC * length)), len(by_topic[t]))
        pool = by_topic[t] if len(by_topic[t]) <= 400 else rng.choice(by_topic[t], 400, replace=False)
        score = factors[pool] @ preference / np.sqrt(spec.latent) + rng.gumbel(size=len(pool))
        chosen = pool[np.argsort(-score)[:n_on]]
        rest = rng.choice(n, length - n_on, p=popularity) if length > n_on else np.zeros(0, np.int64)
        picked = np.unique(np.r_[chosen, rest])
        picked = picked[rng.permutation(len(picked))]
        # Each user's times increase; users interleave over the same ~30 days (a per-user time split works).
        start = START_TS + int(rng.integers(0, 86_400))
        users.append(np.full(len(picked), u))
        items.append(picked)
        stamps.append(start + np.cumsum(rng.integers(600, 86_400, len(picked))))
    return LatentCatalog(vectors, factors, topics, np.concatenate(users), np.concatenate(items),
                         np.concatenate(stamps).astype(np.int64))


def item_id(j: int) -> str:
    return f"i{j}"


def write(out_dir: Path, spec: LatentSpec, progress: bool = False) -> Path:
    """Generate and write out_dir/{items.jsonl, interactions.csv, vectors.npy, vectors.ids.txt};
    skipped when out_dir already holds this spec's files (spec.json). Returns out_dir."""
    out_dir = Path(out_dir)
    stamp = out_dir / "spec.json"
    if stamp.exists() and stamp.read_text() == spec.stamp():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    cat = generate(spec, progress)
    ids = [item_id(j) for j in range(spec.n_items)]
    _write_text(out_dir / "items.jsonl", (json.dumps({"id": i, "title": f"Item {i}", "category": f"t{t}"})
                                          for i, t in zip(ids, cat.topics.tolist())))
    rows = (f"u{u},{ids[i]},{ts},click" for u, i, ts in zip(cat.users.tolist(), cat.items.tolist(),
                                                              cat.timestamps.tolist()))
    _write_text(out_dir / "interactions.csv", rows, header="user_id,item_id,timestamp,event")
    np.save(out_dir / "vectors.npy", cat.vectors)
    _write_text(out_dir / "vectors.ids.txt", iter(ids))
    stamp.write_text(spec.stamp())   # last: a half-written folder is regenerated
    return out_dir


def _write_text(path: Path, lines, header: str | None = None) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        if header:
            f.write(header + "\n")
        for line in lines:
            f.write(line + "\n")
    os.replace(tmp, path)

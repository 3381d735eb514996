"""The scale benchmark's generator (embedding-like, not uniform random; users follow the latent
structure) and its row schema on a tiny build (no stack)."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from offline.datasets.latent import LATENT, LatentSpec, generate, write
from tools.bench_scale import ROW_KEYS, add_arguments, format_table, format_targets, parse_sizes, run_scale


def _energy_top(vectors: np.ndarray, k: int) -> float:
    s = np.linalg.svd(vectors.astype(np.float64), compute_uv=False) ** 2
    return float(s[:k].sum() / s.sum())


def test_vectors_are_low_rank_plus_noise_not_uniform():
    cat = generate(LatentSpec(n_items=2000, n_users=50))
    assert cat.vectors.shape == (2000, 384) and cat.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(cat.vectors, axis=1), 1, atol=1e-5)
    assert _energy_top(cat.vectors, LATENT) > 0.7          # the 32 latent directions carry most energy
    uniform = np.random.default_rng(0).standard_normal((2000, 384))
    assert _energy_top(uniform, LATENT) < 0.25              # what uniform random points would give
    assert _energy_top(cat.vectors, LATENT) - _energy_top(cat.vectors, LATENT - 8) > 0.05   # not rank 24


def test_users_follow_the_latent_structure():
    cat = generate(LatentSpec(n_items=3000, n_users=100, seed=1))
    shares = []
    for u in range(100):
        topics = cat.topics[cat.items[cat.users == u]]
        shares.append(np.bincount(topics).max() / len(topics))
    assert np.mean(shares) > 0.6      # one topic dominates each history (64 topics: chance is ~0.05)
    for u in range(100):              # each user's times increase
        assert np.all(np.diff(cat.timestamps[cat.users == u]) > 0)


def test_same_spec_same_files_and_cached(tmp_path):
    spec = LatentSpec(n_items=300, n_users=20, seed=2)
    write(tmp_path / "a", spec)
    write(tmp_path / "b", spec)
    for name in ("items.jsonl", "interactions.csv", "vectors.ids.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "vectors.npy"), np.load(tmp_path / "b" / "vectors.npy"))
    stamp = (tmp_path / "a" / "items.jsonl").stat().st_mtime_ns
    write(tmp_path / "a", spec)                                 # same spec: not regenerated
    assert (tmp_path / "a" / "items.jsonl").stat().st_mtime_ns == stamp


def test_sizes_argument():
    assert parse_sizes("100000,10000") == [10000, 100000]
    with pytest.raises(argparse.ArgumentTypeError, match="--sizes"):
        parse_sizes("10k")


def test_a_tiny_build_gives_a_row_of_the_schema(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--sizes", "600", "--users", "120", "--epochs", "1", "--build-only",
                              "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "scale.json")])
    rows = run_scale(args)
    written = json.loads((tmp_path / "scale.json").read_text())
    assert written == rows and len(rows) == 1
    row = rows[0]
    assert set(ROW_KEYS) <= set(row)
    assert row["items"] == 600 and row["users"] == 120 and row["index_kind"] == "flat16"
    assert row["recall_at_300"] >= 0.99       # exhaustive over float16 rows: only near-ties may swap
    assert row["build_s"] > 0 and row["peak_rss_mib"] > 100 and row["index_mib"] >= 0.4   # 600 x 384 float16 (0.44 MiB, rounded)
    assert row["text_space"] == "brought" and row["p50_ms"] is None
    assert "600" in format_table(rows) and "recall@300 1.000" in format_targets(rows)
    # --reuse-builds: the same spec serves the finished build again (no rebuild, figures kept) ...
    version = sorted((tmp_path / "work" / "600" / "artifacts").iterdir())
    args.reuse_builds = True
    (again,) = run_scale(args)
    assert again["build_reused"] and again["build_s"] == row["build_s"] and again["built"] == row["built"]
    assert sorted((tmp_path / "work" / "600" / "artifacts").iterdir()) == version
    # ... and another spec (here other epochs) builds afresh.
    args.epochs = 2
    (fresh,) = run_scale(args)
    assert not fresh["build_reused"] and fresh["built"] >= row["built"]


def test_pss_counts_a_page_two_processes_share_once(tmp_path):
    """The stack's memory figure: two processes mapping the same file pages have a VmRSS sum of
    about twice the pages, a PSS sum of about once."""
    import subprocess
    import sys
    from tools.bench import pss_mib, rss_mib
    size = 64 * 2**20
    path = tmp_path / "shared.bin"
    path.write_bytes(b"\1" * size)
    touch = ("import mmap, sys, time\n"
             f"f = open({str(path)!r}, 'rb'); m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
             f"s = sum(m[i] for i in range(0, {size}, 4096)); print('ready', flush=True); time.sleep(60)\n")
    children = [subprocess.Popen([sys.executable, "-c", touch], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for child in children:
            assert child.stdout.readline().strip() == "ready"
        rss = sum(rss_mib(c.pid) for c in children)
        pss = sum(pss_mib(c.pid) for c in children)
        assert rss - pss > 0.8 * size / 2**20   # the 64 MiB both map: twice in the RSS sum, once in PSS
    finally:
        for child in children:
            child.kill()
            child.wait()

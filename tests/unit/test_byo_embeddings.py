"""Bring your own embeddings: every rule of offline/item_vectors.py fails with its message, and a
build with brought vectors serves exactly them (normalised) in the text space."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from offline.item_vectors import ItemVectorsError, load_brought_vectors, read_vectors

CATALOG = ["a", "b", "c"]


def _write(tmp_path: Path, vectors, ids=CATALOG, name: str = "vectors") -> Path:
    path = tmp_path / f"{name}.npy"
    np.save(path, np.asarray(vectors))
    if ids is not None:
        (tmp_path / f"{name}.ids.txt").write_text("\n".join(ids) + "\n")
    return path


def _load(path: Path, dim: int = 4, catalog=CATALOG, **kw):
    return load_brought_vectors(path, catalog, dim, "test-encoder", **kw)


def _good(n: int = 3, d: int = 4) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, d)).astype(np.float32) * 3


def test_vectors_are_normalised_and_aligned_with_the_catalog(tmp_path):
    raw = _good()
    path = _write(tmp_path, raw[::-1], ids=CATALOG[::-1])          # file order differs from the catalog's
    brought = _load(path)
    expected = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(brought.vectors, expected, rtol=1e-6)
    assert brought.describe()["dim"] == 4 and len(brought.sha256) == 64 and brought.encoded == 0


def test_dimension_must_match_the_text_space(tmp_path):
    path = _write(tmp_path, _good(d=5))
    with pytest.raises(ItemVectorsError, match=r"vectors\.npy: dimension must match the text space \(test-encoder: 4\), got 5"):
        _load(path)


def test_dimension_must_be_the_same_for_every_row(tmp_path):
    path = _write(tmp_path, np.ones(3, np.float32))     # 1-D: no rows of a dimension
    with pytest.raises(ItemVectorsError, match="dimension must be the same for every row"):
        _load(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_are_rejected_naming_the_row(tmp_path, bad):
    raw = _good()
    raw[1, 2] = bad
    with pytest.raises(ItemVectorsError, match=r"must be finite \(no NaN/inf\): 1 rows are not: 'b'"):
        _load(_write(tmp_path, raw))


def test_zero_norm_rows_are_rejected(tmp_path):
    raw = _good()
    raw[2] = 0
    with pytest.raises(ItemVectorsError, match=r"zero-norm rows are rejected.*1 rows: 'c'"):
        _load(_write(tmp_path, raw))


def test_a_catalog_item_without_a_vector_fails_with_the_count(tmp_path):
    path = _write(tmp_path, _good(2), ids=["a", "c"])
    with pytest.raises(ItemVectorsError, match=r"every catalog item needs a vector: 1 of 3 are missing \('b'\)"):
        _load(path)


def test_missing_items_are_encoded_only_when_an_encoder_is_given(tmp_path):
    path = _write(tmp_path, _good(2), ids=["a", "c"])
    asked = []

    def encode(rows):
        asked.append(rows)
        return np.tile(np.array([[0, 0, 2, 0]], np.float32), (len(rows), 1))

    brought = _load(path, encode_missing=encode)
    assert asked == [[1]] and brought.encoded == 1
    np.testing.assert_allclose(brought.vectors[1], [0, 0, 1, 0])


def test_unknown_ids_are_ignored_and_counted(tmp_path):
    raw = _good(5)
    brought = _load(_write(tmp_path, raw, ids=["a", "x", "b", "y", "c"]))
    assert brought.unknown == 2 and brought.rows == 5
    np.testing.assert_allclose(brought.vectors[2], raw[4] / np.linalg.norm(raw[4]), rtol=1e-6)


def test_ids_file_rules(tmp_path):
    with pytest.raises(ItemVectorsError, match=r"ids file .*vectors\.ids\.txt not found"):
        _load(_write(tmp_path, _good(), ids=None))
    with pytest.raises(ItemVectorsError, match="2 ids for 3 rows"):
        _load(_write(tmp_path, _good(), ids=["a", "b"]))
    with pytest.raises(ItemVectorsError, match=r"item ids must be unique, repeated: 'a'"):
        _load(_write(tmp_path, _good(), ids=["a", "a", "b"]))
    other = tmp_path / "named.txt"                       # --item-vector-ids names the file
    other.write_text("c\nb\na\n")
    ids, _ = read_vectors(_write(tmp_path, _good(), ids=None, name="v2"), other)
    assert ids == ["c", "b", "a"]


def test_other_formats_are_refused_with_the_rule(tmp_path):
    (tmp_path / "v.csv").write_text("a,1,2,3,4\n")
    with pytest.raises(ItemVectorsError, match="must be .npy"):
        _load(tmp_path / "v.csv")
    with pytest.raises(ItemVectorsError, match="vectors must be floats"):
        _load(_write(tmp_path, np.ones((3, 4), np.int64)))
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "v.parquet").write_bytes(b"PAR1")
        with pytest.raises(ItemVectorsError, match="parquet needs pyarrow, which is not installed"):
            _load(tmp_path / "v.parquet")


# -- a real (tiny) build with brought vectors

@pytest.fixture(scope="module")
def brought_build(tmp_path_factory):
    from offline.build import BuildOptions, build
    from offline.datasets.latent import LatentSpec, write
    root = tmp_path_factory.mktemp("byo")
    data = write(root / "data", LatentSpec(n_items=400, n_users=120, seed=3))
    final = build(BuildOptions(data=f"generic:{data}", artifacts=root / "artifacts",
                               model_repo=root / "model_repository", cache_dir=root / "cache", epochs=1,
                               progress=False, item_vectors=data / "vectors.npy"))
    return data, final


def test_a_build_with_brought_vectors_serves_them(brought_build):
    import faiss
    import torch
    from common.artifacts import open_artifacts
    from common.artifacts import sha256_file
    data, final = brought_build
    artifacts = open_artifacts(final.parent)
    raw = np.load(data / "vectors.npy")
    ids = (data / "vectors.ids.txt").read_text().split()
    order = [ids.index(i) for i in artifacts.json("catalog.json")["item_ids"]]
    expected = raw[order] / np.linalg.norm(raw[order], axis=1, keepdims=True)
    np.testing.assert_allclose(artifacts.npy("item_text.npy"), expected, atol=1e-6)
    index = faiss.read_index(str(artifacts.path("index_text.faiss")))   # the BERT channel's index
    # float16 rows (the CPU exact kind, flat16): equal to float16 rounding
    np.testing.assert_allclose(np.stack([index.reconstruct(j) for j in range(len(order))]), expected, atol=2e-4)
    m = artifacts.manifest
    model = torch.jit.load(str(final.parent.parent / "model_repository" / "fused_ranker" /
                               m["models"]["fused_ranker"] / "model.pt"))    # the fused ranker's text features
    # The served model keeps the projection of those vectors (freeze() drops the raw table).
    with torch.no_grad():
        projected = torch.tanh(model.text_proj(torch.from_numpy(expected.astype(np.float32)))).numpy()
    assert model.item_text.shape == (len(order), 0) and model.text_dim == 384
    np.testing.assert_allclose(model.item_hidden.numpy(), projected, atol=1e-5)
    assert m["text_space"] == "brought"
    assert m["item_vectors"] == {"file": str(data / "vectors.npy"), "sha256": sha256_file(data / "vectors.npy"),
                                 "dim": 384, "rows": 400, "encoded": 0, "unknown_ids_ignored": 0}


def test_the_build_command_refuses_bad_vectors_with_the_rule(brought_build, tmp_path, capsys):
    from offline.__main__ import main
    data, _ = brought_build
    raw = np.load(data / "vectors.npy")
    raw[7] = 0
    bad = _write(tmp_path, raw, ids=(data / "vectors.ids.txt").read_text().split(), name="zeroed")
    code = main(["build", "--data", f"generic:{data}", "--artifacts", str(tmp_path / "a"),
                 "--model-repo", str(tmp_path / "m"), "--cache-dir", str(tmp_path / "c"), "--no-progress",
                 "--item-vectors", str(bad)])
    assert code == 2
    err = capsys.readouterr().err
    assert "build refused:" in err and "zeroed.npy: zero-norm rows are rejected" in err and "'i7'" in err
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())   # nothing published


def test_same_encoder_vectors_encode_only_the_missing_items(brought_build, tmp_path):
    """--item-vectors-same-encoder: items missing from the file are encoded by the build's own model,
    and the text space stays the online text_encoder's (UpsertItems embeds into it)."""
    from common.artifacts import open_artifacts
    from core.item_text import item_text
    from offline.build import BuildOptions, build
    from offline.text_encoder import TextEncoder
    data, _ = brought_build
    raw = np.load(data / "vectors.npy")
    ids = (data / "vectors.ids.txt").read_text().split()
    partial = _write(tmp_path, raw[2:], ids=ids[2:], name="partial")         # i0 and i1 have no vector
    final = build(BuildOptions(data=f"generic:{data}", artifacts=tmp_path / "artifacts",
                               model_repo=tmp_path / "model_repository", cache_dir=tmp_path / "cache", epochs=1,
                               progress=False, item_vectors=partial, item_vectors_same_encoder=True))
    artifacts = open_artifacts(final.parent)
    m = artifacts.manifest
    assert m["text_space"] == "encoder" and m["item_vectors"]["encoded"] == 2
    catalog = artifacts.json("catalog.json")
    rows = [catalog["item_ids"].index(i) for i in ("i0", "i1")]
    texts = [item_text(catalog["titles"][j], "", catalog["categories"][j]) for j in rows]
    vectors = artifacts.npy("item_text.npy")
    np.testing.assert_allclose(vectors[rows], TextEncoder().encode(texts), atol=1e-5)
    j = catalog["item_ids"].index("i5")
    np.testing.assert_allclose(vectors[j], raw[5] / np.linalg.norm(raw[5]), atol=1e-6)

"""Triton-served models equal their in-process counterparts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from core.features import RETRIEVAL_FEATURES
from offline.serving.export import load_ranker

F = len(RETRIEVAL_FEATURES)   # retrieval features per candidate

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(stack):
    c = stack.triton_client()   # mTLS, the operator cert
    yield c
    c.close()


def _infer(client, model, version, arrays):
    inputs = []
    for name, (array, dtype) in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return client.infer(model, inputs, model_version=version)


def _rank(client, version, history, candidates, features, extra_text=None, extra_category=None):
    """One user's request to the dynamically batched fused ranker: [1, ...] tensors in, [1, N] out."""
    arrays = {"history": (history[None], "INT64"), "candidates": (candidates[None], "INT64"),
              "features": (features[None], "FP32")}
    if extra_text is not None:
        arrays.update(extra_text=(extra_text[None], "FP32"), extra_category=(extra_category[None], "INT64"))
    scores = _infer(client, "fused_ranker", version, arrays).as_numpy("scores")
    assert scores.shape == (1, len(candidates))
    return scores[0]


def _local(model, history, candidates, features, extra_text=None, extra_category=None):
    if extra_text is None:
        extra_text, extra_category = np.zeros((0, 384), np.float32), np.zeros(0, np.int64)
    with torch.inference_mode():
        return model(*(torch.from_numpy(a) for a in (history, candidates, features, extra_text,
                                                      extra_category))).numpy()


def test_fused_ranker_scores_equal_in_process(client, built, artifacts):
    version = artifacts.manifest["models"]["fused_ranker"]
    local = load_ranker(built[1], version)
    rng = np.random.default_rng(1)
    n = artifacts.manifest["counts"]["items"]
    for history_len in (0, 7, 80):
        history = rng.choice(n, history_len, replace=False).astype(np.int64)
        candidates = rng.choice(n, 300, replace=False).astype(np.int64)
        features = rng.random((300, F), dtype=np.float32)
        served = _rank(client, version, history, candidates, features)
        np.testing.assert_allclose(served, _local(local, history, candidates, features), atol=1e-4)


def test_fused_ranker_scores_online_items_like_in_process(client, built, artifacts):
    version = artifacts.manifest["models"]["fused_ranker"]
    local = load_ranker(built[1], version)
    n = artifacts.manifest["counts"]["items"]
    rng = np.random.default_rng(2)
    extra_text = rng.normal(size=(3, 384)).astype(np.float32)
    extra_text /= np.linalg.norm(extra_text, axis=1, keepdims=True)
    extra_category = np.array([1, 0, 2], np.int64)
    history = np.array([1, 2, n + 2], np.int64)          # the user clicked an online item too
    candidates = np.array([5, n, n + 1, 7], np.int64)
    features = rng.random((4, F), dtype=np.float32)
    served = _rank(client, version, history, candidates, features, extra_text, extra_category)
    expected = _local(local, history, candidates, features, extra_text, extra_category)
    np.testing.assert_allclose(served, expected, atol=1e-4)


def test_fused_ranker_rejects_out_of_range_ids(client, artifacts):
    n = artifacts.manifest["counts"]["items"]
    with pytest.raises(InferenceServerException, match="candidates: item index out of range"):
        _rank(client, artifacts.manifest["models"]["fused_ranker"], np.zeros(0, np.int64),
              np.array([n], np.int64), np.zeros((1, F), np.float32))


def _batch_counts(client, version):
    """{batch size: executions} from Triton's statistics for the fused ranker."""
    stats = client.get_inference_statistics("fused_ranker", version, as_json=True)["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def test_fused_ranker_batches_concurrent_users_and_scores_each_like_in_process(client, built, artifacts):
    """Concurrent users of different sizes (some with online items, one with a bad id) share model
    executions; every good request gets its own scores, the bad one alone gets an error."""
    from concurrent.futures import ThreadPoolExecutor
    version = artifacts.manifest["models"]["fused_ranker"]
    local = load_ranker(built[1], version)
    n = artifacts.manifest["counts"]["items"]
    rng = np.random.default_rng(3)
    users = []
    for j in range(48):
        history = rng.choice(n, int(rng.integers(0, 60)), replace=False).astype(np.int64)
        candidates = rng.choice(n, int(rng.integers(1, 300)), replace=False).astype(np.int64)
        features = rng.random((len(candidates), F), dtype=np.float32)
        extra = None
        if j % 3 == 0:   # online items: numbered from n in every request, each with its own vectors
            m = int(rng.integers(1, 4))
            text = rng.normal(size=(m, 384)).astype(np.float32)
            extra = (text / np.linalg.norm(text, axis=1, keepdims=True), rng.integers(0, 3, m).astype(np.int64))
            candidates[:m] = n + np.arange(m)
            history = np.r_[history, n + m - 1]
        users.append((history, candidates, features, *(extra or ())))
    bad = 17
    users[bad] = (users[bad][0], np.r_[users[bad][1][:-1], n + 50], users[bad][2])
    before = _batch_counts(client, version)

    def call(user):
        try:
            return _rank(client, version, *user)
        except InferenceServerException as e:
            return e

    with ThreadPoolExecutor(16) as pool:
        served = list(pool.map(call, users))
    for j, (user, result) in enumerate(zip(users, served)):
        if j == bad:
            assert isinstance(result, InferenceServerException) and "out of range" in str(result)
            continue
        assert not isinstance(result, Exception), result
        np.testing.assert_allclose(result, _local(local, *user), atol=1e-4)
    after = _batch_counts(client, version)
    batched = {size: count - before.get(size, 0) for size, count in after.items() if size > 1}
    assert sum(batched.values()) > 0, f"no execution held more than one request: {after}"


def test_text_encoder_equals_offline_encoder(client, artifacts):
    from offline.text_encoder import TextEncoder
    texts = ["Toy Story (1995). Genres: Adventure, Animation.", "A quiet documentary about the sea", "x"]
    served = _infer(client, "text_encoder", artifacts.manifest["models"]["text_encoder"], {
        "text": (np.array([t.encode() for t in texts], dtype=object), "BYTES")}).as_numpy("embedding")
    expected = TextEncoder().encode(texts)
    assert served.shape == expected.shape == (3, 384)
    np.testing.assert_allclose(served, expected, atol=1e-4)

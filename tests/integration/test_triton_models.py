"""Triton-served models equal their in-process counterparts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(stack):
    c = triton.InferenceServerClient(stack.addr("triton"))
    yield c
    c.close()


def _infer(client, model, version, arrays):
    inputs = []
    for name, (array, dtype) in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return client.infer(model, inputs, model_version=version)


def test_fused_ranker_scores_equal_in_process(client, built, artifacts):
    version = artifacts.manifest["models"]["fused_ranker"]
    local = torch.jit.load(str(built[1] / "fused_ranker" / version / "model.pt")).eval()
    rng = np.random.default_rng(1)
    n = artifacts.manifest["counts"]["items"]
    for history_len in (0, 7, 80):
        history = rng.choice(n, history_len, replace=False).astype(np.int64)
        candidates = rng.choice(n, 300, replace=False).astype(np.int64)
        features = rng.random((300, 6), dtype=np.float32)
        served = _infer(client, "fused_ranker", version, {
            "history": (history, "INT64"), "candidates": (candidates, "INT64"),
            "features": (features, "FP32")}).as_numpy("scores")
        with torch.inference_mode():
            expected = local(torch.from_numpy(history), torch.from_numpy(candidates),
                             torch.from_numpy(features), torch.zeros(0, 384),
                             torch.zeros(0, dtype=torch.int64)).numpy()
        np.testing.assert_allclose(served, expected, atol=1e-4)


def test_fused_ranker_scores_online_items_like_in_process(client, built, artifacts):
    version = artifacts.manifest["models"]["fused_ranker"]
    local = torch.jit.load(str(built[1] / "fused_ranker" / version / "model.pt")).eval()
    n = artifacts.manifest["counts"]["items"]
    rng = np.random.default_rng(2)
    extra_text = rng.normal(size=(3, 384)).astype(np.float32)
    extra_text /= np.linalg.norm(extra_text, axis=1, keepdims=True)
    extra_category = np.array([1, 0, 2], np.int64)
    history = np.array([1, 2, n + 2], np.int64)          # the user clicked an online item too
    candidates = np.array([5, n, n + 1, 7], np.int64)
    features = rng.random((4, 6), dtype=np.float32)
    served = _infer(client, "fused_ranker", version, {
        "history": (history, "INT64"), "candidates": (candidates, "INT64"), "features": (features, "FP32"),
        "extra_text": (extra_text, "FP32"), "extra_category": (extra_category, "INT64")}).as_numpy("scores")
    with torch.inference_mode():
        expected = local(*(torch.from_numpy(a) for a in (history, candidates, features, extra_text,
                                                          extra_category))).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-4)


def test_fused_ranker_rejects_out_of_range_ids(client, artifacts):
    n = artifacts.manifest["counts"]["items"]
    with pytest.raises(InferenceServerException, match="candidates: item index out of range"):
        _infer(client, "fused_ranker", artifacts.manifest["models"]["fused_ranker"], {
            "history": (np.zeros(0, np.int64), "INT64"), "candidates": (np.array([n], np.int64), "INT64"),
            "features": (np.zeros((1, 6), np.float32), "FP32")})


def test_text_encoder_equals_offline_encoder(client, artifacts):
    from offline.text_encoder import TextEncoder
    texts = ["Toy Story (1995). Genres: Adventure, Animation.", "A quiet documentary about the sea", "x"]
    served = _infer(client, "text_encoder", artifacts.manifest["models"]["text_encoder"], {
        "text": (np.array([t.encode() for t in texts], dtype=object), "BYTES")}).as_numpy("embedding")
    expected = TextEncoder().encode(texts)
    assert served.shape == expected.shape == (3, 384)
    np.testing.assert_allclose(served, expected, atol=1e-4)

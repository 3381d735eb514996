"""retrieval/seq_encoder.py: the Triton call's budget is a bounded share of the deadline, and any
failure gives no vector (the channel is skipped) instead of an error."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from common.metrics import DEGRADED
from protos import fusionrec_pb2 as pb
from retrieval.seq_encoder import SeqEncoderClient


class FakeResult:
    def __init__(self, array):
        self.array = array

    def as_numpy(self, name):
        assert name == "vector"
        return self.array


class FakeTriton:
    """Records each infer call; answers with `answer` (an array, or an exception to raise)."""

    def __init__(self, answer):
        self.answer = answer
        self.calls = []

    async def infer(self, model, inputs, model_version, outputs, client_timeout, headers=None):
        self.calls.append({"model": model, "version": model_version, "timeout": client_timeout,
                           "shape": inputs[0].shape(), "dtype": inputs[0].datatype()})
        if isinstance(self.answer, Exception):
            raise self.answer
        return FakeResult(self.answer)


def _client(answer, cap_s=0.02, share=0.4):
    fake = FakeTriton(answer)
    client = SeqEncoderClient(fake, cap_s, share)
    client.versions["7"] = "7"
    return client, fake


def _degraded() -> float:
    return DEGRADED.labels("retrieval", "sequential_unavailable")._value.get()


def test_the_vector_goes_to_the_sequential_channel_with_one_user_per_request():
    client, fake = _client(np.arange(4, dtype=np.float32)[None])
    encoded, ms = asyncio.run(client.encoded("7", np.array([3, 1, 2], np.int64), 0.1))
    assert list(encoded) == ["sequential"] and encoded["sequential"].tolist() == [0, 1, 2, 3]
    assert ms is not None and ms >= 0
    assert fake.calls == [{"model": "seq_encoder", "version": "7", "timeout": pytest.approx(0.02),
                           "shape": [1, 3], "dtype": "INT64"}]


def test_the_timeout_is_a_share_of_the_remaining_deadline_capped():
    client, fake = _client(np.zeros((1, 4), np.float32), cap_s=0.02, share=0.4)
    for remaining, want in ((0.01, 0.004), (1.0, 0.02), (None, 0.02)):
        asyncio.run(client.encoded("7", np.array([1], np.int64), remaining))
        assert fake.calls[-1]["timeout"] == pytest.approx(want)


@pytest.mark.parametrize("answer", [InferenceServerException("deadline", status="StatusCode.DEADLINE_EXCEEDED"),
                                    InferenceServerException("unavailable", status="StatusCode.UNAVAILABLE"),
                                    np.full((1, 4), np.nan, np.float32), np.zeros((2, 4), np.float32)])
def test_a_failure_or_a_bad_answer_gives_no_vector_and_is_counted(answer):
    client, fake = _client(answer)
    before = _degraded()
    encoded, _ = asyncio.run(client.encoded("7", np.array([1, 2], np.int64), 0.1))
    assert encoded == {} and len(fake.calls) == 1
    assert _degraded() == before + 1


def test_no_call_without_an_encoder_version_or_without_time_left():
    client, fake = _client(np.zeros((1, 4), np.float32))
    assert asyncio.run(client.encoded("8", np.array([1], np.int64), 0.1)) == ({}, None)   # no seq_encoder in 8
    assert asyncio.run(client.encoded("7", np.array([1], np.int64), 0.0001)) == ({}, None)
    assert fake.calls == []
    none = SeqEncoderClient(None, 0.02, 0.4)   # no --triton-url
    none.versions["7"] = "7"
    assert asyncio.run(none.encoded("7", np.array([1], np.int64), 0.1)) == ({}, None)


# -- in the retrieval servicer: the vector reaches the channel; without it the channel is skipped

def _servicer_with_sequential(tiny_artifacts, answer, dim: int = 4):
    """A retrieval servicer over the tiny set plus a sequential channel (flat inner-product index
    over seeded item vectors, a seeded content projection), its vector from a fake Triton."""
    import faiss

    from common.components import load_retriever
    from common.versions import VersionSet
    from core.channels import SequentialChannel
    from core.retriever import Retriever
    from retrieval.server import RetrievalServicer

    base = load_retriever(tiny_artifacts)
    rng = np.random.default_rng(5)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    index.add_with_ids(rng.normal(size=(base.n_items, dim)).astype(np.float32), np.arange(base.n_items))
    proj = (rng.normal(size=(base.text_dim, dim)).astype(np.float32), np.zeros(dim, np.float32))
    retriever = Retriever(base.version, base.bert, base.cf, base.popular, base.overlay,
                          {**base.quotas, "sequential": 20},
                          extra=[*base.channels[3:], SequentialChannel(index, None, text_proj=proj)])
    versions: VersionSet[Retriever] = VersionSet()
    versions.add(retriever.version, retriever)
    client, fake = _client(answer)
    client.versions.clear()
    client.versions[retriever.version] = "1"
    follower = type("Follower", (), {"applied_seq": 0})()   # nothing to catch up on
    return RetrievalServicer(versions, follower, 50, client), retriever, fake, proj


def _retrieve(servicer, remaining=0.2):
    from protos import fusionrec_pb2 as pb
    from tests.tiny_artifacts import FakeServicerContext
    context = FakeServicerContext(remaining)
    request = pb.RetrieveRequest(user_id="u", history=[1, 2, 3], num_candidates=30)
    return asyncio.run(servicer.Retrieve(request, context)), context


def _ranked(response, channel="sequential") -> int:
    column = next((c for c in response.candidates.channels if c.channel == channel), None)
    return 0 if column is None else sum(1 for r in column.ranks if r > 0)


def test_retrieve_puts_the_triton_vector_in_the_query(tiny_artifacts):
    servicer, _, fake, _ = _servicer_with_sequential(tiny_artifacts, np.ones((1, 4), np.float32))
    response, context = _retrieve(servicer)
    assert context.code() is None and "sequential" not in response.skipped_channels
    assert _ranked(response) > 0 and "seq_encoder" in response.stage_ms and list(response.reasons) == []
    assert fake.calls[0]["shape"] == [1, 3] and fake.calls[0]["timeout"] == pytest.approx(0.02)


@pytest.mark.parametrize("answer", [InferenceServerException("deadline", status="StatusCode.DEADLINE_EXCEEDED"),
                                    np.zeros((1, 0), np.float32)])   # a history the encoder knows nothing of
def test_retrieve_without_a_vector_answers_and_names_the_channel_skipped(tiny_artifacts, answer):
    servicer, _, _, _ = _servicer_with_sequential(tiny_artifacts, answer)
    response, context = _retrieve(servicer)
    assert context.code() is None and len(response.candidates.items) == 30
    assert "sequential" in response.skipped_channels and _ranked(response) == 0
    # A failed call degrades the answer (the caller sees it); an empty vector is nothing to do.
    failed = isinstance(answer, Exception)
    assert [pb.DegradedReason.Name(r) for r in response.reasons] == \
        (["DEGRADED_REASON_SEQUENTIAL_UNAVAILABLE"] if failed else [])


def test_a_version_without_an_encoder_is_not_degraded_by_its_absence(tiny_artifacts):
    servicer, retriever, fake, _ = _servicer_with_sequential(tiny_artifacts, np.ones((1, 4), np.float32))
    servicer.seq_encoder.versions.clear()   # this version's manifest names no seq_encoder
    response, context = _retrieve(servicer)
    assert context.code() is None and fake.calls == [] and list(response.reasons) == []


def test_warm_up_calls_the_versions_encoder_before_it_serves_and_counts_no_failure():
    client, fake = _client(np.ones((1, 4), np.float32))
    before = _degraded()
    assert asyncio.run(client.warm_up("7", 100)) == 5
    assert [c["shape"] for c in fake.calls] == [[1, 20]] * 5 and fake.calls[0]["timeout"] == 30.0
    assert asyncio.run(client.warm_up("8", 100)) == 0 and len(fake.calls) == 5   # no encoder for "8"
    down, down_fake = _client(InferenceServerException("unavailable", status="StatusCode.UNAVAILABLE"))
    assert asyncio.run(down.warm_up("7", 100)) == 0 and len(down_fake.calls) == 1   # stops at the first failure
    assert _degraded() == before


def test_online_items_join_the_sequential_index_through_the_content_path(tiny_artifacts):
    from core.item_records import ItemOp, ItemRecord
    _, retriever, _, (weight, bias) = _servicer_with_sequential(tiny_artifacts, np.ones((1, 4), np.float32))
    sequential = retriever.generator.channels["sequential"]
    before = sequential.index.ntotal
    text = np.random.default_rng(6).normal(size=retriever.text_dim).astype(np.float32)
    text /= np.linalg.norm(text)
    retriever.apply([ItemRecord(ItemOp.UPSERT, "new-item", title="t", text="x", category="category1",
                                vector=text, seq=1)])
    new = retriever.n_items   # the first online item's index
    assert sequential.index.ntotal == before + 1
    np.testing.assert_allclose(sequential.index.reconstruct(new), text @ weight + bias, rtol=1e-5, atol=1e-5)

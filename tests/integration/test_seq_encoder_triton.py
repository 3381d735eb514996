"""The sequential encoder served by Triton equals the in-process TorchScript model, and retrieval
degrades without it: a frozen or stopped Triton skips the sequential channel, never the call.

The first tests export a seeded, untrained SeqEncoder with the build's own export
(publish_seq_encoder) and serve it from a Triton of their own; the last ones run a stack on the
real small build (its seq_encoder) and stop its Triton.
"""
from __future__ import annotations

import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from common.pki import ensure_pki
from common.security import Security
from common.triton import triton_command
from core.features import SEQ_ENCODER_NAME
from offline.serving.export import load_seq_encoder, publish_seq_encoder
from offline.serving.seq_encoder import SeqEncoder, script_encoder
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc
from tools.stack import Stack, free_port

pytestmark = pytest.mark.integration
N_ITEMS = 40


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(client, in-process scripted encoder): a seeded SeqEncoder published as version 1 of a
    model repository holding only seq_encoder, served by its own Triton (mTLS, operator cert)."""
    root = tmp_path_factory.mktemp("seq-triton")
    torch.manual_seed(3)
    model = SeqEncoder(N_ITEMS, dim=16, max_history=8, layers=1, heads=2)
    with torch.no_grad():
        model.item_vectors.copy_(torch.randn(N_ITEMS, 16))
    local = script_encoder(model, root / "seq_encoder.pt")
    publish_seq_encoder(root / "model_repository", root / "seq_encoder.pt", 1)
    pki = ensure_pki(root / "pki")
    grpc_port = free_port()
    argv, env = triton_command(root / "model_repository", grpc_port, free_port(), models=[SEQ_ENCODER_NAME],
                               security=Security(pki.service_ca, pki.cert("triton"), pki.key("triton")))
    log_path = root / "triton.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    operator = Security(pki.service_ca, pki.cert("operator"), pki.key("operator"))
    client = triton.InferenceServerClient(f"127.0.0.1:{grpc_port}", **operator.triton_client_kwargs())
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.is_model_ready(SEQ_ENCODER_NAME, "1"):
                    break
            except InferenceServerException:
                pass
            assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        yield client, local
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=30)


def _encode(client, history: np.ndarray, version: str = "1") -> np.ndarray:
    array = np.asarray(history, np.int64).reshape(1, -1)
    tensor = triton.InferInput("history", list(array.shape), "INT64")
    tensor.set_data_from_numpy(array)
    out = client.infer(SEQ_ENCODER_NAME, [tensor], model_version=version).as_numpy("vector")
    assert out.shape[0] == 1 and out.dtype == np.float32
    return out[0]


def _local(module, history: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module(torch.from_numpy(np.asarray(history, np.int64))).numpy()


HISTORIES = {
    "empty": [],
    "one": [3],
    "short": [5, 1, 7, 7, 2],
    "longer than the window": list(range(N_ITEMS))[::-1][:20],
    "out of range mixed in": [-1, 4, N_ITEMS, 9, N_ITEMS + 100, 2],
    "only out of range": [N_ITEMS, N_ITEMS + 1, -5],
}


@pytest.mark.parametrize("name", sorted(HISTORIES))
def test_triton_vector_equals_the_in_process_model(served, name):
    client, local = served
    history = np.array(HISTORIES[name], np.int64)
    got, want = _encode(client, history), _local(local, history)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)
    if name in ("empty", "only out of range"):
        assert got.shape == (0,)   # nothing known in the history: no vector (the channel is skipped)
    else:
        assert got.shape == (16,) and np.abs(got).sum() > 0


def test_concurrent_requests_batched_together_each_get_their_own_vector(served):
    client, local = served
    rng = np.random.default_rng(4)
    histories = [rng.integers(0, N_ITEMS, size=int(n)) for n in rng.integers(1, 30, size=24)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda h: _encode(client, h), histories))
    for history, vector in zip(histories, got):
        np.testing.assert_allclose(vector, _local(local, history), atol=1e-5)


def test_bad_input_is_refused_naming_the_input(served):
    client, _ = served
    with pytest.raises(InferenceServerException, match=r"history: 1001 items exceeds the limit of 1000"):
        _encode(client, np.zeros(1001, np.int64))
    two_users = np.zeros((2, 3), np.int64)   # a request carries one user
    tensor = triton.InferInput("history", list(two_users.shape), "INT64")
    tensor.set_data_from_numpy(two_users)
    with pytest.raises(InferenceServerException, match=r"one user per request"):
        client.infer(SEQ_ENCODER_NAME, [tensor], model_version="1")
    np.testing.assert_allclose(_encode(client, [1, 2]), _local(served[1], np.array([1, 2])), atol=1e-5)


# -- on the real build: retrieval asks Triton, and goes on without it

@pytest.fixture(scope="module")
def own_stack(built, tmp_path_factory):
    """A stack of this module's own (its Triton is frozen, then stopped)."""
    with Stack(*built, tmp_path_factory.mktemp("seq-run")) as running:
        yield running


def _history(artifacts, min_len: int = 10) -> list[int]:
    with np.load(artifacts.path("user_history.npz")) as z:
        offsets, items = z["offsets"], z["items"]
    lengths = np.diff(offsets)
    j = int(np.argmax(lengths >= min_len))
    return items[offsets[j]:offsets[j + 1]].tolist()


def _sequential_ranked(response: pb.RetrieveResponse) -> int:
    """How many merged candidates the sequential channel ranked (rank > 0)."""
    column = next((c for c in response.candidates.channels if c.channel == "sequential"), None)
    return 0 if column is None else sum(1 for r in column.ranks if r > 0)


def _retrieve(stack, history: list[int], timeout: float = 2.0) -> pb.RetrieveResponse:
    with stack.channel("retrieval") as channel:
        return pb_grpc.RetrievalStub(channel).Retrieve(
            pb.RetrieveRequest(user_id="seq-test", history=history, num_candidates=100), timeout=timeout)


def test_built_seq_encoder_on_triton_equals_in_process(own_stack, built, artifacts):
    version = artifacts.manifest["models"][SEQ_ENCODER_NAME]
    local = load_seq_encoder(built[1], version)
    n = artifacts.manifest["counts"]["items"]
    client = own_stack.triton_client()
    try:
        for history in ([], _history(artifacts), [n + 3, 1, -1, 2], list(range(0, n, max(n // 70, 1)))):
            history = np.array(history, np.int64)
            np.testing.assert_allclose(_encode(client, history, version), _local(local, history), atol=1e-4)
    finally:
        client.close()


def test_retrieve_uses_the_vector_and_skips_the_channel_without_triton(own_stack, artifacts):
    history = _history(artifacts)
    up = _retrieve(own_stack, history)
    assert "sequential" not in up.skipped_channels and list(up.reasons) == []
    assert SEQ_ENCODER_NAME in up.stage_ms            # the Triton hop was made
    assert _sequential_ranked(up) > 0                 # and its vector found candidates

    triton_proc = own_stack.processes["triton"].popen
    triton_proc.send_signal(signal.SIGSTOP)          # frozen: the call times out inside the deadline
    try:
        frozen = [_retrieve(own_stack, history, timeout=1.0) for _ in range(3)]
    finally:
        triton_proc.send_signal(signal.SIGCONT)
    for response in frozen:   # answered inside a 1 s deadline although Triton never replies
        assert "sequential" in response.skipped_channels
        assert list(response.reasons) == [pb.DegradedReason.DEGRADED_REASON_SEQUENTIAL_UNAVAILABLE]
        assert _sequential_ranked(response) == 0
        assert len(response.candidates.items) == 100   # the other channels still fill the list

    own_stack.kill("triton")                          # stopped: unavailable
    down = _retrieve(own_stack, history)
    assert "sequential" in down.skipped_channels and _sequential_ranked(down) == 0
    assert list(down.reasons) == [pb.DegradedReason.DEGRADED_REASON_SEQUENTIAL_UNAVAILABLE]
    assert len(down.candidates.items) == 100

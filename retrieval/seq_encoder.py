"""The sequential channel's query vector, computed by the `seq_encoder` model on Triton.

Retrieval asks Triton once per Retrieve, before the channels run, with the user's history (item
indices, oldest first) and puts the vector in RetrievalQuery.encoded["sequential"]. The call gets a
bounded share of the caller's remaining deadline (never more than the configured cap); on any
failure or timeout the answer is None and retrieval runs without the channel (it comes back empty
and is named in skipped_channels, and the answer carries SEQUENTIAL_UNAVAILABLE, so the caller sees
it is degraded): a Triton problem degrades the answer, never fails the call. Each loaded version's
encoder is called a few times before that version serves (warm_up): the first TorchScript calls
after a load run past the 20 ms cap, and were skipped silently.
"""
from __future__ import annotations

import time

import grpc
import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from common.logs import get_logger
from common.metrics import DEGRADED
from common.tracing import outgoing_headers
from core.channel_names import ChannelName
from core.features import SEQ_ENCODER_INPUTS, SEQ_ENCODER_NAME, SEQ_ENCODER_OUTPUTS
from core.reasons import DegradedReason

log = get_logger("retrieval.seq_encoder")
SERVICE = "retrieval"
CHANNEL = ChannelName.SEQUENTIAL   # the channel the vector is for
MODEL = SEQ_ENCODER_NAME
(INPUT, DTYPE, _), = SEQ_ENCODER_INPUTS
(OUTPUT, _, _), = SEQ_ENCODER_OUTPUTS
MIN_TIMEOUT_S = 0.001         # less left than this: do not call at all
WARM_UP_CALLS = 5
WARM_UP_TIMEOUT_S = 30.0
WARM_UP_HISTORY = 20          # items in the warm-up call's history
LOG_EVERY_S = 10.0            # failures are logged at most this often (with the count held back)


class SeqEncoderClient:
    """Shared by every loaded artifact version; `versions` maps an artifact version to the
    seq_encoder model version its manifest names (absent: that version has no encoder)."""

    def __init__(self, client, timeout_cap_s: float, deadline_share: float) -> None:
        self.client = client   # tritonclient.grpc.aio.InferenceServerClient, or None (no Triton configured)
        self.timeout_cap_s = timeout_cap_s
        self.deadline_share = deadline_share
        self.versions: dict[str, str] = {}
        self._outputs = [InferRequestedOutput(OUTPUT)]
        self._failures = 0
        self._logged_at = 0.0

    def expects(self, artifact_version: str) -> bool:
        """Whether this version's answers should have the sequential channel."""
        return self.client is not None and bool(self.versions.get(artifact_version))

    def missing(self, artifact_version: str, encoded: dict[str, np.ndarray]) -> bool:
        """Whether encoded() failed for a version that has an encoder (the answer is degraded);
        an empty vector (a history the encoder knows nothing of) is nothing to do, not a failure."""
        return self.expects(artifact_version) and CHANNEL not in encoded

    async def warm_up(self, artifact_version: str, n_items: int) -> int:
        """Call the version's encoder WARM_UP_CALLS times with a seeded history before it serves
        (no failure is counted: Triton may still be loading); returns the calls answered."""
        if not self.expects(artifact_version) or n_items <= 0:
            return 0
        history = np.random.default_rng(0).choice(n_items, size=min(WARM_UP_HISTORY, n_items), replace=False)
        answered = 0
        for _ in range(WARM_UP_CALLS):
            try:
                await self._call(self.versions[artifact_version], history, WARM_UP_TIMEOUT_S)
                answered += 1
            except (InferenceServerException, grpc.RpcError) as e:
                log.warning("seq_encoder warm-up failed", extra={"version": artifact_version, "error": str(e)[:200]})
                break
        return answered

    def timeout_s(self, remaining_s: float | None) -> float:
        """The call's budget: a share of what the caller has left, capped."""
        if remaining_s is None:
            return self.timeout_cap_s
        return min(self.timeout_cap_s, self.deadline_share * max(remaining_s, 0.0))

    async def encoded(self, artifact_version: str, history: np.ndarray,
                      remaining_s: float | None) -> tuple[dict[str, np.ndarray], float | None]:
        """({"sequential": vector [D] float32}, the call's ms), or ({}, ...) when there is no
        encoder (ms None: no call) or the call failed."""
        if not self.expects(artifact_version):
            return {}, None
        timeout = self.timeout_s(remaining_s)
        if timeout < MIN_TIMEOUT_S:
            self._failed("no time left")
            return {}, None
        start = time.perf_counter()
        vector = await self._infer(self.versions[artifact_version], history, timeout)
        return ({CHANNEL: vector} if vector is not None else {}), (time.perf_counter() - start) * 1000.0

    async def _call(self, model_version: str, history: np.ndarray, timeout: float):
        """One infer call (raises what tritonclient raises)."""
        array = np.ascontiguousarray(history, np.int64)[None]   # batch dim: one user per request
        tensor = InferInput(INPUT, list(array.shape), DTYPE)
        tensor.set_data_from_numpy(array)
        return await self.client.infer(MODEL, [tensor], model_version=model_version, outputs=self._outputs,
                                       client_timeout=timeout, headers=outgoing_headers())

    async def _infer(self, model_version: str, history: np.ndarray, timeout: float) -> np.ndarray | None:
        try:
            vector = (await self._call(model_version, history, timeout)).as_numpy(OUTPUT)
        except InferenceServerException as e:
            self._failed((e.status() or "error").lower())
            return None
        except grpc.RpcError as e:   # what tritonclient does not wrap (a closing channel)
            self._failed(type(e).__name__)
            return None
        if vector is None or vector.ndim != 2 or vector.shape[0] != 1 or not np.isfinite(vector).all():
            self._failed("bad output")
            return None
        return vector[0].astype(np.float32, copy=False)

    def _failed(self, why: str) -> None:
        DEGRADED.labels(SERVICE, DegradedReason.SEQUENTIAL_UNAVAILABLE.value).inc()
        self._failures += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            log.warning("seq_encoder unavailable: the sequential channel is skipped",
                        extra={"reason": why[:60], "failures": self._failures})
            self._failures, self._logged_at = 0, now

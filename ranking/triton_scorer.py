"""TritonScorer: the fused ranker on Triton Inference Server, over tritonclient's asyncio gRPC client."""
from __future__ import annotations

import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from common.features import FUSED_RANKER_INPUTS, FUSED_RANKER_NAME, FUSED_RANKER_OUTPUTS


class ScorerUnavailable(RuntimeError):
    """Triton could not score in time (down, overloaded, model missing); the reason is a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class TritonScorer:
    def __init__(self, url: str, model_version: str, model_name: str = FUSED_RANKER_NAME) -> None:
        self.client = InferenceServerClient(url)
        self.model_name = model_name
        self.model_version = model_version
        self._outputs = [InferRequestedOutput(name) for name, _, _ in FUSED_RANKER_OUTPUTS]

    async def score(self, history: np.ndarray, candidates: np.ndarray, features: np.ndarray,
                    timeout_s: float) -> np.ndarray:
        """history [L] int64, candidates [N] int64, features [N, F] float32 -> scores [N] float32."""
        arrays = {"history": history.astype(np.int64), "candidates": candidates.astype(np.int64),
                  "features": features.astype(np.float32)}
        inputs = []
        for name, dtype, _ in FUSED_RANKER_INPUTS:
            tensor = InferInput(name, list(arrays[name].shape), dtype)
            tensor.set_data_from_numpy(arrays[name])
            inputs.append(tensor)
        try:
            result = await self.client.infer(self.model_name, inputs, model_version=self.model_version,
                                             outputs=self._outputs, client_timeout=max(timeout_s, 0.001))
        except InferenceServerException as e:
            status = (e.status() or "").upper()
            reason = "ranking_timeout" if "DEADLINE" in status else "triton_unavailable"
            raise ScorerUnavailable(reason, f"triton: {e.message()}") from e
        return result.as_numpy(FUSED_RANKER_OUTPUTS[0][0]).astype(np.float32)

    async def ready(self) -> bool:
        try:
            return await self.client.is_model_ready(self.model_name, self.model_version)
        except InferenceServerException:
            return False

    async def close(self) -> None:
        await self.client.close()

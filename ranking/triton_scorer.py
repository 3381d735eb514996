"""TritonScorer: the fused ranker on Triton Inference Server, over tritonclient's asyncio gRPC client."""
from __future__ import annotations

import json

import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from common.tracing import outgoing_headers
from core.reasons import DegradedReason
from core.scoring import ScorerUnavailable
from core.features import FUSED_RANKER_INPUTS, FUSED_RANKER_NAME, FUSED_RANKER_OUTPUTS


class TritonScorer:
    """core.scoring.Scorer on Triton: one user per request, Triton batches requests."""

    def __init__(self, client: InferenceServerClient, model_version: str, model_name: str = FUSED_RANKER_NAME) -> None:
        self.client = client   # shared by every loaded version
        self.model_name = model_name
        self.model_version = model_version
        self._outputs = [InferRequestedOutput(name) for name, _, _ in FUSED_RANKER_OUTPUTS]

    async def score(self, history: np.ndarray, candidates: np.ndarray, features: np.ndarray,
                    timeout_s: float, extra_text: np.ndarray | None = None,
                    extra_category: np.ndarray | None = None) -> np.ndarray:
        """history [L] int64, candidates [N] int64, features [N, F] float32 -> scores [N] float32.

        extra_text [M, Dt] / extra_category [M]: online items (indices >= the model's item count).
        """
        arrays = {"history": history.astype(np.int64), "candidates": candidates.astype(np.int64),
                  "features": features.astype(np.float32)}
        if extra_text is not None and len(extra_text):
            arrays["extra_text"] = extra_text.astype(np.float32)
            arrays["extra_category"] = np.asarray(extra_category, np.int64)
        inputs = []
        for name, dtype, _ in FUSED_RANKER_INPUTS:
            if name not in arrays:
                continue   # optional input
            array = arrays[name][None]   # batch dim: one user per request, Triton batches requests
            tensor = InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        try:
            result = await self.client.infer(self.model_name, inputs, model_version=self.model_version,
                                             outputs=self._outputs, client_timeout=max(timeout_s, 0.001),
                                             headers=outgoing_headers())   # traceparent + x-request-id
        except InferenceServerException as e:
            status = (e.status() or "").upper()
            reason = DegradedReason.RANKING_TIMEOUT if "DEADLINE" in status else DegradedReason.TRITON_UNAVAILABLE
            raise ScorerUnavailable(reason, f"triton: {e.message()}") from e
        return result.as_numpy(FUSED_RANKER_OUTPUTS[0][0])[0].astype(np.float32)

    async def ready(self) -> bool:
        try:
            return await self.client.is_model_ready(self.model_name, self.model_version)
        except InferenceServerException:
            return False


async def ensure_loaded(client: InferenceServerClient, models: dict[str, str],
                        keep: dict[str, set[str]] | None = None, headers: dict[str, str] | None = None) -> None:
    """Ask Triton (explicit model control) to load what a new artifact version needs.

    The load names the exact versions to hold: the new one plus those still serving (`keep`), so a
    swap never unloads a version that requests are still naming. Raises RuntimeError if the new
    version does not come up. headers: what Triton's restricted model-control API requires
    (common.triton.admin_headers).
    """
    keep = keep or {}
    for name, version in models.items():
        try:
            if await client.is_model_ready(name, version):
                continue
            config = (await client.get_model_config(name, as_json=True))["config"]
            versions = sorted({version, *keep.get(name, set())}, key=int)
            config["version_policy"] = {"specific": {"versions": [int(v) for v in versions]}}
            await client.load_model(name, config=json.dumps(config), headers=headers)
            ready = await client.is_model_ready(name, version)
        except InferenceServerException as e:
            raise RuntimeError(f"triton: loading {name} failed: {e.message()}") from e
        if not ready:
            raise RuntimeError(f"triton: {name} version {version} did not become ready")

"""Triton python-backend model: runs the exported TorchScript fused ranker (model.pt beside this file).

Inputs and outputs follow common/features.py (FUSED_RANKER_INPUTS/OUTPUTS); config.pbtxt is
generated from the same spec by the offline build. The python backend stub embeds the system
Python, so Triton's own venv site-packages (numpy<2, torch) are added to sys.path explicitly
from FUSIONREC_TRITON_SITE, which the launcher sets.
"""
import os
import sys

_site = os.environ.get("FUSIONREC_TRITON_SITE")
if _site and _site not in sys.path:
    sys.path.insert(0, _site)

import json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        torch.set_num_threads(int(params.get("torch_threads", "1")))
        self.max_candidates = int(params.get("max_candidates", "1000"))
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.model = torch.jit.load(os.path.join(folder, "model.pt")).eval()
        self.n_items = int(self.model.item_text.shape[0])
        self.text_dim = int(self.model.item_text.shape[1])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._score(request))
            except ValueError as e:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(str(e))))
        return responses

    def _score(self, request):
        history = pb_utils.get_input_tensor_by_name(request, "history").as_numpy().astype(np.int64)
        candidates = pb_utils.get_input_tensor_by_name(request, "candidates").as_numpy().astype(np.int64)
        features = pb_utils.get_input_tensor_by_name(request, "features").as_numpy().astype(np.float32)
        extra_text = pb_utils.get_input_tensor_by_name(request, "extra_text")
        extra_category = pb_utils.get_input_tensor_by_name(request, "extra_category")
        extra_text = (extra_text.as_numpy().astype(np.float32) if extra_text is not None
                      else np.zeros((0, self.text_dim), np.float32))
        extra_category = (extra_category.as_numpy().astype(np.int64) if extra_category is not None
                          else np.zeros(0, np.int64))
        if extra_text.ndim != 2 or extra_text.shape[1] != self.text_dim or len(extra_category) != len(extra_text):
            raise ValueError(f"extra_text: must be [M, {self.text_dim}] with M = len(extra_category)")
        if len(candidates) > self.max_candidates:
            raise ValueError(f"candidates: {len(candidates)} > max_candidates {self.max_candidates}")
        if features.shape[0] != len(candidates):
            raise ValueError(f"features: {features.shape[0]} rows for {len(candidates)} candidates")
        limit = self.n_items + len(extra_text)
        for name, ids in (("history", history), ("candidates", candidates)):
            if ids.size and (ids.min() < 0 or ids.max() >= limit):
                raise ValueError(f"{name}: item index out of range [0, {limit})")
        with torch.inference_mode():
            scores = self.model(torch.from_numpy(history), torch.from_numpy(candidates),
                                torch.from_numpy(features), torch.from_numpy(extra_text),
                                torch.from_numpy(extra_category)).numpy().astype(np.float32)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("scores", scores)])

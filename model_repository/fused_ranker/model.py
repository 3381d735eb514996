"""Triton python-backend model: runs the exported TorchScript fused ranker (model.pt beside this file).

Inputs and outputs follow common/features.py (FUSED_RANKER_INPUTS/OUTPUTS); config.pbtxt is
generated from the same spec by the offline build. The model is dynamically batched with ragged
inputs: each request is one user ([1, ...] tensors of its own sizes), and `execute` receives every
request the batcher gathered. Valid requests are scored together in one `forward_batch` call; a
request with bad input gets its own error and does not fail the others.

The python backend stub embeds the system Python, so Triton's own venv site-packages (numpy<2,
torch) are added to sys.path explicitly from FUSIONREC_TRITON_SITE, which the launcher sets.
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
        parsed, errors = [], {}
        for j, request in enumerate(requests):
            try:
                parsed.append((j, self._inputs(request)))
            except ValueError as e:
                errors[j] = str(e)
        scores = self._score_batch([inputs for _, inputs in parsed]) if parsed else []
        by_request = {j: s for (j, _), s in zip(parsed, scores)}
        return [pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(errors[j]))
                if j in errors else
                pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("scores", by_request[j][None, :])])
                for j in range(len(requests))]

    def _inputs(self, request):
        """One request's arrays without the batch dim, checked; raises ValueError naming the input."""
        def get(name, dtype, empty_shape):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                return np.zeros(empty_shape, dtype)
            array = tensor.as_numpy()
            if array.shape[0] != 1:
                raise ValueError(f"{name}: batch dimension must be 1 (one user per request), got {array.shape[0]}")
            return array[0].astype(dtype, copy=False)

        history = get("history", np.int64, (0,))
        candidates = get("candidates", np.int64, (0,))
        features = get("features", np.float32, (0, 0))
        extra_text = get("extra_text", np.float32, (0, self.text_dim))
        extra_category = get("extra_category", np.int64, (0,))
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
        return history, candidates, features, extra_text, extra_category

    def _score_batch(self, batch):
        """[(history, candidates, features, extra_text, extra_category)] -> [scores [N_b]]."""
        # Online items are numbered per request (n_items + row of its extra_text): shift each
        # request's numbers past the extra rows of the requests before it.
        shift, histories, candidates = 0, [], []
        for history, cands, _, extra_text, _ in batch:
            histories.append(np.where(history >= self.n_items, history + shift, history))
            candidates.append(np.where(cands >= self.n_items, cands + shift, cands))
            shift += len(extra_text)
        counts = [len(c) for c in candidates]
        with torch.inference_mode():
            scores = self.model.forward_batch(
                torch.from_numpy(np.concatenate(histories)),
                torch.tensor([len(h) for h in histories], dtype=torch.int64),
                torch.from_numpy(np.concatenate(candidates)),
                torch.tensor(counts, dtype=torch.int64),
                torch.from_numpy(np.concatenate([b[2] for b in batch])),
                torch.from_numpy(np.concatenate([b[3] for b in batch])),
                torch.from_numpy(np.concatenate([b[4] for b in batch]))).numpy().astype(np.float32)
        return np.split(scores, np.cumsum(counts)[:-1])

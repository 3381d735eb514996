"""Triton python-backend model: runs the exported TorchScript fused ranker (model.pt beside this file).

Written to model_repository/fused_ranker/<version>/model.py by offline/serving/export.py, with a
config.pbtxt generated from core/features.py (FUSED_RANKER_INPUTS/OUTPUTS). This file runs inside
Triton's own environment: it imports only numpy, torch and triton_python_backend_utils.
Input and output dtypes come from the model config; a config naming a feature spec version this
file does not know fails the load. The model is dynamically batched with ragged inputs: each
request is one user ([1, ...] tensors of its own sizes), and `execute` receives every request the
batcher gathered. Valid requests are scored together in one `forward_batch` call; a request with
bad input gets its own error and does not fail the others.

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

# The feature spec versions (core/features.py) whose inputs this code scores; tests check that the
# current one is listed, so bumping the spec means reviewing this file.
KNOWN_FEATURE_SPEC_VERSIONS = ("5",)
INPUTS = ("history", "candidates", "features", "extra_text", "extra_category")   # forward_batch order


class TritonPythonModel:
    def initialize(self, args):
        """Once per loaded version: check the config's spec version, read dtypes, load model.pt."""
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        spec = params.get("feature_spec_version")
        if spec not in KNOWN_FEATURE_SPEC_VERSIONS:
            raise ValueError(f"fused_ranker: config.pbtxt names feature_spec_version {spec!r}, this model.py "
                             f"knows {list(KNOWN_FEATURE_SPEC_VERSIONS)}: re-export the model (make artifacts)")
        self.dtypes = {name: pb_utils.triton_string_to_numpy(pb_utils.get_input_config_by_name(
            config, name)["data_type"]) for name in INPUTS}
        output = config["output"][0]
        self.output_name = output["name"]
        self.output_dtype = pb_utils.triton_string_to_numpy(output["data_type"])
        torch.set_num_threads(int(params.get("torch_threads", "1")))
        self.max_candidates = int(params.get("max_candidates", "1000"))
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.model = torch.jit.load(os.path.join(folder, "model.pt")).eval()
        self.n_items = int(self.model.item_text.shape[0])
        # A frozen model keeps only the projected text ([I, 0] item_text) and records its text_dim.
        self.text_dim = int(self.model.text_dim if hasattr(self.model, "text_dim") else self.model.item_text.shape[1])

    def execute(self, requests):
        """One batcher-gathered list of requests -> one response each, in order."""
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
                pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, by_request[j][None, :])])
                for j in range(len(requests))]

    def _inputs(self, request):
        """One request's arrays without the batch dim, checked; raises ValueError naming the input."""
        def get(name, empty_shape):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                return np.zeros(empty_shape, self.dtypes[name])
            array = tensor.as_numpy()
            if array.shape[0] != 1:
                raise ValueError(f"{name}: batch dimension must be 1 (one user per request), got {array.shape[0]}")
            return array[0].astype(self.dtypes[name], copy=False)

        history = get("history", (0,))
        candidates = get("candidates", (0,))
        features = get("features", (0, 0))
        extra_text = get("extra_text", (0, self.text_dim))
        extra_category = get("extra_category", (0,))
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
                torch.from_numpy(np.concatenate([b[4] for b in batch]))).numpy().astype(self.output_dtype)
        return np.split(scores, np.cumsum(counts)[:-1])

"""Triton python-backend model: the sequential user encoder (TorchScript seq_encoder.pt beside this file).

Written to model_repository/seq_encoder/<version>/model.py by offline/serving/export.py, with a
config.pbtxt from core/features.py (SEQ_ENCODER_INPUTS/OUTPUTS). Retrieval sends one user's recent
history (item indices, oldest first) and gets the query vector its sequential channel searches
FAISS with. This file runs inside Triton's own environment: it imports only numpy, torch and
triton_python_backend_utils. Dtypes come from the model config. Dynamically batched with a ragged
input: each request is one user ([1, L]); `execute` gets every request the batcher gathered and
answers each on its own, so a request with bad input gets its own error and the others their
vectors. Index values are the model's business (it maps unknown / online indices itself, exactly as
in process); the shape and length are checked here.
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

WEIGHTS = "seq_encoder.pt"
# The config carries no feature spec version today (the input is raw item indices); one it names
# must be known (tests check the current one is listed).
KNOWN_FEATURE_SPEC_VERSIONS = ("5",)


class TritonPythonModel:
    def initialize(self, args):
        """Once per loaded version: check the config, read dtypes and limits, load seq_encoder.pt."""
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        spec = params.get("feature_spec_version")
        if spec is not None and spec not in KNOWN_FEATURE_SPEC_VERSIONS:
            raise ValueError(f"seq_encoder: config.pbtxt names feature_spec_version {spec!r}, this model.py "
                             f"knows {list(KNOWN_FEATURE_SPEC_VERSIONS)}: re-export the model (make artifacts)")
        spec_input = config["input"][0]
        self.input_name = spec_input["name"]
        self.input_dtype = pb_utils.triton_string_to_numpy(spec_input["data_type"])
        output = config["output"][0]
        self.output_name = output["name"]
        self.output_dtype = pb_utils.triton_string_to_numpy(output["data_type"])
        torch.set_num_threads(int(params.get("torch_threads", "1")))
        self.max_history = int(params.get("max_history", "1000"))
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.model = torch.jit.load(os.path.join(folder, WEIGHTS)).eval()

    def execute(self, requests):
        """One batcher-gathered list of requests -> one response each, in order."""
        responses = []
        for request in requests:
            try:
                vector = self._encode(self._history(request))
            except ValueError as e:   # bad input: this request's error only
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))))
                continue
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(self.output_name, vector[None, :])]))
        return responses

    def _history(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
        if tensor is None:
            raise ValueError(f"{self.input_name}: missing")
        array = tensor.as_numpy()
        if array.ndim != 2 or array.shape[0] != 1:
            raise ValueError(f"{self.input_name}: must be [1, L] (one user per request), got {list(array.shape)}")
        if array.shape[1] > self.max_history:
            raise ValueError(f"{self.input_name}: {array.shape[1]} items exceeds the limit of {self.max_history}")
        return np.ascontiguousarray(array[0].astype(self.input_dtype, copy=False))

    def _encode(self, history):
        try:
            with torch.inference_mode():
                return self.model(torch.from_numpy(history)).numpy().astype(self.output_dtype).reshape(-1)
        except RuntimeError as e:   # the scripted model refused the input (TorchScript raises RuntimeError)
            raise ValueError(f"{self.input_name}: the encoder refused this history") from e

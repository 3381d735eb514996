"""Triton python-backend model: BERT-family text encoder (mean pooling, L2-normalized).

Written to model_repository/text_encoder/<version>/model.py by offline/serving/export.py; the
version folder holds the transformers model files in model/ (copied by the export), so Triton
never reaches a hub. Same pooling and max_length as offline/text_encoder.py, so a vector computed
online for a new item equals the one the offline build would compute. This file runs inside
Triton's own environment: it imports only numpy, torch, transformers and triton_python_backend_utils.
The output dtype comes from the model config; a config naming a feature spec version this file
does not know fails the load.
"""
import os
import sys

_site = os.environ.get("FUSIONREC_TRITON_SITE")
if _site and _site not in sys.path:
    sys.path.insert(0, _site)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

MAX_TEXTS = 256
# Texts are raw: the config carries no feature spec version today; one it names must be known.
KNOWN_FEATURE_SPEC_VERSIONS = ("5",)


class TritonPythonModel:
    def initialize(self, args):
        """Once per loaded version: check the config, read the output dtype, load the encoder files."""
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        spec = params.get("feature_spec_version")
        if spec is not None and spec not in KNOWN_FEATURE_SPEC_VERSIONS:
            raise ValueError(f"text_encoder: config.pbtxt names feature_spec_version {spec!r}, this model.py "
                             f"knows {list(KNOWN_FEATURE_SPEC_VERSIONS)}: re-export the model (make artifacts)")
        self.input_name = config["input"][0]["name"]
        output = config["output"][0]
        self.output_name = output["name"]
        self.output_dtype = pb_utils.triton_string_to_numpy(output["data_type"])
        torch.set_num_threads(int(params.get("torch_threads", "1")))
        self.max_length = int(params["max_length"])
        folder = os.path.join(args["model_repository"], args["model_version"], "model")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()

    def execute(self, requests):
        """Each request: texts [n] (bytes) -> embeddings [n, dim]; over MAX_TEXTS gets an error."""
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().reshape(-1)
            if len(raw) > MAX_TEXTS:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                    f"{self.input_name}: {len(raw)} texts exceeds the limit of {MAX_TEXTS}")))
                continue
            texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in raw]
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(self.output_name, self._encode(texts))]))
        return responses

    @torch.inference_mode()
    def _encode(self, texts):
        if not texts:
            return np.zeros((0, self.model.config.hidden_size), self.output_dtype)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(self.output_dtype)

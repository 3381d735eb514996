"""Triton python-backend model: BERT-family text encoder (mean pooling, L2-normalized).

The version folder holds the transformers model files in model/ (copied by the offline build),
so Triton never reaches a hub. Same pooling and max_length as offline/text_encoder.py, so a
vector computed online for a new item equals the one the offline build would compute.
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


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        torch.set_num_threads(int(params.get("torch_threads", "1")))
        self.max_length = int(params["max_length"])
        folder = os.path.join(args["model_repository"], args["model_version"], "model")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()

    def execute(self, requests):
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)
            if len(raw) > MAX_TEXTS:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                    f"text: {len(raw)} texts exceeds the limit of {MAX_TEXTS}")))
                continue
            texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in raw]
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("embedding", self._encode(texts))]))
        return responses

    @torch.inference_mode()
    def _encode(self, texts):
        if not texts:
            return np.zeros((0, self.model.config.hidden_size), np.float32)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float32)

"""config.pbtxt of each served model, built as Triton's ModelConfig protobuf from the spec in
core/features.py (tritonclient ships the message: tritonclient.grpc.model_config_pb2)."""
from __future__ import annotations

import os
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from core.features import (FEATURE_SPEC_VERSION, FUSED_RANKER_INPUTS, FUSED_RANKER_MAX_BATCH,
                           FUSED_RANKER_MAX_CANDIDATES, FUSED_RANKER_NAME, FUSED_RANKER_OUTPUTS,
                           FUSED_RANKER_QUEUE_DELAY_US, MODEL_VERSIONS_KEPT, OPTIONAL_INPUTS,
                           SEQ_ENCODER_INPUTS, SEQ_ENCODER_NAME, SEQ_ENCODER_OUTPUTS,
                           TEXT_ENCODER_INPUTS, TEXT_ENCODER_NAME, TEXT_ENCODER_OUTPUTS, TensorSpec)
from core.limits import MAX_RETRIEVE_HISTORY


def fused_ranker_config(max_candidates: int = FUSED_RANKER_MAX_CANDIDATES, threads: int = 1,
                        max_batch: int = FUSED_RANKER_MAX_BATCH,
                        queue_delay_us: int = FUSED_RANKER_QUEUE_DELAY_US) -> mc.ModelConfig:
    config = _python_model(FUSED_RANKER_NAME, max_batch, threads)
    # Ragged: requests with different history / candidate counts still share a batch.
    config.input.extend(_tensor(mc.ModelInput, spec, ragged=True) for spec in FUSED_RANKER_INPUTS)
    config.output.extend(_tensor(mc.ModelOutput, spec) for spec in FUSED_RANKER_OUTPUTS)
    config.dynamic_batching.SetInParent()   # present even with the default (0) delay: batching on
    config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    _parameters(config, feature_spec_version=FEATURE_SPEC_VERSION, max_candidates=max_candidates)
    return config


def text_encoder_config(max_length: int, threads: int = 1) -> mc.ModelConfig:
    """max_length must match the offline encoder's."""
    config = _python_model(TEXT_ENCODER_NAME, 0, threads)
    config.input.extend(_tensor(mc.ModelInput, spec) for spec in TEXT_ENCODER_INPUTS)
    config.output.extend(_tensor(mc.ModelOutput, spec) for spec in TEXT_ENCODER_OUTPUTS)
    _parameters(config, max_length=max_length)
    return config


# seq_encoder: one user's history per request; requests queued while an execution runs share the next.
SEQ_ENCODER_MAX_BATCH = 16
SEQ_ENCODER_QUEUE_DELAY_US = 0


def seq_encoder_config(threads: int = 1, max_batch: int = SEQ_ENCODER_MAX_BATCH,
                       queue_delay_us: int = SEQ_ENCODER_QUEUE_DELAY_US) -> mc.ModelConfig:
    """The sequential user encoder (retrieval's sequential channel): history [1, L] -> vector [1, D]."""
    config = _python_model(SEQ_ENCODER_NAME, max_batch, threads)
    config.input.extend(_tensor(mc.ModelInput, spec, ragged=True) for spec in SEQ_ENCODER_INPUTS)
    config.output.extend(_tensor(mc.ModelOutput, spec) for spec in SEQ_ENCODER_OUTPUTS)
    config.dynamic_batching.SetInParent()
    config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    _parameters(config, max_history=MAX_RETRIEVE_HISTORY)   # retrieval never sends more (core/limits.py)
    return config


def write_config(config: mc.ModelConfig, model_root: Path) -> Path:
    """model_root/config.pbtxt, replaced atomically (Triton may be reading the old one)."""
    path = Path(model_root) / "config.pbtxt"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text_format.MessageToString(config))
    os.replace(tmp, path)
    return path


def read_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())


def _python_model(name: str, max_batch: int, threads: int) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=max_batch)
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    # Two versions: the one serving and the one being swapped in (hot swap without failures).
    config.version_policy.latest.num_versions = MODEL_VERSIONS_KEPT
    _parameters(config, torch_threads=threads)
    return config


def _tensor(kind: type, spec: TensorSpec, ragged: bool = False):
    name, dtype, dims = spec
    tensor = kind(name=name, data_type=_data_type(dtype), dims=dims)
    if name in OPTIONAL_INPUTS:
        tensor.optional = True
    if ragged:
        tensor.allow_ragged_batch = True
    return tensor


def _data_type(dtype: str) -> int:
    # The spec uses the wire names (InferInput's); config.pbtxt spells BYTES tensors TYPE_STRING.
    return mc.DataType.Value("TYPE_STRING" if dtype == "BYTES" else f"TYPE_{dtype}")


def _parameters(config: mc.ModelConfig, **values: object) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = str(value)

"""config.pbtxt is written as Triton's ModelConfig protobuf and means what the hand-written
f-string config meant before it (the golden texts below are that writer's output)."""
from __future__ import annotations

import ast
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from core.features import FEATURE_SPEC_VERSION
from offline.serving.export import TRITON_MODELS
from offline.serving.triton_config import (fused_ranker_config, read_config, seq_encoder_config, text_encoder_config,
                                           write_config)

FUSED_RANKER_BEFORE = """name: "fused_ranker"
backend: "python"
max_batch_size: 16
input [
  { name: "history" data_type: TYPE_INT64 dims: [ -1 ] allow_ragged_batch: true },
  { name: "candidates" data_type: TYPE_INT64 dims: [ -1 ] allow_ragged_batch: true },
  { name: "features" data_type: TYPE_FP32 dims: [ -1, 10 ] allow_ragged_batch: true },
  { name: "extra_text" data_type: TYPE_FP32 dims: [ -1, -1 ] optional: true allow_ragged_batch: true },
  { name: "extra_category" data_type: TYPE_INT64 dims: [ -1 ] optional: true allow_ragged_batch: true }
]
output [
  { name: "scores" data_type: TYPE_FP32 dims: [ -1 ] }
]
dynamic_batching { max_queue_delay_microseconds: 0 }
instance_group [ { kind: KIND_CPU count: 1 } ]
version_policy: { latest: { num_versions: 2 } }
parameters: { key: "torch_threads" value: { string_value: "1" } }
parameters: { key: "feature_spec_version" value: { string_value: "5" } }
parameters: { key: "max_candidates" value: { string_value: "1000" } }
"""

TEXT_ENCODER_BEFORE = """name: "text_encoder"
backend: "python"
max_batch_size: 0
input [
  { name: "text" data_type: TYPE_STRING dims: [ -1 ] }
]
output [
  { name: "embedding" data_type: TYPE_FP32 dims: [ -1, -1 ] }
]
instance_group [ { kind: KIND_CPU count: 1 } ]
version_policy: { latest: { num_versions: 2 } }
parameters: { key: "torch_threads" value: { string_value: "1" } }
parameters: { key: "max_length" value: { string_value: "64" } }
"""


def _parse(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def test_written_configs_mean_what_the_previous_writer_wrote(tmp_path: Path) -> None:
    for config, before in ((fused_ranker_config(), FUSED_RANKER_BEFORE), (text_encoder_config(64), TEXT_ENCODER_BEFORE)):
        (tmp_path / config.name).mkdir()
        path = write_config(config, tmp_path / config.name)
        assert read_config(path) == _parse(before), config.name
    # A zero queue delay still has to switch dynamic batching on.
    assert read_config(tmp_path / "fused_ranker" / "config.pbtxt").HasField("dynamic_batching")


SEQ_ENCODER = """name: "seq_encoder"
backend: "python"
max_batch_size: 16
input [
  { name: "history" data_type: TYPE_INT64 dims: [ -1 ] allow_ragged_batch: true }
]
output [
  { name: "vector" data_type: TYPE_FP32 dims: [ -1 ] }
]
dynamic_batching { max_queue_delay_microseconds: 0 }
instance_group [ { kind: KIND_CPU count: 1 } ]
version_policy: { latest: { num_versions: 2 } }
parameters: { key: "torch_threads" value: { string_value: "1" } }
parameters: { key: "max_history" value: { string_value: "1000" } }
"""


def test_seq_encoder_config_is_batched_one_user_per_request(tmp_path: Path) -> None:
    config = seq_encoder_config()
    (tmp_path / config.name).mkdir()
    path = write_config(config, tmp_path / config.name)
    assert read_config(path) == _parse(SEQ_ENCODER)
    assert read_config(path).HasField("dynamic_batching")


def test_served_models_know_the_current_feature_spec_version() -> None:
    """The Triton python models refuse unknown spec versions: the current one must be listed."""
    for name, source in TRITON_MODELS.items():
        tree = ast.parse(source.read_text())
        known = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                     and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["KNOWN_FEATURE_SPEC_VERSIONS"])
        assert FEATURE_SPEC_VERSION in known, name


def test_triton_models_import_only_what_tritons_environment_has() -> None:
    allowed = {"os", "sys", "json", "numpy", "torch", "transformers", "triton_python_backend_utils"}
    for name, source in TRITON_MODELS.items():
        tree = ast.parse(source.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert imported <= allowed, (name, imported - allowed)


def test_publishing_drops_versions_exported_for_another_feature_spec(tmp_path):
    """config.pbtxt is shared by all versions: a version exported for another spec would make Triton
    refuse it (and fail to start), so publishing a new one removes it."""
    import json

    from core.features import FEATURE_SPEC_VERSION, FUSED_RANKER_NAME
    from offline.serving.export import SPEC_FILE, publish_fused_ranker
    root = tmp_path / "model_repository" / FUSED_RANKER_NAME
    (root / "1").mkdir(parents=True)                       # before spec files existed
    (root / "2").mkdir()
    (root / "2" / SPEC_FILE).write_text(json.dumps({"feature_spec_version": "old"}))
    (root / "3").mkdir()
    (root / "3" / SPEC_FILE).write_text(json.dumps({"feature_spec_version": FEATURE_SPEC_VERSION}))
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights")
    publish_fused_ranker(tmp_path / "model_repository", weights, 4)
    assert sorted(p.name for p in root.glob("[0-9]*")) == ["3", "4"]
    assert (root / "config.pbtxt").exists()

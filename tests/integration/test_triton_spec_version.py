"""A real Triton refuses to load a served model whose config.pbtxt names a feature spec version
the model's code does not know, and says which version."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from common.pki import ensure_pki
from common.security import Security
from common.triton import triton_command
from offline.serving.export import TRITON_MODELS
from offline.serving.triton_config import fused_ranker_config, seq_encoder_config, text_encoder_config, write_config

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _repository_naming_spec(root: Path, spec_version: str) -> Path:
    """Every Triton model, version 1, their configs naming `spec_version` (no weights: the check
    comes first)."""
    for config in (fused_ranker_config(), text_encoder_config(64), seq_encoder_config()):
        config.parameters["feature_spec_version"].string_value = spec_version
        (root / config.name / "1").mkdir(parents=True)
        write_config(config, root / config.name)
        shutil.copy2(TRITON_MODELS[config.name], root / config.name / "1" / "model.py")
    return root


def test_triton_refuses_a_feature_spec_version_the_model_does_not_know(tmp_path: Path) -> None:
    repo = _repository_naming_spec(tmp_path / "model_repository", "0")
    grpc_port = _free_port()
    pki = ensure_pki(tmp_path / "pki")   # as in every stack: mTLS, the operator's cert calls it
    argv, env = triton_command(repo, grpc_port, _free_port(), models=[],
                               security=Security(pki.service_ca, pki.cert("triton"), pki.key("triton")))
    with open(tmp_path / "triton.log", "wb") as log:
        server = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    operator = Security(pki.service_ca, pki.cert("operator"), pki.key("operator"))
    client = triton.InferenceServerClient(f"127.0.0.1:{grpc_port}", **operator.triton_client_kwargs())
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.is_server_live():
                    break
            except InferenceServerException:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "triton.log").read_text()
            time.sleep(0.2)
        for name in TRITON_MODELS:
            with pytest.raises(InferenceServerException, match=r"feature_spec_version '0'"):
                client.load_model(name)
            assert not client.is_model_ready(name)
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=30)

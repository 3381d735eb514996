"""Writes the served models into the Triton model repository: model_repository/<model>/ gets
config.pbtxt (offline/serving/triton_config.py) and <version>/ with model.py (the Triton python
model beside this file) and the weights. The offline build is the only caller.

The fused ranker stays on TorchScript although torch 2.13 deprecates torch.jit.script/load
(they warn). torch.export does export forward_batch with dynamic history length, candidate
count, batch size and online-item count (data-dependent branches become unbacked sizes or
torch.cond), with bit-identical scores, but torch.export.load(...).module() is slower per call
than the scripted module, in process, one thread, history 50 and 300 candidates per user
(min of 200 interleaved calls, ms): batch 1: script 1.13, export 2.29 (+100%); batch 4: 2.91 vs
4.20 (+45%); batch 16: 9.98 vs 12.16 (+22%); with torch.cond instead of the always-taken online
path it is slower still (2.62 at batch 1). The limit was +10% (the Triton call is 3.6 ms of a
12 ms request). The exported graph runs node by node in Python (227 nodes) plus its guards;
AOTInductor would remove that but needs a C++ toolchain and minutes of compiling in every build.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch

from core.features import FEATURE_SPEC_VERSION, FUSED_RANKER_NAME, SEQ_ENCODER_NAME, TEXT_ENCODER_NAME
from offline.serving.fused_ranker import FusedRanker
from offline.serving.seq_encoder import SEQ_ENCODER_WEIGHTS
from offline.serving.triton_config import fused_ranker_config, seq_encoder_config, text_encoder_config, write_config
from offline.text_encoder import TextEncoder

HERE = Path(__file__).resolve().parent
# Triton model -> its python model, written to <version>/model.py.
TRITON_MODELS = {FUSED_RANKER_NAME: HERE / "fused_ranker_triton.py",
                 TEXT_ENCODER_NAME: HERE / "text_encoder_triton.py",
                 SEQ_ENCODER_NAME: HERE / "seq_encoder_triton.py"}
SERVED_MODELS = tuple(TRITON_MODELS)
RANKER_WEIGHTS = "model.pt"
SPEC_FILE = "feature_spec.json"   # in each fused_ranker version: the spec it was exported for


def script_ranker(model: FusedRanker, path: Path) -> torch.jit.ScriptModule:
    """Freeze the trained ranker's item projections and save it as TorchScript at `path`."""
    model.eval().freeze()
    scripted = torch.jit.script(model)
    scripted.save(str(path))
    return scripted


def load_ranker(model_repo: Path, version: int | str) -> torch.jit.ScriptModule:
    """The fused ranker as Triton serves it (forward for one user, forward_batch, its tables)."""
    return torch.jit.load(str(Path(model_repo) / FUSED_RANKER_NAME / str(version) / RANKER_WEIGHTS)).eval()


def publish_fused_ranker(model_repo: Path, weights: Path, version: int) -> Path:
    """model_repo/fused_ranker/<version>/{model.pt, model.py} and config.pbtxt -> the version folder."""
    final = _publish_version(model_repo, FUSED_RANKER_NAME, {RANKER_WEIGHTS: weights}, version, fused_ranker_config(),
                             {SPEC_FILE: json.dumps({"feature_spec_version": FEATURE_SPEC_VERSION})})
    _drop_other_specs(final.parent)
    return final


def _publish_version(model_repo: Path, name: str, files: dict[str, Path], version: int, config,
                     texts: dict[str, str] | None = None) -> Path:
    """model_repo/<name>/<version>/ with `files` (copied under their keys), the model's model.py and
    `texts`, staged and renamed into place, then <name>/config.pbtxt -> the version folder."""
    model_root = _ensure(Path(model_repo) / name)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_root))
    for target, source in files.items():
        shutil.copy2(source, tmp / target)
    shutil.copy2(TRITON_MODELS[name], tmp / "model.py")
    for target, text in (texts or {}).items():
        (tmp / target).write_text(text)
    final = model_root / str(version)
    tmp.rename(final)
    write_config(config, model_root)
    return final


def _drop_other_specs(model_root: Path) -> None:
    """Remove versions exported for another feature spec: config.pbtxt is shared by every version
    and names the new spec, so Triton would refuse to load them (and fail to start)."""
    for folder in model_root.glob("[0-9]*"):
        spec = folder / SPEC_FILE
        known = json.loads(spec.read_text()).get("feature_spec_version") if spec.exists() else None
        if folder.name.isdigit() and known != FEATURE_SPEC_VERSION:
            shutil.rmtree(folder)


def publish_seq_encoder(model_repo: Path, weights: Path, version: int) -> Path:
    """model_repo/seq_encoder/<version>/{seq_encoder.pt, model.py} and config.pbtxt -> the version
    folder. Triton holds the newest MODEL_VERSIONS_KEPT versions (config's version policy), as for
    the fused ranker."""
    return _publish_version(model_repo, SEQ_ENCODER_NAME, {SEQ_ENCODER_WEIGHTS: weights}, version, seq_encoder_config())


def load_seq_encoder(model_repo: Path, version: int | str) -> torch.jit.ScriptModule:
    """The sequential encoder as Triton serves it (history [L] -> vector [D])."""
    return torch.jit.load(str(Path(model_repo) / SEQ_ENCODER_NAME / str(version) / SEQ_ENCODER_WEIGHTS)).eval()


def publish_text_encoder(model_repo: Path, encoder: TextEncoder) -> str:
    """Export the BERT encoder as Triton model text_encoder; a new version only when it changed."""
    model_root = _ensure(Path(model_repo) / TEXT_ENCODER_NAME)
    code = TRITON_MODELS[TEXT_ENCODER_NAME]
    source = {"model": encoder.fingerprint(), "max_length": encoder.max_length,
              "code": hashlib.sha256(code.read_bytes()).hexdigest()}
    versions = sorted((int(p.name) for p in model_root.glob("[0-9]*") if p.name.isdigit()), reverse=True)
    if versions and (model_root / str(versions[0]) / "source.json").exists() and \
            json.loads((model_root / str(versions[0]) / "source.json").read_text()) == source:
        return str(versions[0])
    version = (versions[0] if versions else 0) + 1
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_root))
    shutil.copytree(encoder.model_dir, tmp / "model", ignore=shutil.ignore_patterns("*.md", ".git*"))
    shutil.copy2(code, tmp / "model.py")
    (tmp / "source.json").write_text(json.dumps(source))
    tmp.rename(model_root / str(version))
    write_config(text_encoder_config(encoder.max_length), model_root)
    return str(version)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def weights_checksum(path: Path) -> str:
    """sha256 of a TorchScript file's parameters and buffers (name, dtype, shape, bytes, in name
    order): the manifest's model_checksum. Not the file's bytes: torch.jit.save writes a random
    serialization id and renumbers its code files on every save, so two builds with the same seed
    and the same weights wrote different bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(torch.jit.load(str(path), map_location="cpu").state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

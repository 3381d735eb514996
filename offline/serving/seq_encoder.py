"""The sequential channel's user encoder: a user's recent history (item indices, oldest first) in,
the query vector out, searched by inner product among the item vectors (item_seq.npy, index_seq.faiss).

Trained offline (offline/sequential.py) to predict the next item; served by Triton as model
seq_encoder (core.features SEQ_ENCODER_*) and used in process by the offline build and evaluation
(InProcessSeqEncoder). A small causal self-attention stack (SASRec-like, pre-LayerNorm) over the
history's item vectors plus learned positions; the user vector is the output at the newest item.

An item's vector is a learned id embedding plus a linear projection of its BERT vector. The
module holds the finished table ([n_items, D], not the text vectors: those would be 6x larger);
seq_text_proj.npy / seq_text_bias.npy keep the projection, so an item added online gets its
vector (the content path alone, its id embedding being zero) with numpy, no model needed.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

SEQ_ENCODER_WEIGHTS = "seq_encoder.pt"   # TorchScript, in the artifact set (Triton's copy: its model repo)
SEQ_ITEM_VECTORS = "item_seq.npy"        # [n_items, D] float32 item vectors (the index's rows)
SEQ_TEXT_PROJ = "seq_text_proj.npy"      # [Dt, D] float32: online item vector = text @ proj + bias
SEQ_TEXT_BIAS = "seq_text_bias.npy"      # [D] float32
SEQ_INDEX = "index_seq.faiss"
SEQ_INDEX_NAME = "seq"                   # manifest indexes.<name>
MAX_SEQ_HISTORY = 50                     # the encoder reads only the newest items of a history


class _Block(nn.Module):
    """Pre-LN causal self-attention + feed-forward; the mask is [B, L, L] True = may attend."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, length, dim = x.shape
        dh = dim // self.heads
        q, k, v = self.qkv(self.ln1(x)).view(b, length, 3, self.heads, dh).permute(2, 0, 3, 1, 4).unbind(0)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(dh)                  # [B, H, L, L]
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        attended = self.drop(torch.softmax(scores, dim=-1)) @ v               # [B, H, L, dh]
        x = x + self.drop(self.out(attended.transpose(1, 2).reshape(b, length, dim)))
        return x + self.drop(self.ff(self.ln2(x)))


class SeqEncoder(nn.Module):
    def __init__(self, n_items: int, dim: int = 64, max_history: int = MAX_SEQ_HISTORY, layers: int = 2,
                 heads: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        self.max_history = max_history
        self.dim = dim
        # The finished item vectors (set by the training code at the end: offline/sequential.py).
        self.register_buffer("item_vectors", torch.zeros(n_items, dim))
        self.position = nn.Embedding(max_history, dim)
        self.blocks = nn.ModuleList([_Block(dim, heads, dropout) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def encode(self, vectors: Tensor, real: Tensor) -> Tensor:
        """vectors [B, M, D] of left-padded windows (M = max_history, newest last), real [B, M] bool
        -> [B, M, D]: position t's output sees positions <= t only (it predicts item t+1). A padding
        position attends to itself alone, so no row of the softmax is empty."""
        b, m, _ = vectors.shape
        positions = torch.arange(m, device=vectors.device)
        x = self.drop(vectors * real.unsqueeze(-1).to(vectors.dtype) + self.position(positions))
        causal = positions.unsqueeze(1) >= positions.unsqueeze(0)                       # [M, M] query >= key
        mask = (causal.unsqueeze(0) & real.unsqueeze(1)) | torch.eye(m, dtype=torch.bool, device=vectors.device)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln(x)

    def forward(self, history: Tensor) -> Tensor:
        """history [L] int64 item indices, oldest first -> the user vector [D] float32; indices
        outside 0..n_items-1 (online items, padding) are dropped; nothing left -> a [0] tensor."""
        n = self.item_vectors.shape[0]
        history = history[(history >= 0) & (history < n)]
        length = history.shape[0]
        if length == 0:
            return torch.zeros(0, dtype=torch.float32)
        history = history[max(0, length - self.max_history):]
        length = history.shape[0]
        # The window's positions end at max_history - 1, as in training's left-padded windows.
        positions = torch.arange(self.max_history - length, self.max_history)
        x = self.item_vectors[history] + self.position(positions)
        causal = positions.unsqueeze(1) >= positions.unsqueeze(0)
        mask = causal.unsqueeze(0)
        x = x.unsqueeze(0)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln(x)[0, -1]


def script_encoder(model: SeqEncoder, path: Path) -> torch.jit.ScriptModule:
    """Save the trained encoder (eval mode) as TorchScript at `path`."""
    scripted = torch.jit.script(model.eval())
    scripted.save(str(path))
    return scripted


def content_vectors(text: np.ndarray, proj: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """BERT vectors [m, Dt] -> item vectors [m, D] of items without a learned id embedding."""
    return np.asarray(text, np.float32) @ proj + bias


class InProcessSeqEncoder:
    """The TorchScript encoder in this process (offline build, evaluation): history -> vector."""

    def __init__(self, path: str | Path) -> None:
        self.module = torch.jit.load(str(path)).eval()

    def __call__(self, history: np.ndarray) -> np.ndarray | None:
        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(history, np.int64)))
        return out.numpy() if out.numel() else None


def in_process_encoder(artifacts) -> InProcessSeqEncoder | None:
    """The encoder of an artifact set (common.artifacts.ArtifactSet) that has one, for
    common.components.load_retriever(..., seq_encoder=) in offline code; None for an older set."""
    path = artifacts.path(SEQ_ENCODER_WEIGHTS)
    return InProcessSeqEncoder(path) if "sequential" in artifacts.manifest and path.exists() else None

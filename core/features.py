"""The feature spec: one declaration that drives ranker training, export, config.pbtxt (written by
offline/serving/triton_config.py) and the Triton client (fused ranker), and the LightGBM
re-ranker's training and serving.

Bump FEATURE_SPEC_VERSION whenever a feature's meaning, order or count changes: the manifest
records it and services refuse artifacts built against another version.
"""
from __future__ import annotations

import numpy as np

from core.channel_names import CHANNEL_NAMES

FEATURE_SPEC_VERSION = "5"   # 4: the item2item channel's score and rank; 5: the sequential channel's

CHANNELS: tuple[str, ...] = CHANNEL_NAMES   # retrieval features, in this order

# Per-candidate features the ranking request carries to Triton, derived from retrieval output.
RETRIEVAL_FEATURES: tuple[str, ...] = tuple(
    f"{channel}_{kind}" for channel in CHANNELS for kind in ("score", "rank_inv"))

TensorSpec = tuple[str, str, tuple[int, ...]]   # (name, Triton datatype, dims without the batch dim)

# Triton model fused_ranker: (name, datatype, dims), dims without the batch dim: the model is
# dynamically batched with ragged inputs, a request is one user and sends [1, *dims] tensors.
# Indices >= the artifact set's item count are online items: their BERT vectors and categories
# come in the optional extra_* inputs (row = index - item count), scored by the content-only path.
FUSED_RANKER_NAME = "fused_ranker"
FUSED_RANKER_INPUTS: tuple[TensorSpec, ...] = (
    ("history", "INT64", (-1,)),                           # [L] item indices, oldest first
    ("candidates", "INT64", (-1,)),                        # [N] item indices
    ("features", "FP32", (-1, len(RETRIEVAL_FEATURES))),   # [N, F] retrieval features
    ("extra_text", "FP32", (-1, -1)),                      # [M, Dt] optional: online items' vectors
    ("extra_category", "INT64", (-1,)),                    # [M] optional: their category indices
)
OPTIONAL_INPUTS = frozenset({"extra_text", "extra_category"})
FUSED_RANKER_OUTPUTS: tuple[TensorSpec, ...] = (("scores", "FP32", (-1,)),)
FUSED_RANKER_MAX_BATCH = 16           # users per model execution
FUSED_RANKER_QUEUE_DELAY_US = 0       # no waiting: batches form from requests queued while busy
FUSED_RANKER_MAX_CANDIDATES = 1000    # per request; the served model refuses more

# Triton model text_encoder: raw item texts in, unit-norm BERT vectors out (new items online).
TEXT_ENCODER_NAME = "text_encoder"
TEXT_ENCODER_INPUTS: tuple[TensorSpec, ...] = (("text", "BYTES", (-1,)),)
TEXT_ENCODER_OUTPUTS: tuple[TensorSpec, ...] = (("embedding", "FP32", (-1, -1)),)

# Triton model seq_encoder: a user's recent history in, the sequential channel's query vector out
# (offline/serving/seq_encoder.py; inner product against the item vectors of index_seq.faiss).
SEQ_ENCODER_NAME = "seq_encoder"
SEQ_ENCODER_INPUTS: tuple[TensorSpec, ...] = (("history", "INT64", (-1,)),)    # [L] item indices, oldest first
SEQ_ENCODER_OUTPUTS: tuple[TensorSpec, ...] = (("vector", "FP32", (-1,)),)     # [D]

# Versions Triton holds per model: the one serving and the one being swapped in (hot swap).
MODEL_VERSIONS_KEPT = 2

# The re-ranker sees the fused score, the retrieval features, item side features, and the
# diversity features measured against the slate built so far.
RERANK_FEATURES: tuple[str, ...] = (
    "fused_score", "fused_rank_inv", *RETRIEVAL_FEATURES, "popularity", "age",
    "max_sim_to_slate", "same_category_in_slate", "position")


def retrieval_features(columns: dict[str, tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """columns: channel -> (scores [N] float32, ranks [N] int32, 0 = not retrieved) -> [N, F] float32."""
    out = np.zeros((n, len(RETRIEVAL_FEATURES)), dtype=np.float32)
    for c, channel in enumerate(CHANNELS):
        if channel not in columns:
            continue
        scores, ranks = columns[channel]
        ranks = np.asarray(ranks, dtype=np.float32)
        out[:, 2 * c] = scores
        out[:, 2 * c + 1] = np.where(ranks > 0, 1.0 / np.log2(np.maximum(ranks, 1.0) + 1.0), 0.0)
    return out


def rerank_features(
    fused: np.ndarray,           # [M] fused scores of the pool
    fused_rank_inv: np.ndarray,  # [M]
    retrieval: np.ndarray,       # [M, F]
    popularity: np.ndarray,      # [M]
    age: np.ndarray,             # [M]
    max_sim: np.ndarray,         # [M] max cosine similarity to items already in the slate
    same_category: np.ndarray,   # [M] count of slate items with the same category
    position: int,
) -> np.ndarray:
    """-> [M, len(RERANK_FEATURES)] float32, columns in RERANK_FEATURES order."""
    m = len(fused)
    return np.column_stack([
        fused, fused_rank_inv, retrieval, popularity, age, max_sim, same_category,
        np.full(m, position, dtype=np.float32)]).astype(np.float32, copy=False)


"""Training the fused BERT + CF deep ranker (PyTorch) offline.

The served model itself (tables, forward / forward_batch) is offline/serving/fused_ranker.py;
offline/serving/export.py writes it to the Triton model repository.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from offline.serving.fused_ranker import MAX_HISTORY, FusedRanker

__all__ = ["MAX_HISTORY", "FusedRanker", "RankingList", "as_online", "score_lists", "train_ranker"]

NO_EXTRA_CATEGORY = torch.zeros(0, dtype=torch.int64)


def as_online(model: FusedRanker, lst: "RankingList", rows: np.ndarray) -> tuple[Tensor, ...]:
    """Inputs for a list where the candidates at `rows` are treated as online (cold) items."""
    n = model.item_text.shape[0]
    candidates = torch.from_numpy(lst.candidates.copy())
    cold = torch.from_numpy(lst.candidates[rows])
    extra_text = model.item_text[cold]
    extra_category = model.item_category[cold]
    candidates[torch.from_numpy(rows)] = n + torch.arange(len(rows))
    return candidates, extra_text, extra_category


@dataclass(frozen=True)
class RankingList:
    """One training or evaluation list: a user's history and the retrieval candidates for it."""
    history: np.ndarray     # [L] int64
    candidates: np.ndarray  # [N] int64
    features: np.ndarray    # [N, F] float32 retrieval features
    labels: np.ndarray      # [N] float32, 1 = the user interacted with it in the target period


def train_ranker(model: FusedRanker, lists: list[RankingList], epochs: int = 6, negatives: int = 24,
                 lr: float = 2e-3, seed: int = 0, progress: bool = True, cold_share: float = 0.1) -> list[float]:
    """BCE on each list's positives against negatives sampled from its own candidates.

    Reproducible: the same seed and lists give the same weights. With more than one thread some CPU
    backward kernels accumulate in a racy order unless deterministic algorithms are requested.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(model, lists, epochs, negatives, lr, seed, progress, cold_share)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(model: FusedRanker, lists: list[RankingList], epochs: int, negatives: int, lr: float, seed: int,
           progress: bool, cold_share: float) -> list[float]:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    usable = [l for l in lists if l.labels.any()]
    losses: list[float] = []
    model.train()
    bar = tqdm(total=epochs * len(usable), desc="ranker", unit="list", disable=not progress)
    for _ in range(epochs):
        total = 0.0
        for j in rng.permutation(len(usable)):
            lst = usable[j]
            pos = np.flatnonzero(lst.labels > 0)
            neg = np.flatnonzero(lst.labels == 0)
            neg = rng.choice(neg, size=min(len(neg), negatives * len(pos)), replace=False)
            rows = np.concatenate([pos, neg])
            sub = RankingList(lst.history, lst.candidates[rows], lst.features[rows], lst.labels[rows])
            # Cold-start augmentation: some candidates go through the content-only path, as
            # items added online will at serving time.
            cold = np.flatnonzero(rng.random(len(rows)) < cold_share)
            candidates, extra_text, extra_category = as_online(model, sub, cold)
            logits = model(torch.from_numpy(lst.history), candidates, torch.from_numpy(sub.features),
                           extra_text, extra_category)
            target = torch.from_numpy(lst.labels[rows])
            loss = nn.functional.binary_cross_entropy_with_logits(logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
            bar.update(1)
        losses.append(total / max(len(usable), 1))
    bar.close()
    model.eval()
    return losses


@torch.inference_mode()
def score_lists(model: nn.Module, lists: list[RankingList], batch: int = 32) -> list[np.ndarray]:
    """Scores of each list's candidates, `batch` lists per forward_batch call."""
    no_text = torch.zeros(0, model.item_text.shape[1])
    out: list[np.ndarray] = []
    for start in range(0, len(lists), batch):
        part = lists[start:start + batch]
        scores = model.forward_batch(
            torch.from_numpy(np.concatenate([l.history for l in part]).astype(np.int64)),
            torch.tensor([len(l.history) for l in part]),
            torch.from_numpy(np.concatenate([l.candidates for l in part]).astype(np.int64)),
            torch.tensor([len(l.candidates) for l in part]),
            torch.from_numpy(np.concatenate([l.features for l in part]).astype(np.float32)),
            no_text, NO_EXTRA_CATEGORY).numpy()
        out += np.split(scores, np.cumsum([len(l.candidates) for l in part])[:-1])
    return out


"""Training the fused BERT + CF deep ranker (PyTorch) offline.

The served model itself (tables, forward / forward_batch) is offline/serving/fused_ranker.py;
offline/serving/export.py writes it to the Triton model repository.

Training lists (RankingList) come from two sources: each ranker user's whole training history with
the validation period as targets (what serving looks like), and cut points late in each user's
training sequence (history = the prefix, targets = the items up to the next cut: `sequence_cuts`),
which multiply the lists several-fold. The served CF and item-to-item tables were fitted on the
whole training split, so a cut list's targets are items they saw; the build therefore retrieves cut
lists from inner tables fitted without the cut spans (offline/inner_tables.py) and trains with the
inner CF tables, then serves with the outer ones (`use_cf_tables`). Only late cuts are used, with a
weight below the validation lists' one (offline/build.py RANKER_CUTS, RANKER_CUT_WEIGHT: a first
choice, not compared with others since the inner tables). Epochs are chosen by early stopping on validation nDCG@10
(`train_ranker(valid=...)`), then the build refits on train + valid for that many epochs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from offline.metrics import ndcg_at_k
from offline.serving.fused_ranker import MAX_HISTORY, FusedRanker

__all__ = ["MAX_HISTORY", "FusedRanker", "RankingList", "Training", "as_online", "best_epoch", "cut_lists",
           "list_ndcg", "score_lists", "sequence_cuts", "train_ranker", "use_cf_tables"]

NO_EXTRA_CATEGORY = torch.zeros(0, dtype=torch.int64)
VALID_K = 10   # early stopping watches nDCG@10, the figure the evaluation reports


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
    weight: float = 1.0     # its share of the loss (cut lists, whose targets the CF tables saw, weigh less)


def sequence_cuts(sequence: np.ndarray, cuts: int, window: float = 0.125,
                  min_history: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """Late cut points in one user's sequence (oldest first): up to `cuts` (history, targets) pairs,
    newest first. Each target span holds the next max(1, round(window * len)) items after its cut
    (the default 1/8 of the training part is the size of the validation part in an 80/10/10 split),
    spans do not overlap and end at the sequence's end; a cut needs `min_history` items before it.
    The history is strictly the prefix before the cut, so no target is in it."""
    span = max(1, int(round(window * len(sequence))))
    out = []
    for k in range(cuts):
        end = len(sequence) - k * span
        cut = end - span
        if cut < min_history:
            break
        out.append((sequence[:cut], sequence[cut:end]))
    return out


Retrieve = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]   # history -> (items [N], features [N, F])


def cut_lists(retrieve: Retrieve, sequences: dict[str, np.ndarray], users: Iterable[str], cuts: int,
              weight: float = 1.0, window: float = 0.125, min_history: int = 5) -> list[RankingList]:
    """RankingLists from `sequence_cuts` of each user's sequence, candidates from `retrieve` on the
    prefix (the real retriever: negatives are what it proposes). Lists without a positive among the
    candidates are dropped (they teach nothing)."""
    out = []
    for u in users:
        for history, targets in sequence_cuts(sequences.get(u, np.zeros(0, np.int64)), cuts, window, min_history):
            items, features = retrieve(history)
            labels = np.isin(items, targets).astype(np.float32)
            if labels.any():
                out.append(RankingList(history[-MAX_HISTORY:], items, features, labels, weight))
    return out


@dataclass
class Training:
    losses: list[float] = field(default_factory=list)      # mean training loss per epoch
    valid_ndcg: list[float] = field(default_factory=list)  # validation nDCG@10 after each epoch (empty: none)
    best_epoch: int = 0                                    # 1-based epoch with the best valid_ndcg (0: none)


def best_epoch(valid_ndcg: list[float]) -> int:
    """1-based epoch of the best validation figure; the earliest on ties (fewer epochs, same quality)."""
    return int(np.argmax(valid_ndcg)) + 1 if valid_ndcg else 0


def list_ndcg(scores: list[np.ndarray], lists: list[RankingList], k: int = VALID_K) -> float:
    """Mean nDCG@k of the lists ordered by `scores`, over the lists with a positive candidate."""
    values = []
    for s, lst in zip(scores, lists):
        relevant = set(lst.candidates[lst.labels > 0].tolist())
        if relevant:
            values.append(ndcg_at_k(lst.candidates[np.argsort(-s, kind="stable")[:k]].tolist(), relevant, k))
    return float(np.mean(values)) if values else 0.0


def train_ranker(model: FusedRanker, lists: list[RankingList], epochs: int = 6, negatives: int = 24,
                 lr: float = 2e-3, seed: int = 0, progress: bool = True, cold_share: float = 0.1,
                 valid: list[RankingList] | None = None, patience: int = 2, batch: int = 1) -> Training:
    """BCE on each list's positives against negatives sampled from its own candidates, `batch`
    lists per step. With `valid`, nDCG@10 on those lists is measured after every epoch and training
    stops `patience` epochs after the best one (the weights are the last epoch's: the caller refits
    for `best_epoch` epochs).

    Reproducible: the same seed and lists give the same weights. With more than one thread some CPU
    backward kernels accumulate in a racy order unless deterministic algorithms are requested.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(model, lists, epochs, negatives, lr, seed, progress, cold_share, valid, patience, batch)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(model: FusedRanker, lists: list[RankingList], epochs: int, negatives: int, lr: float, seed: int,
           progress: bool, cold_share: float, valid: list[RankingList] | None, patience: int,
           batch: int) -> Training:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    usable = [l for l in lists if l.labels.any()]
    out = Training()
    bar = tqdm(total=epochs * len(usable), desc="ranker", unit="list", disable=not progress)
    for _ in range(epochs):
        model.train()
        total = 0.0
        order = rng.permutation(len(usable))
        for start in range(0, len(order), max(batch, 1)):
            part = [usable[j] for j in order[start:start + max(batch, 1)]]
            loss = _batch_loss(model, part, negatives, cold_share, rng)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(part)
            bar.update(len(part))
        out.losses.append(total / max(len(usable), 1))
        if valid:
            model.eval()
            out.valid_ndcg.append(list_ndcg(score_lists(model, valid), valid))
            out.best_epoch = best_epoch(out.valid_ndcg)
            if len(out.valid_ndcg) - out.best_epoch >= patience:
                break
    bar.close()
    model.eval()
    return out


def _batch_loss(model: FusedRanker, part: list[RankingList], negatives: int, cold_share: float,
                rng: np.random.Generator) -> Tensor:
    """The weighted mean over `part` of each list's BCE on its positives and sampled negatives."""
    n = model.item_text.shape[0]
    histories, candidates, features, targets, counts, extras = [], [], [], [], [], []
    weights = []
    for lst in part:
        pos = np.flatnonzero(lst.labels > 0)
        neg = np.flatnonzero(lst.labels == 0)
        neg = rng.choice(neg, size=min(len(neg), negatives * len(pos)), replace=False)
        rows = np.concatenate([pos, neg])
        items = lst.candidates[rows].copy()
        # Cold-start augmentation: some candidates go through the content-only path, as items
        # added online will at serving time (offline/serving/fused_ranker.py: indices >= n).
        cold = np.flatnonzero(rng.random(len(rows)) < cold_share)
        offset = sum(len(e) for e in extras)
        extras.append(items[cold].copy())
        items[cold] = n + offset + np.arange(len(cold))
        histories.append(lst.history)
        candidates.append(items)
        features.append(lst.features[rows])
        targets.append(lst.labels[rows])
        counts.append(len(rows))
        weights.append(lst.weight)
    cold_items = torch.from_numpy(np.concatenate(extras).astype(np.int64))
    logits = model.forward_batch(
        torch.from_numpy(np.concatenate(histories).astype(np.int64)), torch.tensor([len(h) for h in histories]),
        torch.from_numpy(np.concatenate(candidates).astype(np.int64)), torch.tensor(counts),
        torch.from_numpy(np.concatenate(features).astype(np.float32)),
        model.item_text[cold_items], model.item_category[cold_items])
    per_row = nn.functional.binary_cross_entropy_with_logits(
        logits, torch.from_numpy(np.concatenate(targets).astype(np.float32)), reduction="none")
    owner = torch.repeat_interleave(torch.arange(len(part)), torch.tensor(counts))
    per_list = torch.zeros(len(part)).index_add(0, owner, per_row) / torch.tensor(counts, dtype=torch.float32)
    w = torch.tensor(weights, dtype=torch.float32)
    return (per_list * w).sum() / w.sum().clamp(min=1e-12)


@torch.no_grad()
def use_cf_tables(model: FusedRanker, item_factors: np.ndarray, gram: np.ndarray) -> FusedRanker:
    """Swap the model's CF item factors and gram (same shapes) in place: trained on the inner
    tables, it serves the outer ones; its CF input is the fold-in score either way."""
    model.item_cf.copy_(torch.from_numpy(np.asarray(item_factors, np.float32)))
    model.cf_gram.copy_(torch.from_numpy(np.asarray(gram, np.float32)))
    return model


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

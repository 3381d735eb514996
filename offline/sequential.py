"""Training the sequential channel's next-item encoder (offline/serving/seq_encoder.py).

Every user's training sequence is cut into windows of MAX_SEQ_HISTORY + 1 items (newest window
first, left-padded); each position of a window predicts the next item from the ones before it.
Item vectors = id embedding + Linear(BERT vector): items seen in training learn an id part, the
others (and items added online) rely on their text. The loss is a full softmax over the catalog
while it is small, else a sampled softmax over the batch's own targets plus uniform negatives.
Reproducible (fixed seed, deterministic algorithms) and bounded: at most `max_steps` steps.
Given validation users (their training history and the items they picked next), it stops early:
every `eval_every` steps it measures their recall@`eval_k` and keeps the best checkpoint, and it
stops once `patience` checks in a row did not beat it (measured on ml-latest-small: at the old
fixed 200 steps the training loss was still falling, recall@300 0.457; 1,000 steps 0.531).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from offline.serving.seq_encoder import MAX_SEQ_HISTORY, SeqEncoder


@dataclass(frozen=True)
class SeqConfig:
    dim: int = 64
    max_history: int = MAX_SEQ_HISTORY
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    epochs: int = 60
    max_steps: int = 1500           # bounds the build's time whatever the data size (~0.1 s a step here)
    eval_every: int = 200           # steps between validation checks (with validation users; 100 was too noisy to stop on)
    patience: int = 3               # checks without a new best recall before it stops
    eval_k: int = 300               # the recall it stops on: the candidate list's length
    eval_users: int = 500           # validation users per check (bounds a check's cost at 1M items)
    batch: int = 64                 # windows per step
    lr: float = 2e-3
    weight_decay: float = 0.0
    windows_per_user: int = 8       # the newest windows of a long history (heavy users do not dominate)
    full_softmax_up_to: int = 50_000
    loss_share: float = 0.25        # share of a batch's positions the softmax scores (its cost dominates)
    negatives: int = 4096           # uniform negatives per step (sampled softmax)
    id_dropout: float = 0.1         # share of item vectors that use the text part alone while training
    seed: int = 0

    def describe(self) -> dict:
        return asdict(self)


@dataclass
class SeqModel:
    encoder: SeqEncoder           # eval mode, item_vectors filled
    item_vectors: np.ndarray      # [n_items, D]
    text_proj: np.ndarray         # [Dt, D]
    text_bias: np.ndarray         # [D]
    losses: list[float] = field(default_factory=list)   # mean training loss per epoch
    steps: int = 0
    softmax: str = "full"
    tower: "ItemTower | None" = None   # the trained item side (tests compare the exported projection to it)
    checks: list[tuple[int, float]] = field(default_factory=list)   # (step, validation recall@eval_k)
    best_step: int = 0              # the checkpoint kept (steps when there was no validation)


class ItemTower(nn.Module):
    """Item vectors: id embedding (zero at start: an untrained item is its text alone) + text projection."""

    def __init__(self, item_text: Tensor, dim: int) -> None:
        super().__init__()
        self.item_text = item_text                       # [N, Dt] float32, not a parameter
        self.ids = nn.Embedding(len(item_text), dim)
        nn.init.zeros_(self.ids.weight)
        self.proj = nn.Linear(item_text.shape[1], dim)

    def forward(self, items: Tensor, id_keep: Tensor | None = None) -> Tensor:
        ids = self.ids(items)
        if id_keep is not None:
            ids = ids * id_keep.unsqueeze(-1)
        return ids + self.proj(self.item_text[items])

    def full(self) -> Tensor:
        """Every item's vector [N, D], without a gather (its backward would scatter into the table)."""
        return self.ids.weight + self.proj(self.item_text)

    @torch.no_grad()
    def table(self, chunk: int = 65_536) -> Tensor:
        n = len(self.item_text)
        return torch.cat([self(torch.arange(s, min(n, s + chunk))) for s in range(0, n, chunk)] or
                         [torch.zeros(0, self.ids.embedding_dim)])


def windows(sequences: list[np.ndarray], max_history: int, per_user: int) -> np.ndarray:
    """-> [W, max_history + 1] int64 left-padded with -1: the newest `per_user` windows of each
    sequence of >= 2 items (windows overlap by one item, so every transition is a target once)."""
    out = []
    m = max_history + 1
    for seq in sequences:
        end = len(seq)
        for _ in range(per_user):
            if end < 2:
                break
            w = seq[max(0, end - m):end]
            out.append(np.concatenate([np.full(m - len(w), -1, np.int64), w]))
            end -= max_history
    return np.array(out, np.int64).reshape(-1, m)


@dataclass(frozen=True)
class Validation:
    """Users held out for early stopping: each one's training history and the items picked next."""
    histories: list[np.ndarray]
    targets: list[np.ndarray]

    def head(self, n: int) -> "Validation":
        return Validation(self.histories[:n], self.targets[:n])


def train_sequential(sequences: list[np.ndarray], item_text: np.ndarray, config: SeqConfig = SeqConfig(),
                     progress: bool = True, valid: Validation | None = None) -> SeqModel:
    """sequences: each user's training items, oldest first (item indices into item_text).
    valid: stop early on their recall (module docstring); None: train the whole budget."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(sequences, item_text, config, progress, valid)
    finally:
        torch.use_deterministic_algorithms(previous)


def _checkpoint(module: nn.Module) -> dict[str, Tensor]:
    """A copy of the trained state; not the encoder's item_vectors table (made from the tower)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k != "item_vectors"}


def _valid_recall(encoder: "SeqEncoder", tower: "ItemTower", valid: Validation, k: int) -> float:
    """recall@k of the validation users as served (eval mode; the caller restores train mode)."""
    encoder.eval()
    tower.eval()
    table = tower.table()
    encoder.item_vectors = table
    queries = user_vectors(encoder, valid.histories)
    return recall_figures(table.numpy(), queries, valid.histories, valid.targets, ks=(k,))[f"recall@{k}"]


def _train(sequences: list[np.ndarray], item_text: np.ndarray, c: SeqConfig, progress: bool,
           valid: Validation | None) -> SeqModel:
    rng = np.random.default_rng(c.seed)
    torch.manual_seed(c.seed)
    n = len(item_text)
    text = torch.from_numpy(np.ascontiguousarray(item_text, np.float32))
    encoder = SeqEncoder(n, c.dim, c.max_history, c.layers, c.heads, c.dropout)
    tower = ItemTower(text, c.dim)
    params = [*encoder.parameters(), *tower.parameters()]
    opt = torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
    data = windows(sequences, c.max_history, c.windows_per_user)
    full = n <= c.full_softmax_up_to
    per_epoch = max(1, -(-len(data) // c.batch)) if len(data) else 0
    steps = min(c.epochs * per_epoch, c.max_steps)
    losses: list[float] = []
    encoder.train()
    tower.train()
    bar = tqdm(total=steps, desc="sequential", unit="step", disable=not progress)
    done = 0
    valid = valid.head(c.eval_users) if valid is not None and valid.histories else None
    checks: list[tuple[int, float]] = []
    best: tuple[float, int, dict, dict] | None = None   # (recall, step, encoder state, tower state)
    stale = 0
    while done < steps and stale < c.patience:
        order = rng.permutation(len(data))
        total, count = 0.0, 0
        for start in range(0, len(order), c.batch):
            if done >= steps:
                break
            batch = torch.from_numpy(data[order[start:start + c.batch]])
            loss = _step_loss(encoder, tower, batch, full, c, rng, n)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, count, done = total + float(loss.detach()), count + 1, done + 1
            bar.update(1)
            if valid is not None and (done % c.eval_every == 0 or done == steps):
                recall = _valid_recall(encoder, tower, valid, c.eval_k)
                checks.append((done, round(recall, 5)))
                if best is None or recall > best[0]:
                    best, stale = (recall, done, _checkpoint(encoder), _checkpoint(tower)), 0
                else:
                    stale += 1
                encoder.train()
                tower.train()
                bar.set_postfix(recall=f"{recall:.3f}", best=f"{best[0]:.3f}@{best[1]}")
                if stale >= c.patience:
                    break
        losses.append(total / max(count, 1))
    bar.close()
    best_step = done
    if best is not None:
        best_step = best[1]
        encoder.load_state_dict(best[2], strict=False)   # item_vectors: rebuilt below
        tower.load_state_dict(best[3])
    encoder.eval()
    tower.eval()
    table = tower.table()
    encoder.item_vectors = table.clone()
    return SeqModel(encoder, table.numpy(), tower.proj.weight.detach().T.contiguous().numpy(),
                    tower.proj.bias.detach().numpy().copy(), losses, done, "full" if full else "sampled", tower,
                    checks, best_step)


def _step_loss(encoder: SeqEncoder, tower: ItemTower, batch: Tensor, full: bool, c: SeqConfig,
               rng: np.random.Generator, n: int) -> Tensor:
    inputs, targets = batch[:, :-1], batch[:, 1:]
    real = inputs >= 0
    keep = torch.from_numpy((rng.random(inputs.shape) >= c.id_dropout).astype(np.float32))
    vectors = tower(inputs.clamp(min=0), keep)
    out = encoder.encode(vectors, real)                       # [B, M, D]
    scored = real & (targets >= 0)
    if c.loss_share < 1.0:   # a random subset of the positions: the encoder still reads every one
        scored &= torch.from_numpy(rng.random(inputs.shape) < c.loss_share)
    users, goal = out[scored], targets[scored]                # [P, D], [P]
    if len(goal) == 0:
        return out.sum() * 0.0
    if full:
        logits = users @ tower.full().T                       # [P, N]
        return nn.functional.cross_entropy(logits, goal)
    # Sampled softmax: the batch's distinct targets + uniform negatives share one candidate set.
    negatives = torch.from_numpy(rng.integers(0, n, c.negatives))
    candidates, inverse = torch.unique(torch.cat([goal, negatives]), return_inverse=True)
    logits = users @ tower(candidates).T
    return nn.functional.cross_entropy(logits, inverse[:len(goal)])


@torch.inference_mode()
def user_vectors(encoder: SeqEncoder, histories: list[np.ndarray], batch: int = 256) -> np.ndarray:
    """The encoder's vector per history ([U, D]; zeros for an empty one), batched (same as forward)."""
    m, n = encoder.max_history, encoder.item_vectors.shape[0]
    out = np.zeros((len(histories), encoder.dim), np.float32)
    for start in range(0, len(histories), batch):
        part = histories[start:start + batch]
        rows = np.full((len(part), m), -1, np.int64)
        for j, h in enumerate(part):
            h = h[(h >= 0) & (h < n)][-m:]
            if len(h):
                rows[j, m - len(h):] = h
        x = torch.from_numpy(rows)
        real = x >= 0
        encoded = encoder.encode(encoder.item_vectors[x.clamp(min=0)], real)[:, -1].numpy()
        has = real.any(1).numpy()
        out[start:start + len(part)][has] = encoded[has]
    return out


def recall_figures(item_vectors: np.ndarray, users: np.ndarray, histories: list[np.ndarray],
                   targets: list[np.ndarray], ks: tuple[int, ...] = (10, 50, 100, 300),
                   chunk: int = 64) -> dict[str, float]:
    """Mean recall@k (and nDCG@10) of each user's targets among the top items by inner product,
    the history's items excluded (as retrieval's seen filter does)."""
    table = torch.from_numpy(item_vectors)
    top = max(*ks, 10)   # nDCG@10 needs the top 10 whatever ks asks for
    recall = {k: [] for k in ks}
    ndcg = []
    for start in range(0, len(users), chunk):
        scores = torch.from_numpy(users[start:start + chunk]) @ table.T
        for j, h in enumerate(histories[start:start + chunk]):
            scores[j, torch.from_numpy(h[(h >= 0) & (h < len(table))])] = float("-inf")
        ranked = torch.topk(scores, min(top, len(table)), dim=1).indices.numpy()
        for j, t in enumerate(targets[start:start + chunk]):
            hit = np.isin(ranked[j], t)
            for k in ks:
                recall[k].append(hit[:k].sum() / len(t))
            gains = hit[:10] / np.log2(np.arange(2, 2 + len(hit[:10])))   # a catalog under 10 items
            ideal = (1 / np.log2(np.arange(2, 2 + min(len(t), 10)))).sum()
            ndcg.append(gains.sum() / ideal)
    figures = {f"recall@{k}": float(np.mean(v)) if v else 0.0 for k, v in recall.items()}
    figures["ndcg@10"] = float(np.mean(ndcg)) if ndcg else 0.0
    return figures

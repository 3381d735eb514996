"""The served fused BERT + CF ranker: its tables and forward / forward_batch, scripted by
offline/serving/export.py and trained by offline/ranker.py.

The model owns its tables (BERT item vectors, CF item factors, item side features), so a
ranking request carries only ids and the retrieval features:
  history [L] int64, candidates [N] int64, features [N, F] float32  ->  logits [N] float32,
and forward_batch scores several users in one call (ragged: flat arrays plus per-user lengths),
which is what Triton's dynamic batcher hands the served model.
User side: self-attention over the history's BERT vectors with attention pooling (as in NRMS),
and the ALS user vector folded in from the history. Candidate side: its BERT vector, CF factor,
popularity, age and category.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

MAX_HISTORY = 50


def gather(table: Tensor, index: Tensor) -> Tensor:
    """table[index] for an index of any shape, by index_select: advanced indexing goes through
    TensorIterator and cost ~20% of the served forward (py-spy of Triton's stub); same values."""
    rows = table.index_select(0, index.reshape(-1))
    return rows.reshape(list(index.shape) + list(table.shape[1:]))


class FusedRanker(nn.Module):
    def __init__(self, item_text: np.ndarray, item_cf: np.ndarray, cf_gram: np.ndarray,
                 cf_alpha: float, cf_reg: float, popularity: np.ndarray, age: np.ndarray,
                 category: np.ndarray, n_categories: int, n_features: int, hidden: int = 128) -> None:
        super().__init__()
        self.register_buffer("item_text", torch.from_numpy(item_text).float())     # [I, Dt]
        self.register_buffer("item_cf", torch.from_numpy(item_cf).float())         # [I, Dc]
        self.register_buffer("cf_gram", torch.from_numpy(cf_gram).float())         # [Dc, Dc]
        self.register_buffer("item_side", torch.from_numpy(
            np.column_stack([popularity, age]).astype(np.float32)))               # [I, 2]
        self.register_buffer("item_category", torch.from_numpy(category.astype(np.int64)))  # [I]
        # Filled by freeze() at export: the projected item text, so serving skips a [N, Dt] x [Dt, H] matmul.
        self.register_buffer("item_hidden", torch.zeros(0, hidden))
        self.cf_alpha = float(cf_alpha)
        self.n_items, self.text_dim = int(item_text.shape[0]), int(item_text.shape[1])   # kept after freeze()
        self.max_history = MAX_HISTORY
        self.cf_reg = float(cf_reg)
        dt = item_text.shape[1]
        self.text_proj = nn.Linear(dt, hidden)
        self.attn_q = nn.Linear(hidden, hidden)
        self.attn_k = nn.Linear(hidden, hidden)
        self.attn_v = nn.Linear(hidden, hidden)
        self.pool = nn.Sequential(nn.Linear(hidden, 64), nn.Tanh(), nn.Linear(64, 1))
        self.category = nn.Embedding(n_categories + 1, 16)
        # per candidate: u*c (hidden), u·c, cf dot, side (2), category (16), user-category share, features
        width = hidden + 1 + 1 + 2 + 16 + 1 + n_features
        self.mlp = nn.Sequential(nn.Linear(width, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                                 nn.Linear(64, 1))
        # Wide part: a linear term over the retrieval features beside the deep one, so the order of
        # the strongest channel is one weight away (without it the model ranked below its own
        # best input on all three formats). Starts at zero: the deep part alone at first.
        self.wide = nn.Linear(n_features, 1, bias=False)
        nn.init.zeros_(self.wide.weight)

    def hidden(self, items: Tensor, extra_text: Tensor) -> Tensor:
        """items [n] (indices >= I are rows of extra_text [M, Dt]) -> projected text [n, H]."""
        n_known = self.item_text.shape[0]
        known = items < n_known
        safe = torch.where(known, items, torch.zeros_like(items))
        if self.item_hidden.shape[0] > 0:
            out = self.item_hidden.index_select(0, safe)
        else:
            out = torch.tanh(self.text_proj(self.item_text.index_select(0, safe)))
        if not bool(known.all()):
            # Content-only path: an online item has no trained row, only its BERT vector.
            rows = torch.nonzero(~known).squeeze(1)
            values = torch.tanh(self.text_proj(extra_text[items[rows] - n_known]))
            out = out.index_put([rows], values)   # out of place: autograd needs the tanh output intact
        return out

    @torch.jit.unused
    def freeze(self) -> None:
        """Project the item text once; the served model then needs only the projection, so the
        [I, Dt] text table is dropped (an [I, 0] tensor keeps its row count): at 1M items 1.5 GB
        less in Triton."""
        if self.item_text.shape[1] == 0:   # frozen already
            return
        with torch.no_grad():
            self.item_hidden = torch.tanh(self.text_proj(self.item_text))
            # A new empty tensor, not a slice: a view would still save the whole storage.
            self.item_text = torch.empty(self.item_text.shape[0], 0)

    def known_rows(self, table: Tensor, items: Tensor) -> Tensor:
        """Rows of a per-item table; zeros for online items (no CF factor, no popularity yet)."""
        known = items < table.shape[0]
        rows = gather(table, torch.where(known, items, torch.zeros_like(items)))
        return rows * known.unsqueeze(-1).to(rows.dtype)

    def categories(self, items: Tensor, extra_category: Tensor) -> Tensor:
        n_known = self.item_category.shape[0]
        known = items < n_known
        out = self.item_category.index_select(0, torch.where(known, items, torch.zeros_like(items)))
        if not bool(known.all()):
            rows = torch.nonzero(~known).squeeze(1)
            out = out.index_put([rows], extra_category[items[rows] - n_known])
        return out

    def pad_histories(self, history: Tensor, history_len: Tensor) -> tuple[Tensor, Tensor]:
        """Ragged histories (flat [sum L], lengths [B]) -> the last max_history items of each, left
        aligned in [B, Lmax] (padding: item 0), and the mask of real entries [B, Lmax]."""
        keep = torch.clamp(history_len, max=self.max_history)
        width = int(keep.max()) if keep.numel() > 0 else 0
        positions = torch.arange(width).unsqueeze(0)                               # [1, Lmax]
        mask = positions < keep.unsqueeze(1)
        if width == 0:
            return torch.zeros(history_len.shape[0], 0, dtype=torch.int64), mask
        starts = torch.cumsum(history_len, 0) - keep                               # last `keep` of each
        index = torch.clamp(starts.unsqueeze(1) + positions, max=history.shape[0] - 1)
        padded = torch.where(mask, gather(history, index), torch.zeros_like(index))
        return padded, mask

    def user_text(self, history: Tensor, mask: Tensor, extra_text: Tensor) -> Tensor:
        """Padded histories [B, L] + mask -> [B, hidden] (zeros for an empty history)."""
        b, width = history.shape[0], history.shape[1]
        hidden = self.text_proj.out_features
        if width == 0:
            return torch.zeros(b, hidden)
        h = self.hidden(history.reshape(-1), extra_text).reshape(b, width, hidden)  # [B, L, H]
        # Padding is masked with a large negative, not -inf: an empty row then stays finite.
        logits = self.attn_q(h) @ self.attn_k(h).transpose(1, 2) / math.sqrt(hidden)
        att = torch.softmax(logits.masked_fill(~mask.unsqueeze(1), -1e9), dim=-1)
        h = h + att @ self.attn_v(h)                                               # self-attention
        pool = self.pool(h).squeeze(-1).masked_fill(~mask, -1e9)
        weights = torch.softmax(pool, dim=1)                                       # attention pooling
        u = (weights.unsqueeze(1) @ h).squeeze(1)
        return u * mask.any(1, keepdim=True).to(u.dtype)

    def user_cf(self, history: Tensor, mask: Tensor) -> Tensor:
        """Exact ALS fold-in of each padded history's distinct trained items -> [B, Dc]."""
        b, width = history.shape[0], history.shape[1]
        dc = self.cf_gram.shape[0]
        if width == 0:
            return torch.zeros(b, dc)
        earlier = torch.tril(torch.ones(width, width, dtype=torch.bool), diagonal=-1)   # j < i
        repeated = ((history.unsqueeze(2) == history.unsqueeze(1)) & mask.unsqueeze(1) & earlier).any(2)
        counted = mask & ~repeated   # ALS saw each item once; known_rows zeroes online items
        y = self.known_rows(self.item_cf, history) * counted.unsqueeze(-1).to(torch.float32)   # [B, L, Dc]
        a = self.cf_gram + self.cf_alpha * (y.transpose(1, 2) @ y) + self.cf_reg * torch.eye(dc)
        rhs = (1.0 + self.cf_alpha) * y.sum(1)
        return torch.linalg.solve(a, rhs)

    @torch.jit.export
    def forward_batch(self, history: Tensor, history_len: Tensor, candidates: Tensor,
                      candidate_count: Tensor, features: Tensor, extra_text: Tensor,
                      extra_category: Tensor) -> Tensor:
        """Several users at once (Triton's dynamic batches): user b has history_len[b] items of the
        flat history and candidate_count[b] of the flat candidates / feature rows, in order.
        history [sum L], candidates [N], features [N, F], extra_text [M, Dt], extra_category [M] -> [N].
        """
        padded, mask = self.pad_histories(history, history_len)
        owner = torch.repeat_interleave(torch.arange(history_len.shape[0]), candidate_count)   # [N]
        u = self.user_text(padded, mask, extra_text).index_select(0, owner)        # [N, H]
        c = self.hidden(candidates, extra_text)                                    # [N, H]
        cf_dot = (self.known_rows(self.item_cf, candidates) * self.user_cf(padded, mask).index_select(0, owner)).sum(1)
        cats = self.categories(candidates, extra_category)
        if padded.shape[1] > 0:
            hist_cats = self.categories(padded.reshape(-1), extra_category).reshape(padded.shape)
            owned_mask = mask.index_select(0, owner)
            same = (cats.unsqueeze(1) == hist_cats.index_select(0, owner)) & owned_mask
            share = same.sum(1, keepdim=True).float() / owned_mask.sum(1, keepdim=True).clamp(min=1).float()
        else:
            share = torch.zeros(candidates.shape[0], 1)
        x = torch.cat([u * c, (u * c).sum(1, keepdim=True), cf_dot.unsqueeze(-1),
                       self.known_rows(self.item_side, candidates), self.category(cats), share,
                       features], dim=1)
        return (self.mlp(x) + self.wide(features)).squeeze(-1)

    def forward(self, history: Tensor, candidates: Tensor, features: Tensor, extra_text: Tensor,
                extra_category: Tensor) -> Tensor:
        """One user: history [L], candidates [N], features [N, F], extra_text [M, Dt], extra_category [M] -> [N]."""
        return self.forward_batch(history, torch.tensor([history.shape[0]]), candidates,
                                  torch.tensor([candidates.shape[0]]), features, extra_text, extra_category)

"""The build's choice of score fusion (core.blend): which channel, and how much of it, on validation lists."""
from __future__ import annotations

import numpy as np

from core.blend import BLEND_ALPHAS, Blend, untrained
from core.features import CHANNELS, RETRIEVAL_FEATURES
from offline.ranker import RankingList, list_ndcg


def choose_blend(lists: list[RankingList], fused: list[np.ndarray], popularity: np.ndarray | None = None,
                 alphas: tuple[float, ...] = BLEND_ALPHAS) -> tuple[Blend, list[dict[str, object]]]:
    """-> (the blend with the best nDCG@10 of the blended order over `lists`, every row tried).

    The fused order alone (alpha 1) is the baseline row; a channel is tried only where it ranked some
    candidate. Ties keep the larger alpha, then the earlier channel: the fused order wins a tie.
    popularity [n_items]: the item_side column, so items without training interactions are blended
    as served (core.blend.untrained)."""
    masks = [None if popularity is None else untrained(lst.candidates, popularity) for lst in lists]
    rows: list[dict[str, object]] = [{"channel": None, "alpha": 1.0, "ndcg@10": list_ndcg(fused, lists)}]
    best, best_ndcg = Blend(), float(rows[0]["ndcg@10"])
    for channel in CHANNELS:
        column = RETRIEVAL_FEATURES.index(f"{channel}_rank_inv")
        if not any((lst.features[:, column] > 0).any() for lst in lists):
            continue
        for alpha in sorted((a for a in alphas if a < 1.0), reverse=True):
            blend = Blend(channel, float(alpha))
            ndcg = list_ndcg([blend.apply(s, lst.features, cold) for s, lst, cold in zip(fused, lists, masks)], lists)
            rows.append({"channel": channel, "alpha": float(alpha), "ndcg@10": ndcg})
            if ndcg > best_ndcg + 1e-12:
                best, best_ndcg = blend, ndcg
    return best, rows

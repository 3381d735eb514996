"""The build's choice of fresh slots (core.fresh): how many of the slate's last positions go to
candidates without training interactions.

On the re-ranker users' validation lists (train history -> validation items), every slot count
0..MAX_FRESH_SLOTS is applied to the served slates. Among the counts whose nDCG@10 is within
MAX_NDCG_COST (2%, the cost the diversity choice may take) of no slots, the build keeps the fewest
whose recall@10 of validation positives unseen in training reaches the BERT channel's own top 10's
(the one channel that proposes such items); when none reaches it, the count with the highest such
recall (ties: fewer slots). A count counts as reaching anything only when its unseen recall gain
over no slots is measurable: at least FRESH_MIN_Z standard errors of the per-list gains (one hit in
46 lists is noise, and each slot costs nDCG@10). Nothing unseen among the positives: no slots.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from core.fresh import MAX_FRESH_SLOTS, FreshItems
from offline.metrics import measurable_gain, ndcg_at_k, recall_at_k

MAX_NDCG_COST = 0.02
# A build chose 1 slot on one validation hit (46 lists with unseen positives): recall 0.0004, and on
# test the slot cost nDCG@10 and found none. The re-ranker's trees face the same rule (TREE_MIN_Z).
FRESH_MIN_Z = 2.0


def choose_fresh_slots(fresh: FreshItems, slates: list[tuple[np.ndarray, np.ndarray]],
                       candidates: list[tuple[np.ndarray, np.ndarray]], targets: list[np.ndarray],
                       bert_top: list[np.ndarray], popularity: np.ndarray, k: int = 10
                       ) -> tuple[FreshItems, dict[str, object]]:
    """slates: per list the served slate and its scores without fresh slots; candidates: per list
    (items, served scores); targets: the list's validation items; bert_top: the BERT channel's top
    k for the same user -> (fresh with the chosen slots, what was measured)."""
    unseen = [{int(i) for i in t if popularity[i] == 0} for t in targets]
    with_unseen = [j for j, u in enumerate(unseen) if u]
    relevant = [set(t.tolist()) for t in targets]

    def per_list_unseen_recall(lists: list[np.ndarray]) -> np.ndarray:
        return np.array([recall_at_k(lists[j].tolist(), unseen[j], k) for j in with_unseen], np.float64)

    rows, per_list = [], []
    for slots in range(MAX_FRESH_SLOTS + 1):
        rule = replace(fresh, slots=slots)
        served = [rule.fill_slate(slate, scores, items, score, popularity)[0]
                  for (slate, scores), (items, score) in zip(slates, candidates)]
        per_list.append(per_list_unseen_recall(served))
        rows.append({"slots": slots, "ndcg@10": float(np.mean([ndcg_at_k(s.tolist(), r, k) for s, r in zip(served, relevant)]))
                     if served else 0.0, "unseen_recall@10": float(per_list[-1].mean()) if with_unseen else 0.0,
                     "measurable": measurable_gain(per_list[-1] - per_list[0], FRESH_MIN_Z)})
    bert = float(per_list_unseen_recall(bert_top).mean()) if with_unseen else 0.0
    floor = rows[0]["ndcg@10"] * (1.0 - MAX_NDCG_COST)
    affordable = [r for r in rows if r["ndcg@10"] >= floor - 1e-12 and (r["slots"] == 0 or r["measurable"])]
    if not with_unseen:
        chosen = rows[0]
    else:
        reaching = [r for r in affordable if r["unseen_recall@10"] >= bert - 1e-12 and r["unseen_recall@10"] > 0]
        chosen = reaching[0] if reaching else max(affordable, key=lambda r: (r["unseen_recall@10"], -r["slots"]))
    report = {"lists": len(slates), "lists_with_unseen": len(with_unseen), "bert_unseen_recall@10": bert,
              "max_ndcg_cost": MAX_NDCG_COST, "min_z": FRESH_MIN_Z, "valid": rows}
    return replace(fresh, slots=int(chosen["slots"])), report

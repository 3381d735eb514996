"""Pure parts of the offline evaluation: baseline slates, per-user metrics, aggregation, verdicts.

Nothing here talks to a server: `tools.eval_replay` collects one `UserResult` per test user by
replaying them through the serving stack, and these functions turn those into the numbers of
`quality.json`. Item ids are internal indices (ints) throughout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from core.channel_names import CHANNEL_NAMES
from offline.metrics import (catalog_coverage, category_coverage, hit_rate_at_k, intra_list_diversity,
                             mean_impression_metrics, mrr, ndcg_at_k, novelty, recall_at_k)

SLATE_K = 10
RECALL_DEPTHS = (50, 100, 300)
CHANNELS = CHANNEL_NAMES   # every retrieval channel (core.channel_names)
# Reference recommenders (offline.references, trained on train + valid; "popular" is the popular
# channel's own list), then the pipeline's parts, weakest idea first; "full_pipeline" is what the
# gateway served.
REFERENCES = ("popular", "ease", "itemknn", "als", "bpr")
PIPELINE_SYSTEMS = ("cf_only", "bert_only", "item2item_only", "retrieval_order", "fused_ranker", "full_pipeline")
SYSTEMS = (*REFERENCES, *PIPELINE_SYSTEMS)
SLATE_METRICS = ("hr@10", "ndcg@10", "mrr@10", "recall@10", "ild@10", "category_coverage@10",
                 "novelty", "novelty_norm")


# ---------------------------------------------------------------- per-user data

@dataclass
class UserResult:
    """What one replayed test user produced. Lists are item indices, best first."""
    relevant: set[int]                    # test positives not already in the history
    cold_relevant: set[int]               # the subset never seen in training
    n_train: int                          # train interactions of the user
    channels: dict[str, np.ndarray]       # bert/cf/popular/merged -> [<=depth] int64
    slates: dict[str, np.ndarray]         # system (SYSTEMS) -> [<=k] int64
    sweep: dict[float, np.ndarray] = field(default_factory=dict)   # diversity weight -> slate [<=k]
    matches_gateway: bool | None = None   # gateway slate == in-process re-rank at the served weight
    degraded: list[str] = field(default_factory=list)

    def channel(self, name: str) -> np.ndarray:
        """A channel's list; empty for a channel this result has none for (a set built without it)."""
        return self.channels.get(name, np.zeros(0, np.int64))


@dataclass(frozen=True)
class ItemTables:
    """Item-side tables the beyond-accuracy metrics need."""
    item_text: np.ndarray       # [n_items, d] BERT vectors
    item_category: np.ndarray   # [n_items] int64, 0 = unknown
    train_counts: np.ndarray    # [n_items] int64 training interactions per item

    @property
    def n_items(self) -> int:
        return len(self.train_counts)

    def popularity_rank(self) -> dict[int, int]:
        """{item: 1-based rank by training count}; items never interacted with are left out."""
        order = np.argsort(-self.train_counts, kind="stable")
        order = order[self.train_counts[order] > 0]
        return {int(item): rank for rank, item in enumerate(order, start=1)}


# ---------------------------------------------------------------- baselines

def top_k_by_score(items: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """items [N], scores [N] -> the k best items [<=k]; ties keep the input order."""
    if len(items) != len(scores):
        raise ValueError(f"items [{len(items)}] and scores [{len(scores)}] differ in length")
    return np.asarray(items, np.int64)[np.argsort(-np.asarray(scores), kind="stable")[:k]]


def first_k(items: np.ndarray, k: int) -> np.ndarray:
    """A ranked list [N] -> its first k [<=k] (retrieval order, a channel's own order)."""
    return np.asarray(items, np.int64)[:k]


# ---------------------------------------------------------------- slate metrics

def slate_values(slate: np.ndarray, relevant: set[int], tables: ItemTables, pop_rank: dict[int, int],
                 k: int = SLATE_K) -> dict[str, float]:
    """One slate [<=k] against one user's relevant set -> every SLATE_METRICS value."""
    items = [int(i) for i in slate[:k]]
    nov = novelty(items, pop_rank)
    return {
        "hr@10": hit_rate_at_k(items, relevant, k),
        "ndcg@10": ndcg_at_k(items, relevant, k),
        "mrr@10": mrr(items, relevant, k),
        "recall@10": recall_at_k(items, relevant, k),
        "ild@10": intra_list_diversity(tables.item_text[items]) if items else 0.0,
        "category_coverage@10": category_coverage(tables.item_category[items].tolist()),
        "novelty": nov,
        # Mean popularity rank over the catalog size: 0 = the most popular, 1 = the long tail.
        "novelty_norm": nov / (len(pop_rank) + 1) if items else 0.0,
    }


def per_user_values(slates: list[np.ndarray], relevants: list[set[int]], tables: ItemTables,
                    pop_rank: dict[int, int], k: int = SLATE_K) -> dict[str, np.ndarray]:
    """U slates and relevant sets -> metric -> [U] values (users with no relevant item skipped)."""
    rows = [slate_values(s, r, tables, pop_rank, k) for s, r in zip(slates, relevants) if r]
    return {m: np.array([row[m] for row in rows], np.float64) for m in SLATE_METRICS}


def summarize(values: dict[str, np.ndarray], slates: list[np.ndarray], n_items: int) -> dict[str, float]:
    """Per-user values -> means, a 95% interval half-width on nDCG@10, catalog coverage, user count."""
    out = {m: _mean(v) for m, v in values.items()}
    ndcg = values.get("ndcg@10", np.zeros(0))
    out["ndcg@10_ci95"] = float(1.96 * ndcg.std(ddof=1) / math.sqrt(len(ndcg))) if len(ndcg) > 1 else float("nan")
    out["catalog_coverage"] = catalog_coverage((s.tolist() for s in slates), n_items)
    out["users"] = len(ndcg)
    return out


def system_table(results: list[UserResult], tables: ItemTables, systems: tuple[str, ...] = SYSTEMS,
                 k: int = SLATE_K) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, np.ndarray]]]:
    """-> (system -> summary, system -> per-user values) over the users' `slates`."""
    pop_rank = tables.popularity_rank()
    summaries, per_user = {}, {}
    relevants = [r.relevant for r in results]
    for name in systems:
        slates = [r.slates[name] for r in results]
        per_user[name] = per_user_values(slates, relevants, tables, pop_rank, k)
        summaries[name] = summarize(per_user[name], slates, tables.n_items)
    return summaries, per_user


def cold_item_table(results: list[UserResult], systems: tuple[str, ...] = SYSTEMS,
                    k: int = SLATE_K, depth: int = max(RECALL_DEPTHS)) -> dict[str, object]:
    """Recall of test positives never seen in training: in each system's slate (@k) and in each
    retrieval list (@depth), averaged over users that have such a positive."""
    users = [r for r in results if r.cold_relevant]
    systems_recall = {name: _mean(np.array([recall_at_k(r.slates[name].tolist(), r.cold_relevant, k) for r in users]))
                      for name in systems}
    retrieval_recall = {channel: _mean(np.array([recall_at_k(r.channel(channel).tolist(), r.cold_relevant, depth)
                                                 for r in users])) for channel in (*CHANNELS, "merged")}
    out = {"systems": systems_recall, "retrieval": retrieval_recall, "users": len(users),
           "positives": sum(len(r.cold_relevant) for r in users)}
    return out


# ---------------------------------------------------------------- retrieval

def recall_curve(lists: list[np.ndarray], relevants: list[set[int]], max_k: int) -> np.ndarray:
    """Mean recall@K for K = 1..max_k -> [max_k] (users with no relevant item skipped)."""
    curves = []
    for ranked, relevant in zip(lists, relevants):
        if not relevant:
            continue
        hits = np.zeros(max_k, np.float64)
        seen: set[int] = set()
        for pos, item in enumerate(ranked[:max_k].tolist()):
            if item in relevant and item not in seen:
                hits[pos] = 1.0
            seen.add(item)
        curves.append(np.cumsum(hits) / len(relevant))
    return np.mean(curves, axis=0) if curves else np.zeros(max_k)


def retrieval_table(results: list[UserResult], depths: tuple[int, ...] = RECALL_DEPTHS
                    ) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """-> ({channel|merged: {recall@K}, unretrieved: {...}}, channel -> recall curve [max depth])."""
    relevants = [r.relevant for r in results]
    max_k = max(depths)
    table: dict[str, dict[str, float]] = {}
    curves: dict[str, np.ndarray] = {}
    for channel in (*CHANNELS, "merged"):
        curves[channel] = recall_curve([r.channel(channel) for r in results], relevants, max_k)
        table[channel] = {f"recall@{d}": float(curves[channel][d - 1]) for d in depths}
    positives = sum(len(r.relevant) for r in results)
    missed_any = sum(len(r.relevant - set().union(*(set(r.channel(c)[:max_k].tolist()) for c in CHANNELS)))
                     for r in results)
    missed_merged = sum(len(r.relevant - set(r.channels["merged"].tolist())) for r in results)
    table["unretrieved"] = {
        # Micro shares over all test positives: a positive no channel finds can never be served.
        f"no_channel@{max_k}": missed_any / positives if positives else float("nan"),
        "not_in_merged": missed_merged / positives if positives else float("nan"),
        "positives": positives}
    return table, curves


# ---------------------------------------------------------------- sweep, impressions

def sweep_table(results: list[UserResult], tables: ItemTables, k: int = SLATE_K) -> list[dict[str, float]]:
    """Diversity weight -> mean nDCG@10, HR@10, ILD@10, category coverage of the re-ranked slates."""
    weights = sorted({w for r in results for w in r.sweep})
    pop_rank = tables.popularity_rank()
    rows = []
    for w in weights:
        users = [r for r in results if w in r.sweep]
        values = per_user_values([r.sweep[w] for r in users], [r.relevant for r in users], tables, pop_rank, k)
        rows.append({"weight": float(w), **{m: _mean(values[m]) for m in
                                            ("ndcg@10", "hr@10", "ild@10", "category_coverage@10", "novelty_norm")}})
    return rows


def impression_table(cases: list[tuple[dict[str, np.ndarray], np.ndarray]]) -> dict[str, dict[str, float]]:
    """[(scorer -> scores [S], labels [S])] -> scorer -> MIND metrics averaged per impression."""
    scorers = sorted({name for scores, _ in cases for name in scores})
    out = {name: mean_impression_metrics((scores[name], labels) for scores, labels in cases if name in scores)
           for name in scorers}
    for metrics in out.values():
        metrics["impressions"] = int(metrics["impressions"])
    return out


# ---------------------------------------------------------------- verdicts

def paired_interval(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of a - b [U] with a 95% paired bootstrap interval over users."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if len(diff) == 0:
        return {"delta": float("nan"), "lo": float("nan"), "hi": float("nan")}
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    return {"delta": float(diff.mean()), "lo": float(np.quantile(means, 0.025)), "hi": float(np.quantile(means, 0.975))}


def best_system(summaries: dict[str, dict[str, float]], metric: str = "ndcg@10") -> str:
    """The system with the highest mean `metric` (first in SYSTEMS order on a tie)."""
    return max(summaries, key=lambda name: (summaries[name][metric], -list(summaries).index(name)))


def winner_verdict(summaries: dict[str, dict[str, float]], per_user: dict[str, dict[str, np.ndarray]],
                   metric: str = "ndcg@10") -> dict[str, object]:
    """The best system on `metric`, the runner-up, and whether the gap is measurable (paired interval > 0)."""
    best = best_system(summaries, metric)
    others = {name: s for name, s in summaries.items() if name != best}
    if not others:
        return {"best": best, "runner_up": None, "delta": None, "clear": True}
    runner_up = best_system(others, metric)
    delta = paired_interval(per_user[best][metric], per_user[runner_up][metric], seed=2)
    return {"best": best, "runner_up": runner_up, "delta": delta, "clear": bool(delta["lo"] > 0)}


def reference_verdict(summaries: dict[str, dict[str, float]], per_user: dict[str, dict[str, np.ndarray]],
                      references: tuple[str, ...] = REFERENCES, system: str = "full_pipeline",
                      metric: str = "ndcg@10") -> dict[str, object]:
    """Does `system` beat the best reference on `metric`? Paired bootstrap of system - best reference
    over users: "beats" when the interval is above 0, "loses" when below, else "ties"."""
    present = {name: summaries[name] for name in references if name in summaries}
    if not present or system not in summaries:
        return {"best_reference": None, "system": system, "delta": None, "ratio": None, "outcome": None,
                "beats": False}
    best = best_system(present, metric)
    delta = paired_interval(per_user[system][metric], per_user[best][metric], seed=3)
    outcome = "beats" if delta["lo"] > 0 else "loses" if delta["hi"] < 0 else "ties"
    base = summaries[best][metric]
    return {"best_reference": best, "system": system, "metric": metric, "delta": delta,
            "ratio": float(summaries[system][metric] / base) if base else float("nan"),
            "outcome": outcome, "beats": outcome == "beats"}


def reranker_verdict(per_user: dict[str, dict[str, np.ndarray]], full: str = "full_pipeline",
                     fused: str = "fused_ranker") -> dict[str, object]:
    """Does the LightGBM re-ranker (full) earn its place over top-k by fused score (fused)?

    Yes when it gains nDCG@10 (interval above 0), or when nDCG@10 does not measurably drop
    (interval spans 0) while intra-list diversity rises (interval above 0). Otherwise no."""
    ndcg = paired_interval(per_user[full]["ndcg@10"], per_user[fused]["ndcg@10"])
    ild = paired_interval(per_user[full]["ild@10"], per_user[fused]["ild@10"], seed=1)
    if ndcg["lo"] > 0:
        earns, why = True, "it raises nDCG@10"
    elif ndcg["hi"] >= 0 and ild["lo"] > 0:
        earns, why = True, "it raises diversity without a measurable nDCG@10 loss"
    elif ndcg["hi"] < 0:
        earns, why = False, "it lowers nDCG@10"
    else:
        earns, why = False, "neither nDCG@10 nor diversity improves measurably"
    return {"earns_its_place": earns, "why": why, "ndcg@10_delta": ndcg, "ild@10_delta": ild}


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else float("nan")

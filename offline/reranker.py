"""Train the LightGBM LambdaRank re-ranker on candidate lists scored by the fused ranker.

Each list is replayed as the greedy slate would be built: at position p the slate so far is the
top-p of the pool by fused score, and every remaining pool item becomes a row of one query group
(label = relevant), with its diversity features measured against that prefix.

The build then chooses what ranking serves (choose_reranking, written to manifest "reranker"): the
diversity weight from a small sweep on validation lists (0 included), the largest ILD@10 gain within
2% of the sweep's best nDCG@10; and whether the trees may correct the fused order at all: unless they
raise validation nDCG@10 at weight 0 by two standard errors of the per-list gains (TREE_MIN_Z), ranking
serves the fused order with only the diversity step.
"""
from __future__ import annotations

import lightgbm as lgb
import numpy as np
from tqdm import tqdm

from core.features import RERANK_FEATURES
from offline.metrics import intra_list_diversity, ndcg_at_k, standard_error
from offline.ranker import RankingList
from core.rerank import FUSED_COLUMN, DiversityReranker, NoCorrection, SlatePool


def rerank_training_groups(lists: list[RankingList], fused: list[np.ndarray], item_text: np.ndarray,
                           item_category: np.ndarray, item_side: np.ndarray, positions: int = 10,
                           progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[int]]:
    xs, ys, groups = [], [], []
    for lst, scores in tqdm(list(zip(lists, fused)), desc="reranker data", unit="list", disable=not progress):
        if not lst.labels.any():
            continue
        pool = SlatePool(lst.candidates, scores, lst.features, item_text, item_category, item_side)
        labels = dict(zip(lst.candidates.tolist(), lst.labels.tolist()))
        pool_labels = np.array([labels[int(i)] for i in pool.items], np.float32)
        for position in range(min(positions, len(pool.items) - 1)):
            rows = np.flatnonzero(pool.remaining)
            if pool_labels[rows].any():
                xs.append(pool.features(position)[rows])
                ys.append(pool_labels[rows])
                groups.append(len(rows))
            pool.place(int(rows[0]))   # prefix = fused order (rows are kept in fused order)
    if not xs:
        raise ValueError("no re-ranker training list has a relevant candidate")
    return np.concatenate(xs), np.concatenate(ys), groups


def train_reranker(x: np.ndarray, y: np.ndarray, groups: list[int], seed: int = 0, rounds: int = 80,
                   valid: tuple[np.ndarray, np.ndarray, list[int]] | None = None) -> lgb.Booster:
    """LambdaRank boosted from the fused score (init_score): the trees learn corrections to the fused
    order. With `valid` groups, stops at the round with the best validation nDCG@10."""
    # Few, shallow-ish trees: serving calls the model k times per request on the greedy slate,
    # and its cost grows with rows x trees.
    params = {"objective": "lambdarank", "metric": "ndcg", "ndcg_eval_at": [10],
              "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 50,
              "feature_fraction": 0.9, "num_threads": 2, "seed": seed, "verbose": -1,
              "deterministic": True}

    def dataset(x, y, groups):
        return lgb.Dataset(x, y, group=groups, init_score=x[:, FUSED_COLUMN], feature_name=list(RERANK_FEATURES))

    train = dataset(x, y, groups)
    if valid is None:
        return lgb.train(params, train, num_boost_round=rounds)
    return lgb.train(params, train, num_boost_round=rounds, valid_sets=[dataset(*valid)],
                     callbacks=[lgb.early_stopping(10, verbose=False)])


# The diversity weight is chosen by the build on validation lists (offline.build): a small grid,
# 0 included; the largest ILD@10 gain whose nDCG@10 is within NDCG_TOLERANCE of the sweep's best.
SWEEP_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)   # all in tools.evaluate's sweep
NDCG_TOLERANCE = 0.02


def slate_ndcgs(slates: list[np.ndarray], lists: list[RankingList], k: int = 10) -> list[float]:
    """nDCG@k of each slate against its list's relevant candidates."""
    return [ndcg_at_k(s.tolist(), set(l.candidates[l.labels > 0].tolist()), k) for s, l in zip(slates, lists)]


def fused_slates(lists: list[RankingList], fused: list[np.ndarray], k: int = 10) -> list[np.ndarray]:
    return [l.candidates[np.argsort(-s, kind="stable")[:k]] for l, s in zip(lists, fused)]


def sweep_per_list(reranker: DiversityReranker, lists: list[RankingList], fused: list[np.ndarray],
                   item_text: np.ndarray, weights: tuple[float, ...] = SWEEP_WEIGHTS,
                   k: int = 10) -> tuple[dict[str, list[float]], list[tuple[float, dict[str, list[float]]]]]:
    """(fused order, [(weight, ...)]): each list's nDCG@k and ILD@k of its slate."""
    def values(slates: list[np.ndarray]) -> dict[str, list[float]]:
        return {"ndcg@10": slate_ndcgs(slates, lists, k), "ild@10": [intra_list_diversity(item_text[s]) for s in slates]}

    return values(fused_slates(lists, fused, k)), [
        (float(w), values([reranker.rerank(l.candidates, s, l.features, k, w)[0] for l, s in zip(lists, fused)]))
        for w in weights]


def _means(values: dict[str, list[float]]) -> dict[str, float]:
    return {key: float(np.mean(v)) if v else 0.0 for key, v in values.items()}


def diversity_sweep(reranker: DiversityReranker, lists: list[RankingList], fused: list[np.ndarray],
                    item_text: np.ndarray, weights: tuple[float, ...] = SWEEP_WEIGHTS,
                    k: int = 10) -> tuple[dict[str, float], list[dict[str, float]]]:
    """(fused-order row, one row per weight): mean nDCG@k and ILD@k of the slates over `lists`."""
    fused_values, weighted = sweep_per_list(reranker, lists, fused, item_text, weights, k)
    return _means(fused_values), [{"weight": w, **_means(v)} for w, v in weighted]


def choose_weight(rows: list[dict[str, float]], tolerance: float = NDCG_TOLERANCE) -> float:
    """The weight with the largest ILD@10 gain over the smallest weight (0) among the rows whose
    nDCG@10 is at least (1 - tolerance) x the best nDCG@10 of the sweep; ties -> the smaller weight."""
    if not rows:
        raise ValueError("empty diversity sweep")
    rows = sorted(rows, key=lambda r: r["weight"])
    best = max(r["ndcg@10"] for r in rows)
    eligible = [r for r in rows if r["ndcg@10"] >= (1.0 - tolerance) * best]
    base = rows[0]["ild@10"]
    return float(max(eligible, key=lambda r: (r["ild@10"] - base, -r["weight"]))["weight"])


# The trees are served only when their validation gain over the fused order at weight 0 is at
# least TREE_MIN_Z standard errors of the per-list paired gains: a gain inside the noise of ~200
# lists is no reason to serve them (ml-latest-small: +0.0008 on validation, -0.007 on test; and at
# one standard error, a build whose trees gained +0.0050 against a needed +0.0047 lost 0.0054 on test).
TREE_MIN_Z = 2.0


def choose_reranking(tree_rows: list[dict[str, float]], plain_rows: list[dict[str, float]],
                     fused_ndcg: float, tolerance: float = NDCG_TOLERANCE, gain_se: float = 0.0) -> dict[str, object]:
    """What the ranking service serves: {"trees", "diversity_weight", "why"}.

    tree_rows: the sweep with the LightGBM corrections; plain_rows: the same sweep with no
    correction (fused order + the diversity step). The trees must raise validation nDCG@10 at
    weight 0 over the fused order by at least TREE_MIN_Z x gain_se (the standard error of the
    per-list gains; 0: they must only not lower it); otherwise they are switched off (trees = false,
    ranking serves core.rerank.NoCorrection) and the weight is chosen on plain_rows."""
    zero = min(tree_rows, key=lambda r: r["weight"])
    gain, needed = zero["ndcg@10"] - fused_ndcg, TREE_MIN_Z * gain_se
    if gain >= needed:
        return {"trees": True, "diversity_weight": choose_weight(tree_rows, tolerance),
                "why": f"trees at weight {zero['weight']:g} raise validation nDCG@10 by {gain:+.4f} "
                       f"({zero['ndcg@10']:.4f} against fused {fused_ndcg:.4f}; needed {needed:+.4f})"}
    return {"trees": False, "diversity_weight": choose_weight(plain_rows, tolerance),
            "why": f"trees at weight {zero['weight']:g} change validation nDCG@10 by {gain:+.4f} "
                   f"({zero['ndcg@10']:.4f} against fused {fused_ndcg:.4f}), less than the {needed:+.4f} "
                   "needed: fused order + diversity step served"}


FOLDS = 5   # the re-ranker's choice is cross-validated: every validation list judges once


def _mean_rows(parts: list[tuple[int, list[dict[str, float]]]]) -> list[dict[str, float]]:
    """Per-fold sweep rows (lists in the fold, rows) -> rows averaged over folds, weighted by lists."""
    total = sum(n for n, _ in parts)
    out = []
    for j, first in enumerate(parts[0][1]):
        row = {key: sum(n * rows[j][key] for n, rows in parts) / total for key in first if key != "weight"}
        if "weight" in first:
            row = {"weight": first["weight"], **row}
        out.append(row)
    return out


def cross_validated_choice(lists: list[RankingList], fused: list[np.ndarray], item_text: np.ndarray,
                           item_category: np.ndarray, item_side: np.ndarray, seed: int = 0,
                           folds: int = FOLDS, progress: bool = True) -> tuple[lgb.Booster, dict[str, object]]:
    """The re-ranker the build serves: (booster, manifest "reranker" section).

    Lists with a relevant candidate are split into `folds` folds (list j in fold j % folds). For each
    fold a booster trains on the others (early stopping on the fold) and the fold's lists are swept
    with and without its trees; the sweeps, averaged over folds, choose trees on/off and the diversity
    weight (choose_reranking) from every list instead of one held-out fifth (a fifth of ~300 lists
    chose by noise: on the synthetic generic set the trees won +0.023 on 58 held-out lists and lost
    0.005 on test). The served booster trains on all lists for the folds' mean best round count."""
    usable = [j for j in range(len(lists)) if lists[j].labels.any()]
    folds = max(1, min(folds, len(usable) // 2))

    def groups_of(rows: list[int]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        return rerank_training_groups([lists[j] for j in rows], [fused[j] for j in rows], item_text,
                                      item_category, item_side, progress=False)

    fused_parts, tree_parts, plain_parts, rounds = [], [], [], []
    gains: list[float] = []   # per list: trees at weight 0 minus the fused order, nDCG@10
    for f in tqdm(range(folds), desc="reranker folds", unit="fold", disable=not progress or folds < 2):
        held = [j for k, j in enumerate(usable) if k % folds == f] if folds > 1 else usable
        train = [j for k, j in enumerate(usable) if k % folds != f] if folds > 1 else usable
        try:
            booster = train_reranker(*groups_of(train), seed=seed, valid=groups_of(held) if folds > 1 else None)
            rounds.append(booster.best_iteration or booster.current_iteration())
        except ValueError:   # no relevant item in these lists' pools: nothing to learn, nothing to correct
            booster = NoCorrection()
        sweep_args = ([lists[j] for j in held], [fused[j] for j in held], item_text)
        fused_values, tree_values = sweep_per_list(DiversityReranker(booster, item_text, item_category, item_side),
                                                   *sweep_args)
        fused_row, tree_rows = _means(fused_values), [{"weight": w, **_means(v)} for w, v in tree_values]
        _, plain_rows = diversity_sweep(DiversityReranker(NoCorrection(), item_text, item_category, item_side),
                                        *sweep_args)
        zero = min(tree_values, key=lambda wv: wv[0])[1]   # the smallest weight, as choose_reranking reads
        gains += [t - f for t, f in zip(zero["ndcg@10"], fused_values["ndcg@10"])]
        fused_parts.append((len(held), [fused_row]))
        tree_parts.append((len(held), tree_rows))
        plain_parts.append((len(held), plain_rows))
    fused_valid = _mean_rows(fused_parts)[0]
    tree_rows, plain_rows = _mean_rows(tree_parts), _mean_rows(plain_parts)
    gain_se = standard_error(gains)
    chosen = choose_reranking(tree_rows, plain_rows, fused_valid["ndcg@10"], gain_se=gain_se)
    served_rounds = max(1, int(round(float(np.mean(rounds))))) if rounds else 1
    booster = train_reranker(*groups_of(usable), seed=seed, rounds=served_rounds)
    section = {**chosen, "ndcg_tolerance": NDCG_TOLERANCE, "tree_gain_se": gain_se, "tree_min_z": TREE_MIN_Z,
               "lists": len(usable), "folds": folds,
               "lists_source": f"{folds}-fold cross-validation" if folds > 1 else "training_valid",
               "rounds": served_rounds, "fold_rounds": rounds,
               "fused_valid": fused_valid, "sweep": tree_rows, "sweep_no_trees": plain_rows}
    return booster, section

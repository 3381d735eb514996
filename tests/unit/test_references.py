"""The reference recommenders (offline.references) on tiny hand-made matrices with known answers."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from offline import references as refs

# 8 users x 6 items: items 0-2 go together, items 3-5 go together, item 2 also with 3.
ROWS = [[0, 1, 2], [0, 1], [1, 2], [0, 2], [3, 4, 5], [3, 4], [4, 5], [2, 3, 5]]


def _matrix(rows: list[list[int]] = ROWS, n_items: int = 6) -> sp.csr_matrix:
    users = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    return refs.interaction_matrix(users, np.concatenate([np.array(r) for r in rows]), len(rows), n_items)


def test_interaction_matrix_is_binary_and_history_rows_match() -> None:
    x = refs.interaction_matrix(np.array([0, 0, 1]), np.array([2, 2, 0]), 2, 3)
    assert x.toarray().tolist() == [[0, 0, 1], [1, 0, 0]] and x.dtype == np.float32
    assert refs.history_rows([np.array([2, 2]), np.array([], np.int64)], 3).toarray().tolist() == [[0, 0, 1], [0, 0, 0]]


def test_top_k_breaks_ties_by_index_and_drops_minus_infinity() -> None:
    scores = np.array([0.5, 1.0, 0.5, -np.inf, 1.0, 0.2], np.float32)
    assert refs.top_k(scores, 3).tolist() == [1, 4, 0]
    assert refs.top_k(scores, 10).tolist() == [1, 4, 0, 2, 5]
    assert refs.top_k(np.full(3, -np.inf, np.float32), 2).tolist() == []


# ---------------------------------------------------------------- EASE

def test_ease_weights_equal_the_constrained_least_squares_solved_column_by_column() -> None:
    x = _matrix().toarray().astype(np.float64)
    lam = 0.7
    b = refs.ease_weights(refs.gram(_matrix()), lam)
    # Independently of the closed form: column j minimizes ||x_j - X_{-j} w||² + λ||w||² (B_jj = 0).
    n = x.shape[1]
    expected = np.zeros((n, n))
    for j in range(n):
        others = [i for i in range(n) if i != j]
        xo = x[:, others]
        expected[others, j] = np.linalg.solve(xo.T @ xo + lam * np.eye(n - 1), xo.T @ x[:, j])
    assert b.dtype == np.float32 and np.all(np.diag(b) == 0)
    np.testing.assert_allclose(b, expected, atol=1e-5)
    # ... and the closed form from the brief: B = I - P diag(1/diag(P)), P = (XᵀX + λI)⁻¹.
    p = np.linalg.inv(x.T @ x + lam * np.eye(n))
    np.testing.assert_allclose(b, np.eye(n) - p / np.diag(p)[None, :], atol=1e-5)


def test_ease_weights_on_a_catalog_larger_than_one_mirror_block() -> None:
    rng = np.random.default_rng(0)
    x = (rng.random((400, 1100)) < 0.05).astype(np.float32)
    g = x.T @ x
    b = refs.ease_weights(g, 5.0)
    p = np.linalg.inv(g.astype(np.float64) + 5.0 * np.eye(1100))
    np.testing.assert_allclose(b, np.eye(1100) - p / np.diag(p)[None, :], atol=1e-4)


def test_ease_recommends_by_history_times_b_without_seen_items() -> None:
    x = _matrix()
    model = refs.EaseReference(lam=0.5).fit(x)
    history = np.array([0, 1])
    scores = history_scores = refs.history_rows([history], 6).toarray() @ model.b
    expected = [int(i) for i in np.argsort(-scores[0], kind="stable") if i not in (0, 1)][:3]
    got = model.recommend([history], [history], k=3)[0]
    assert got.tolist() == expected and got[0] == 2   # the third item of the {0,1,2} group first
    assert history_scores.shape == (1, 6)


def test_ease_restricted_to_the_most_popular_items_scores_only_those() -> None:
    x = _matrix()   # counts per item: 3, 3, 4, 3, 3, 3 -> item 2, then ties to the lower index: 0, 1
    model = refs.EaseReference(lam=0.5, max_items=3).fit(x)
    assert model.restricted_to == 3 and model.columns.tolist() == [0, 1, 2]
    slate = model.recommend([np.array([3, 0])], [np.array([3, 0])], k=6)[0]
    assert slate.tolist() and set(slate.tolist()) <= {1, 2}
    full = refs.EaseReference(lam=0.5, max_items=None).fit(x[:, [0, 1, 2]])
    np.testing.assert_allclose(model.b, full.b)


def test_tune_ease_lambda_picks_the_best_of_the_grid_on_validation() -> None:
    train = _matrix([[0, 1], [0, 2], [1, 2], [3, 4], [3, 5], [4, 5]])
    valid = _matrix([[2], [1], [0], [5], [4], [3]])
    best, found = refs.tune_ease_lambda(train, valid, lambdas=(0.1, 1.0, 1000.0))
    assert set(found) == {0.1, 1.0, 1000.0} and found[best] == max(found.values())
    assert found[best] == pytest.approx(1.0)   # every user's missing group item comes first


# ---------------------------------------------------------------- ItemKNN

def _cosine(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=0)
    sim = (x.T @ x) / np.outer(norms, norms)
    np.fill_diagonal(sim, 0.0)
    return sim


def test_itemknn_with_every_neighbour_equals_the_exact_cosine() -> None:
    x = _matrix()
    model = refs.ItemKnnReference(neighbours=10, block=4).fit(x)   # blocks of 4 items: two blocks
    np.testing.assert_allclose(model.sim.toarray(), _cosine(x.toarray()), atol=1e-6)


def test_itemknn_keeps_each_items_top_n_neighbours_and_sums_them_over_the_history() -> None:
    x = _matrix()
    exact = _cosine(x.toarray())
    model = refs.ItemKnnReference(neighbours=2).fit(x)
    sim = model.sim.toarray()
    for i in range(6):
        kept = np.flatnonzero(sim[i])
        assert len(kept) == 2
        np.testing.assert_allclose(sim[i, kept], exact[i, kept], atol=1e-6)
        assert exact[i, kept].min() >= np.sort(exact[i])[-2] - 1e-6   # they are the two most similar
    history = np.array([0, 3])
    scores = sim[0] + sim[3]
    expected = [int(i) for i in np.lexsort((np.arange(6), -scores)) if i not in (0, 3) and scores[i] > 0]
    assert model.recommend([history], [history], k=6)[0].tolist() == expected


# ---------------------------------------------------------------- ALS, BPR

def _blocks(n_users: int = 60, seed: int = 0) -> sp.csr_matrix:
    """Two disjoint item groups (0-4, 5-9); each user picks 3 items of one group."""
    rng = np.random.default_rng(seed)
    rows = [(rng.choice(5, 3, replace=False) + (5 if u % 2 else 0)).tolist() for u in range(n_users)]
    return _matrix(rows, 10)


def test_als_folds_users_in_by_exact_least_squares() -> None:
    x = _blocks()
    model = refs.AlsReference(factors=4, iterations=10, regularization=0.1, alpha=2.0).fit(x)
    y = np.asarray(model.model.item_factors, np.float64)
    history = np.array([0, 1, 2])
    # Closed form (Hu, Koren, Volinsky 2008): (YᵀC_uY + λI)⁻¹ YᵀC_u p_u, with implicit's confidence
    # c_ui = α·r_ui for an observed item (1 otherwise), as in its training.
    c = np.ones(10)
    c[history] = 2.0
    p = np.zeros(10)
    p[history] = 1.0
    expected = np.linalg.solve(y.T @ (c[:, None] * y) + 0.1 * np.eye(4), y.T @ (c * p))
    np.testing.assert_allclose(model.user_vectors(refs.history_rows([history], 10))[0], expected, rtol=1e-3,
                               atol=1e-4)
    slate = model.recommend([history], [history], k=2)[0]
    assert set(slate.tolist()) == {3, 4}   # the rest of its group


def test_bpr_scores_mean_history_factors_plus_item_bias() -> None:
    x = _blocks()
    model = refs.BprReference(factors=4, iterations=200, learning_rate=0.05).fit(x)
    v = model.item_factors
    assert v.shape == (10, 5)                      # 4 factors + implicit's item bias column
    history = np.array([5, 6, 7])
    expected = v[history, :-1].mean(axis=0) @ v[:, :-1].T + v[:, -1]
    np.testing.assert_allclose(model.scores(refs.history_rows([history], 10))[0], expected, rtol=1e-5, atol=1e-6)
    assert set(model.recommend([history], [history], k=2)[0].tolist()) == {8, 9}


@pytest.mark.parametrize("make", [lambda: refs.EaseReference(lam=1.0), lambda: refs.ItemKnnReference(neighbours=3),
                                  lambda: refs.AlsReference(factors=4, iterations=5),
                                  lambda: refs.BprReference(factors=4, iterations=20)],
                         ids=["ease", "itemknn", "als", "bpr"])
def test_seen_and_excluded_items_are_never_recommended(make) -> None:
    x = _blocks()
    model = make().fit(x)
    histories = [np.array([0, 1]), np.array([5]), np.array([], np.int64)]
    excludes = [np.array([0, 1, 2]), np.array([5, 6, 7, 8]), np.array([9])]
    slates = model.recommend(histories, excludes, k=10, batch=2)   # two batches
    assert len(slates) == 3
    for slate, exclude in zip(slates, excludes):
        assert not set(slate.tolist()) & set(exclude.tolist())
        assert len(set(slate.tolist())) == len(slate) <= 10
    with pytest.raises(ValueError, match="exclusion lists"):
        model.recommend(histories, excludes[:2])


def test_fit_references_tunes_ease_and_fits_all_four() -> None:
    train = _blocks(seed=1)
    valid = _blocks(seed=2)
    fitted = refs.fit_references(train, valid, lambdas=(1.0, 10.0), progress=False)
    assert set(fitted.models) == set(refs.REFERENCE_NAMES)
    assert fitted.info["ease"]["lambda"] in (1.0, 10.0)
    assert set(fitted.info["ease"]["validation_ndcg@10"]) == {"1.0", "10.0"}
    assert fitted.info["ease"]["restricted_to_items"] is None
    assert fitted.info["training"]["items"] == 10
    # Trained on the union of train and valid.
    both = (train + valid).toarray() > 0
    assert fitted.info["training"]["interactions"] == int(both.sum())

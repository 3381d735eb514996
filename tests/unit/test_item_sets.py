"""core.item_sets gives numpy's own answers (np.isin, np.unique + bincount, lexsort) on the inputs
the retrieval steps pass it: random lists with repeats, ties, empty sides, both accumulator paths."""
import numpy as np
import pytest

from core import item_sets
from core.item_sets import isin, sum_by_item, top_by_score


@pytest.mark.parametrize("seed", range(20))
def test_isin_equals_numpy(seed):
    rng = np.random.default_rng(seed)
    items = rng.integers(0, 50, rng.integers(0, 40))
    values = rng.integers(0, 60, rng.integers(0, 30))
    assert np.array_equal(isin(items, values), np.isin(items, values))


def test_isin_of_nothing():
    assert isin(np.zeros(0, np.int64), np.arange(3)).shape == (0,)
    assert not isin(np.arange(3), np.zeros(0, np.int64)).any()
    assert isin(np.array([7, 8, 9]), np.array([9])).tolist() == [False, False, True]   # past the largest value


def _reference_sums(ids, weights):
    items, inverse = np.unique(ids, return_inverse=True)
    return items, np.bincount(inverse, weights=weights, minlength=len(items)).astype(np.float32)


@pytest.mark.parametrize("limit_factor", [1, 1000])   # the dense accumulator, then the sorting path
@pytest.mark.parametrize("seed", range(10))
def test_sum_by_item_equals_unique_and_bincount(seed, limit_factor):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 30, 200).astype(np.int32)
    weights = rng.random(200).astype(np.float32)
    weights[::7] = 0.0   # an item reached with weight 0 still counts as reached
    limit = 30 * limit_factor
    assert (limit <= item_sets.DENSE_RANGE_FACTOR * len(ids)) == (limit_factor == 1)
    items, totals = sum_by_item(ids, weights, limit)
    want_items, want_totals = _reference_sums(ids, weights)
    assert np.array_equal(items, want_items)
    assert np.array_equal(totals, want_totals)   # same order of addition: bit-equal sums
    assert totals.dtype == np.float32


def test_sum_by_item_of_nothing():
    items, totals = sum_by_item(np.zeros(0, np.int32), np.zeros(0, np.float32), 10)
    assert len(items) == 0 and len(totals) == 0


@pytest.mark.parametrize("n", [0, 1, 5, 17, 40, 100])
@pytest.mark.parametrize("seed", range(10))
def test_top_by_score_is_the_head_of_the_full_sort(seed, n):
    rng = np.random.default_rng(seed)
    items = rng.permutation(60)[:40]
    scores = rng.integers(0, 6, 40).astype(np.float32)   # many ties, also at the cut
    rows = top_by_score(items, scores, n)
    assert np.array_equal(rows, np.lexsort((items, -scores))[:n])

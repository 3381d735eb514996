import faiss
import numpy as np
import pytest

from offline.index import build_index, recall_at_k
from common.components import load_retriever
from core.types import RetrievalQuery


@pytest.fixture(scope="module")
def retriever(artifacts):
    return load_retriever(artifacts)


def test_bert_channel_equals_exact_search(retriever, artifacts):
    vectors = artifacts.npy("item_text.npy")
    history = np.array([3, 17, 42], np.int64)
    got = retriever.bert.retrieve(RetrievalQuery("", history), 50)
    weights = np.linspace(1.0, 2.0, 3, dtype=np.float32)
    query = weights @ vectors[history]
    exact = np.argsort(-(vectors @ (query / np.linalg.norm(query))), kind="stable")[:50]
    assert len(set(got.items.tolist()) & set(exact.tolist())) >= 49


def test_seen_and_excluded_never_returned(retriever):
    history = np.arange(0, 40, dtype=np.int64)
    exclude = np.arange(40, 80, dtype=np.int64)
    # Explicit quotas: the build's tuned split may give a channel none (it then only fills up).
    out = retriever.retrieve("no-such-user", history, exclude, total=300,
                             quotas={"bert": 100, "cf": 100, "popular": 50, "item2item": 50})
    items = out.candidates.items
    assert len(items) == 300 == len(set(items.tolist()))
    assert not set(items.tolist()) & set(range(80))
    assert out.candidates.per_channel["bert"] > 0 and out.candidates.per_channel["cf"] > 0


def test_unknown_user_without_history_gets_popular_only(retriever):
    out = retriever.retrieve("nobody", np.zeros(0, np.int64), np.zeros(0, np.int64), total=50)
    assert set(out.skipped) == {"bert", "cf", "item2item", "sequential"}
    assert out.candidates.per_channel["popular"] == 50


def test_cf_fold_in_matches_trained_vector():
    """A user folded in from their training history gets (almost) the vector ALS trained for them."""
    from offline.cf import train_als
    from core.channels import CfChannel
    rng = np.random.default_rng(0)
    users = rng.integers(0, 300, 8000)
    items = (users * 7 + rng.integers(0, 60, 8000)) % 500
    cf = train_als(users, items, 300, 500, [str(u) for u in range(300)], factors=16, iterations=30)
    channel = CfChannel(faiss.IndexFlatIP(16), [], cf.user_factors, cf.item_factors, cf.gram,
                        cf.alpha, cf.regularization)
    for user in range(5):
        folded = channel.user_vector("not-trained", np.unique(items[users == user]))
        assert np.corrcoef(folded, cf.user_factors[user])[0, 1] > 0.999



def test_cf_known_user_vector_is_folded_in_from_the_request_history():
    """A known user's CF vector follows the request's recent events, not the stale trained row
    (which stays the answer only when no history item has a factor)."""
    from core.channels import CfChannel
    from core.foldin import fold_in
    rng = np.random.default_rng(0)
    items, factors = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(size=(2, 8)).astype(np.float32)
    gram = items.T @ items
    channel = CfChannel(faiss.IndexFlatIP(8), ["known", "other"], factors, items, gram, 10.0, 0.05)
    recent = np.array([3, 7, 11, 40], np.int64)
    vector = channel.user_vector("known", recent)
    np.testing.assert_allclose(vector, fold_in(items, gram, recent, 10.0, 0.05), rtol=1e-5)
    assert not np.allclose(vector, factors[0])
    assert not np.allclose(channel.user_vector("known", recent[:2]), vector)   # the history matters
    # Only the newest `history` items count.
    long = np.r_[rng.integers(0, 50, 300), recent].astype(np.int64)
    np.testing.assert_allclose(channel.user_vector("known", long),
                               fold_in(items, gram, long[-channel.history:], 10.0, 0.05), rtol=1e-5)
    # No factor in the history (online items only, or none): the trained row; unknown users get nothing.
    np.testing.assert_array_equal(channel.user_vector("known", np.array([50, 51], np.int64)), factors[0])
    np.testing.assert_array_equal(channel.user_vector("known", np.zeros(0, np.int64)), factors[0])
    assert channel.user_vector("nobody", np.zeros(0, np.int64)) is None

def test_hnsw_index_meets_recall_target():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(50, 64)).astype(np.float32)
    vectors = centers[rng.integers(0, 50, 6000)] + 0.3 * rng.normal(size=(6000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = build_index(vectors, exact_below=1000)   # force HNSW
    assert isinstance(faiss.downcast_index(index.index), faiss.IndexHNSWFlat)
    assert recall_at_k(index, vectors, vectors[:100], 100) >= 0.95
    exact = build_index(vectors)
    assert recall_at_k(exact, vectors, vectors[:100], 100) >= 0.99   # float16 rows: near-ties may swap


def test_build_tunes_quotas_on_validation_users_and_retrieval_serves_them(artifacts, retriever):
    """The manifest's quotas are the split with the best validation recall of those searched (the
    coarse grid and the default among them; never worse than the default split), and the retriever
    merges with them when a request names none."""
    from offline.quotas import quota_grid, quota_key
    from core.limits import DEFAULT_QUOTAS
    tuned = artifacts.manifest["retrieval"]
    table = tuned["recall@300_valid"]
    assert set(table) >= {quota_key(q) for q in quota_grid()} | {quota_key(DEFAULT_QUOTAS)}
    lead = tuned["lead"]
    if lead["channel"] is not None:   # the lead channel keeps its head (offline.quotas.LEAD_HEAD)
        assert tuned["quotas"][lead["channel"]] >= lead["head"] > 0
        assert lead["valid_ndcg@10"][lead["channel"]] == max(lead["valid_ndcg@10"].values())
    feasible = [v for k, v in table.items() if lead["channel"] is None
                or int(k.split("/")[list(DEFAULT_QUOTAS).index(lead["channel"])]) >= lead["head"]]
    assert table[quota_key(tuned["quotas"])] == max(feasible)
    assert artifacts.manifest["quality"]["merged_recall@300_valid"] == max(feasible)
    assert retriever.quotas == tuned["quotas"] and sum(retriever.quotas.values()) == 300
    assert set(retriever.quotas) == set(DEFAULT_QUOTAS)


def test_quota_grid_covers_every_channel_without_exploding():
    from core.channel_names import CHANNEL_NAMES
    from offline.quotas import compositions, quota_grid
    assert len(compositions(5, 4)) == 56 and all(sum(c) == 5 for c in compositions(5, 4))
    grid = quota_grid(300)
    assert len(grid) == len(compositions(5, len(CHANNEL_NAMES))) == 126
    assert all(sum(q.values()) == 300 and set(q) == set(CHANNEL_NAMES) for q in grid)
    assert {"bert": 0, "cf": 0, "popular": 0, "item2item": 300, "sequential": 0} in grid


def test_tune_quotas_prefers_the_channel_that_recalls_the_targets(retriever):
    """Targets drawn from the popular list: the tuner must give popular the whole list (the
    other channels propose other items for these one-item histories)."""
    from offline.quotas import tune_quotas
    popular = retriever.popular.retrieve(RetrievalQuery(""), 300).items
    users = [f"u{j}" for j in range(20)]
    targets = {u: popular[10 * j:10 * j + 5] for j, u in enumerate(users)}
    histories = {u: np.array([int(popular[-1 - j])], np.int64) for j, u in enumerate(users)}
    quotas, table, lead = tune_quotas(retriever, histories, targets, users, progress=False)
    assert lead["channel"] == "popular"   # its own top 10 holds the first user's targets
    assert table[quota_key_of(quotas)] == max(table.values()) > min(table.values())
    assert quotas["popular"] >= max(v for c, v in quotas.items() if c != "popular")


def test_the_lead_channel_keeps_its_head_when_recall_prefers_another(retriever):
    """Each user's first target is the popular list's top item (popular leads on nDCG@10), the
    other four come from deep in the BERT channel's list (BERT wins recall@300): the tuner must
    still leave popular its LEAD_HEAD slots."""
    from offline.quotas import LEAD_HEAD, tune_quotas
    from core.types import RetrievalQuery as Query
    popular = retriever.popular.retrieve(Query(""), 300).items
    users = [f"u{j}" for j in range(20)]
    histories = {u: np.array([int(popular[-1 - j])], np.int64) for j, u in enumerate(users)}
    targets = {}
    for u in users:
        bert = retriever.bert.retrieve(Query(u, histories[u]), 300).items
        deep = [int(i) for i in bert[150:] if i not in set(popular[:100].tolist())][:4]
        targets[u] = np.array([int(popular[0]), *deep], np.int64)
    quotas, table, lead = tune_quotas(retriever, histories, targets, users, progress=False)
    assert lead["channel"] == "popular" and quotas["popular"] >= LEAD_HEAD
    unconstrained = max(table.values())
    assert quotas["bert"] > 0 and table[quota_key_of(quotas)] <= unconstrained


def quota_key_of(quotas):
    from offline.quotas import quota_key
    return quota_key(quotas)


def test_bad_quotas_in_a_manifest_are_refused(artifacts, tmp_path):
    import shutil

    from common.artifacts import ArtifactError, open_artifacts, write_manifest
    copy = tmp_path / "set"
    shutil.copytree(artifacts.folder, copy)
    manifest = dict(artifacts.manifest, retrieval={"quotas": {"bert": 100, "sparse": 200}})
    write_manifest(copy, manifest)
    with pytest.raises(ArtifactError, match="retrieval.quotas"):
        load_retriever(open_artifacts(copy))

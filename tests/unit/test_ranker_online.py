"""Ranking sends the fused ranker only the involved online items' rows (ranking.ranker.involved_online),
renumbered per request: the served model's scores are exactly those of the whole online table."""
import numpy as np
import torch

from core.features import RETRIEVAL_FEATURES
from offline.serving.export import load_ranker
from ranking.ranker import involved_online


def test_involved_rows_score_as_the_whole_online_table(built, artifacts):
    model = load_ranker(built[1], artifacts.manifest["version"])
    n = model.n_items   # the exported model keeps [I, 0] of the text table (only its projection)
    rng = np.random.default_rng(0)
    m = 500   # online items known to ranking; a request involves a handful
    vectors = rng.standard_normal((m, model.text_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    categories = rng.integers(0, 5, m).astype(np.int64)
    for _ in range(5):
        history = np.concatenate([rng.choice(n, 8), n + rng.choice(m, 4)]).astype(np.int64)
        items = np.concatenate([rng.choice(n, 50, replace=False), n + rng.choice(m, 6, replace=False)]).astype(np.int64)
        rng.shuffle(items)
        features = rng.random((len(items), len(RETRIEVAL_FEATURES))).astype(np.float32)
        sent = involved_online(history, items, n, vectors, categories)
        assert len(sent[2]) == len(np.unique(np.concatenate([history, items])[np.concatenate([history, items]) >= n]))
        assert sent[0].max() < n + len(sent[2]) and sent[1].max() < n + len(sent[2])
        np.testing.assert_array_equal(sent[1][items < n], items[items < n])   # catalog items keep their index
        with torch.inference_mode():
            whole = model(*(torch.from_numpy(a) for a in (history, items, features, vectors, categories)))
            compact = model(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (sent[0], sent[1], features,
                                                                                    sent[2], sent[3])))
        np.testing.assert_array_equal(whole.numpy(), compact.numpy())


def test_no_online_item_sends_no_rows():
    history, items = np.array([1, 2], np.int64), np.array([3, 4, 5], np.int64)
    sent = involved_online(history, items, 10, np.zeros((4, 8), np.float32), np.zeros(4, np.int64))
    np.testing.assert_array_equal(sent[0], history)
    np.testing.assert_array_equal(sent[1], items)
    assert sent[2].shape == (0, 8) and len(sent[3]) == 0

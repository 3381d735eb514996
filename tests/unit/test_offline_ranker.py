"""Training the fused ranker is reproducible: same seed and data, same weights."""
import numpy as np
import torch

from offline.ranker import MAX_HISTORY, RankingList, train_ranker
from offline.serving.fused_ranker import FusedRanker


def _trained_weights(seed: int) -> torch.Tensor:
    rng = np.random.default_rng(0)
    n_items = 3000   # big enough that CPU kernels split work across threads
    text = rng.normal(size=(n_items, 384)).astype(np.float32)
    cf = rng.normal(size=(n_items, 32)).astype(np.float32)
    torch.manual_seed(seed)
    model = FusedRanker(text, cf, cf.T @ cf, 10.0, 0.05, rng.random(n_items).astype(np.float32),
                        rng.random(n_items).astype(np.float32), rng.integers(0, 8, n_items), 8, 6)
    lists = [RankingList(rng.choice(n_items, 50), rng.choice(n_items, 300, replace=False),
                         rng.random((300, 6), dtype=np.float32), (rng.random(300) < 0.05).astype(np.float32))
             for _ in range(40)]
    train_ranker(model, lists, epochs=2, seed=seed, progress=False)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_training_is_reproducible_with_two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first, again, other_seed = _trained_weights(0), _trained_weights(0), _trained_weights(1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed)
    assert not torch.are_deterministic_algorithms_enabled()   # restored for the caller


def _tiny_model(n_items: int = 200, n_features: int = 4, seed: int = 0) -> FusedRanker:
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(n_items, 16)).astype(np.float32)
    cf = rng.normal(size=(n_items, 8)).astype(np.float32)
    torch.manual_seed(seed)
    return FusedRanker(text, cf, cf.T @ cf, 10.0, 0.05, rng.random(n_items).astype(np.float32),
                       rng.random(n_items).astype(np.float32), rng.integers(0, 4, n_items), 4, n_features,
                       hidden=16)


def test_cut_lists_give_several_lists_per_user_without_targets_in_the_history():
    from offline.ranker import cut_lists, sequence_cuts
    rng = np.random.default_rng(0)
    sequences = {u: rng.permutation(500)[:80].astype(np.int64) for u in ("a", "b", "c")}
    asked = []

    def retrieve(history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        asked.append(history.copy())
        items = np.setdiff1d(np.arange(500), history)[:300]   # like the seen filter: never the history
        return items, np.ones((len(items), 4), np.float32)

    cuts = sequence_cuts(sequences["a"], 4)
    assert len(cuts) == 4
    for k, (history, targets) in enumerate(cuts):
        position = len(history)
        assert np.array_equal(history, sequences["a"][:position])          # strictly the prefix
        assert np.array_equal(targets, sequences["a"][position:position + len(targets)])
        assert not set(targets.tolist()) & set(history.tolist())
        assert len(targets) == 10 and position + len(targets) == 80 - 10 * k   # newest first, no overlap
    lists = cut_lists(retrieve, sequences, ["a", "b", "c", "unknown"], 4, weight=0.5)
    assert len(lists) == 12   # several lists per user (the unknown user has none)
    for lst, history in zip(lists, asked):
        assert np.array_equal(lst.history, history[-MAX_HISTORY:])
        positives = set(lst.candidates[lst.labels > 0].tolist())
        assert positives and not positives & set(history.tolist())
        assert lst.weight == 0.5
    # A sequence too short for a cut yields nothing rather than an empty history.
    assert sequence_cuts(np.arange(4, dtype=np.int64), 4, min_history=5) == []


def test_best_epoch_is_the_earliest_best():
    from offline.ranker import best_epoch
    assert best_epoch([0.1, 0.3, 0.25, 0.3]) == 2
    assert best_epoch([]) == 0


def _planted_lists(rng: np.random.Generator, n_lists: int, flip: bool) -> list[RankingList]:
    """Label = feature above 0.8 (or below 0.2 when flipped; every feature column holds the same
    value): a signal the MLP learns within a few epochs."""
    out = []
    for _ in range(n_lists):
        x = rng.random((60, 1), dtype=np.float32)
        labels = ((x[:, 0] < 0.2) if flip else (x[:, 0] > 0.8)).astype(np.float32)
        out.append(RankingList(rng.choice(200, 10), rng.choice(200, 60, replace=False), np.repeat(x, 4, 1), labels))
    return out


def test_early_stopping_picks_the_best_validation_epoch_on_a_planted_case():
    from offline.ranker import list_ndcg, score_lists
    rng = np.random.default_rng(0)
    train = _planted_lists(rng, 30, flip=False)
    # Validation agrees with training: it improves over the first epochs, and the best epoch is
    # the earliest one at the maximum.
    agree = train_ranker(_tiny_model(), train, epochs=4, valid=_planted_lists(rng, 10, flip=False),
                         patience=4, progress=False, seed=0)
    assert len(agree.valid_ndcg) == 4
    assert agree.best_epoch > 1 and agree.valid_ndcg[agree.best_epoch - 1] == max(agree.valid_ndcg)
    assert max(agree.valid_ndcg[:agree.best_epoch - 1]) < max(agree.valid_ndcg) > agree.valid_ndcg[0] + 0.05
    # Validation is planted against training: the better the fit, the worse validation gets, so the
    # first epoch is best and training stops `patience` epochs later instead of running all 8.
    flipped = _planted_lists(rng, 10, flip=True)
    model = _tiny_model()
    against = train_ranker(model, train, epochs=8, valid=flipped, patience=2, progress=False, seed=0)
    assert against.best_epoch == 1
    assert len(against.valid_ndcg) == len(against.losses) == 3
    assert list_ndcg(score_lists(model, flipped), flipped) == against.valid_ndcg[-1]   # the last epoch's weights


def test_batched_training_is_reproducible():
    rng = np.random.default_rng(1)
    lists = _planted_lists(rng, 12, flip=False)
    weights = []
    for _ in range(2):
        model = _tiny_model()
        train_ranker(model, lists, epochs=2, batch=4, progress=False, seed=3, cold_share=0.3)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])

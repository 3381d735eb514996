"""Training the fused ranker is reproducible: same seed and data, same weights."""
import numpy as np
import torch

from offline.ranker import RankingList, train_ranker
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

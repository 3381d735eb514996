"""The sequential channel (offline/sequential.py, offline/serving/seq_encoder.py,
core.channels.SequentialChannel) on seeded synthetic sequences with a planted order."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.channels import BertChannel, CfChannel, ItemVectors, PopularChannel, SequentialChannel
from core.types import RetrievalQuery
from offline.cf import train_als
from offline.index import build_index
from offline.sequential import SeqConfig, Validation, recall_figures, train_sequential, user_vectors
from offline.serving.seq_encoder import InProcessSeqEncoder, content_vectors, script_encoder

N_ITEMS, TEXT_DIM, USERS, PAIRS = 60, 16, 300, 7


def _successor() -> np.ndarray:
    """A planted order: one cycle through every item, succ[x] is what users pick right after x."""
    order = np.random.default_rng(3).permutation(N_ITEMS)
    succ = np.empty(N_ITEMS, np.int64)
    succ[order] = np.roll(order, -1)
    return succ


def _pairs(succ: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """n random picks a, each followed by succ[a]: unordered, a sits as much with its predecessor
    (the pair (pred a, a)) as with its successor, so only the order says which comes next."""
    a = rng.integers(N_ITEMS, size=n)
    return np.column_stack([a, succ[a]]).ravel().astype(np.int64)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    rng = np.random.default_rng(0)
    succ = _successor()
    sequences = [_pairs(succ, rng, PAIRS) for _ in range(USERS)]
    text = rng.standard_normal((N_ITEMS, TEXT_DIM)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)   # random text: it says nothing about the order
    config = SeqConfig(dim=32, max_history=10, layers=1, epochs=30, max_steps=150, batch=64, dropout=0.1, lr=5e-3,
                       loss_share=1.0, seed=0)
    model = train_sequential(sequences, text, config, progress=False)
    path = tmp_path_factory.mktemp("seq") / "seq_encoder.pt"
    script_encoder(model.encoder, path)
    return succ, sequences, text, model, path


def _recall(channel, queries: list[tuple[np.ndarray, int]], k: int) -> float:
    hits = 0
    for history, target in queries:
        result = channel.retrieve(RetrievalQuery("someone", history), k + len(history))
        unseen = result.items[~np.isin(result.items, history)][:k]
        hits += int(target in unseen)
    return hits / len(queries)


def test_sequential_channel_recovers_the_planted_order_and_beats_unordered_channels(planted):
    succ, sequences, text, model, path = planted
    rng = np.random.default_rng(1)
    queries = []
    while len(queries) < 60:
        last = int(rng.integers(N_ITEMS))   # the history ends on the first item of a pair
        history = np.r_[_pairs(succ, rng, 3), last]
        if succ[last] not in history:       # a seen target is filtered for every channel alike
            queries.append((history, int(succ[last])))
    sequential = SequentialChannel(build_index(model.item_vectors, seed=0), InProcessSeqEncoder(path))
    bert = BertChannel(build_index(text, seed=0), ItemVectors(text))
    users = np.repeat(np.arange(USERS), 2 * PAIRS)
    cf = train_als(users, np.concatenate(sequences), USERS, N_ITEMS, [str(u) for u in range(USERS)],
                   factors=16, seed=0)
    cf_channel = CfChannel(build_index(cf.item_factors, seed=0), [], cf.user_factors[:0], cf.item_factors,
                           cf.gram, cf.alpha, cf.regularization)
    counts = np.bincount(np.concatenate(sequences), minlength=N_ITEMS)
    popular = PopularChannel(np.argsort(-counts, kind="stable"), counts)
    k = 1
    got = _recall(sequential, queries, k)
    others = {c.name: _recall(c, queries, k) for c in (bert, cf_channel, popular)}
    assert got >= 0.8, (got, others)
    assert got > max(others.values()) + 0.3, (got, others)


def test_torchscript_encoder_equals_the_eager_module_and_drops_unknown_indices(planted):
    _, sequences, _, model, path = planted
    scripted = InProcessSeqEncoder(path)
    histories = [sequences[0][:1], sequences[1], np.concatenate([sequences[2], sequences[3]])]   # 1, 15, 30 items
    batched = user_vectors(model.encoder, histories)
    for j, history in enumerate(histories):
        with torch.inference_mode():
            eager = model.encoder(torch.from_numpy(history)).numpy()
        noisy = np.concatenate([[-1, N_ITEMS + 5], history[:1], [N_ITEMS], history[1:]]).astype(np.int64)
        np.testing.assert_allclose(scripted(noisy), eager, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(batched[j], eager, rtol=1e-4, atol=1e-4)
    # Nothing known in the history: no vector (the channel then proposes nothing).
    assert scripted(np.array([N_ITEMS, N_ITEMS + 1], np.int64)) is None
    assert scripted(np.zeros(0, np.int64)) is None


def test_an_encoded_vector_skips_the_encoder(planted):
    _, _, _, model, _ = planted

    def refuse(history):
        raise AssertionError("the encoder must not run when the query brings its vector")

    channel = SequentialChannel(build_index(model.item_vectors, seed=0), refuse)
    vector = model.item_vectors[7] * 3
    result = channel.retrieve(RetrievalQuery("u", np.array([1, 2], np.int64),
                                             encoded={channel.name: vector}), 5)
    expected = np.argsort(-(model.item_vectors @ vector), kind="stable")[:5]
    assert sorted(result.items.tolist()) == sorted(expected.tolist())
    # No vector and no encoder: nothing (what served retrieval does before Triton answers).
    bare = SequentialChannel(build_index(model.item_vectors, seed=0))
    assert len(bare.retrieve(RetrievalQuery("u", np.array([1, 2], np.int64)), 5)) == 0


def test_online_item_vectors_from_the_exported_projection_equal_the_content_path(planted):
    _, _, text, model, _ = planted
    items = torch.arange(N_ITEMS)
    with torch.no_grad():
        content = model.tower(items, torch.zeros(N_ITEMS)).numpy()   # the id part dropped: an online item
    online = content_vectors(text, model.text_proj, model.text_bias)
    np.testing.assert_allclose(online, content, rtol=1e-5, atol=1e-5)
    # The channel's own path gives the same, and an online item added with it is retrievable.
    channel = SequentialChannel(build_index(model.item_vectors, seed=0), text_proj=(model.text_proj, model.text_bias))
    np.testing.assert_allclose(channel.content_vectors(text[:3]), online[:3], rtol=1e-5, atol=1e-6)
    new = np.array([N_ITEMS], np.int64)
    channel.add(new, channel.content_vectors(text[:1]) * 100)   # large: it wins any query it aligns with
    result = channel.retrieve(RetrievalQuery("u", encoded={channel.name: online[0]}), 3)
    assert N_ITEMS in result.items.tolist()


def test_training_is_reproducible(planted):
    succ, sequences, text, model, _ = planted
    config = SeqConfig(dim=32, max_history=10, epochs=1, max_steps=3, batch=64, seed=5)
    a = train_sequential(sequences[:100], text, config, progress=False)
    b = train_sequential(sequences[:100], text, config, progress=False)
    np.testing.assert_array_equal(a.item_vectors, b.item_vectors)
    assert a.losses == b.losses and a.steps == 3


def test_sampled_softmax_trains_on_a_catalog_above_the_full_softmax_limit(planted):
    _, sequences, text, _, _ = planted
    config = SeqConfig(dim=16, max_history=10, epochs=1, max_steps=4, batch=64, full_softmax_up_to=10,
                       negatives=20, seed=0)
    model = train_sequential(sequences[:100], text, config, progress=False)
    assert model.softmax == "sampled" and model.steps == 4 and np.isfinite(model.item_vectors).all()


def _validation(succ: np.ndarray, seed: int, n: int = 60) -> Validation:
    """Held-out users on the planted order: a history of pairs ending on a pair's first item, and its successor."""
    rng = np.random.default_rng(seed)
    histories = [np.r_[_pairs(succ, rng, 3), int(rng.integers(N_ITEMS))] for _ in range(n)]
    return Validation(histories, [np.array([succ[h[-1]]]) for h in histories])


def _served_recall(model, valid: Validation, k: int) -> float:
    queries = user_vectors(model.encoder, valid.histories)
    return recall_figures(model.item_vectors, queries, valid.histories, valid.targets, ks=(k,))[f"recall@{k}"]


def test_early_stopping_keeps_the_best_checkpoint_and_stops_after_patience(planted):
    succ, sequences, text, _, _ = planted
    valid = _validation(succ, seed=7)
    config = SeqConfig(dim=32, max_history=10, layers=1, epochs=100, max_steps=400, batch=64, dropout=0.1,
                       lr=2e-2, loss_share=1.0, eval_every=5, patience=2, eval_k=1, seed=0)
    model = train_sequential(sequences, text, config, progress=False, valid=valid)
    steps, recalls = zip(*model.checks)
    best = int(np.argmax(recalls))          # the first best: a later tie is not "better"
    assert model.best_step == steps[best]
    # Stopped at the patience-th check without a new best, or at the budget.
    assert len(steps) - 1 - best == config.patience or model.steps == config.max_steps
    assert model.steps == steps[-1] and model.steps < config.max_steps   # it did stop early here
    # What is returned is that checkpoint, as served: its recall is the best check's.
    assert _served_recall(model, valid, 1) == pytest.approx(recalls[best], abs=1e-5)


def test_early_stopping_is_reproducible_and_without_validation_trains_the_whole_budget(planted):
    succ, sequences, text, _, _ = planted
    valid = _validation(succ, seed=8, n=20)
    config = SeqConfig(dim=16, max_history=10, layers=1, epochs=100, max_steps=30, batch=64, eval_every=10,
                       patience=1, eval_k=5, seed=3)
    a = train_sequential(sequences[:100], text, config, progress=False, valid=valid)
    b = train_sequential(sequences[:100], text, config, progress=False, valid=valid)
    np.testing.assert_array_equal(a.item_vectors, b.item_vectors)
    assert a.checks == b.checks and a.best_step == b.best_step
    whole = train_sequential(sequences[:100], text, config, progress=False)
    assert whole.steps == config.max_steps and whole.checks == [] and whole.best_step == config.max_steps

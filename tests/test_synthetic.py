"""The synthetic generator: determinism, validity, heavy tail, learnable signal."""

import time

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from fedrec.data.synthetic import generate_synthetic


def test_deterministic_by_seed():
    a, b = generate_synthetic(seed=3), generate_synthetic(seed=3)
    for x, y in ((a.users, b.users), (a.items, b.items), (a.order, b.order)):
        np.testing.assert_array_equal(x, y)
    c = generate_synthetic(seed=4)
    assert len(a) != len(c) or not np.array_equal(a.items, c.items)


def test_shape_and_validity():
    d = generate_synthetic()
    assert d.name == "synthetic" and d.order_kind == "sequence" and d.fixed_split is None
    assert d.users.min() >= 0 and d.users.max() == 299 and d.n_users == 300
    assert d.items.min() >= 0 and d.items.max() < 400
    pairs = d.users * 400 + d.items
    assert len(np.unique(pairs)) == len(d)  # no duplicate (user, item)
    lengths = np.bincount(d.users)
    assert lengths.min() >= 5 and lengths.max() <= 200
    assert 20 < lengths.mean() < 40 and lengths.max() > 3 * np.median(lengths)  # long tail
    # rows grouped by user, order = 0..len-1 inside each history
    assert np.all(np.diff(d.users) >= 0)
    starts = np.cumsum(lengths) - lengths
    np.testing.assert_array_equal(d.order, np.arange(len(d)) - np.repeat(starts, lengths))


def test_min_history_and_parameters():
    d = generate_synthetic(n_users=50, n_items=60, mean_history=4, min_history=10, seed=1)
    lengths = np.bincount(d.users)
    assert lengths.min() >= 10 and lengths.max() <= 30
    with pytest.raises(ValueError):
        generate_synthetic(n_items=10, min_history=11)


def test_popularity_heavy_tailed():
    d = generate_synthetic()
    counts = np.sort(np.bincount(d.items, minlength=400))[::-1]
    assert counts[:40].sum() / len(d) > 0.30
    flat = generate_synthetic(popularity_exponent=0.0, mainstream=0.0)
    flat_counts = np.sort(np.bincount(flat.items, minlength=400))[::-1]
    assert counts[:40].sum() > 1.3 * flat_counts[:40].sum()


def test_fast():
    t = time.perf_counter()
    generate_synthetic(seed=123)
    assert time.perf_counter() - t < 0.5


def _hit_rates(d, n_items=400, rank=8, k=10):
    """Leave the last item of each sequence out; HR@k of popularity and of a rank-8 truncated SVD."""
    last = np.r_[d.users[1:] != d.users[:-1], True]
    train = np.zeros((d.users.max() + 1, n_items))
    train[d.users[~last], d.items[~last]] = 1
    test = d.items[last]

    def hr(scores):
        scores = np.where(train > 0, -np.inf, scores)
        top = np.argsort(-scores, axis=1)[:, :k]
        return (top == test[:, None]).any(axis=1).mean()

    with threadpool_limits(1):  # tiny SVD: BLAS threads only add contention on busy machines
        _, _, vt = np.linalg.svd(train, full_matrices=False)
    return hr(np.tile(train.sum(0), (len(train), 1))), hr(train @ vt[:rank].T @ vt[:rank])


def test_learnable_signal():
    pop, mf = _hit_rates(generate_synthetic())
    assert mf > 1.4 * pop and mf > 0.3
    pop0, mf0 = _hit_rates(generate_synthetic(taste_weight=0.0))
    assert mf0 < pop0 + 0.02  # without tastes there is nothing beyond popularity to learn

"""UNION's client side: the contrastive term in benign uploads."""

import numpy as np

from conftest import tiny_cfg


def _fit(cfg, users, cohort):
    from clients.cohort import fit_cohort
    from clients.state import DictStore
    from fedrec.build import build_client, build_env, initial_arrays

    env = build_env(cfg)
    arrays = initial_arrays(cfg, env.model)
    clients = [build_client(env, u, DictStore()) for u in users]
    if cohort:
        return fit_cohort(clients, arrays, {"round": 3}), env, arrays
    return [c.fit(arrays, {"round": 3}) for c in clients], env, arrays


def test_contrastive_term_adds_exactly_alpha_times_its_gradient(tmp_path):
    from clients.streams import CONTRASTIVE as _CONTRASTIVE
    from fedrec.models.losses import contrastive_grad, contrastive_samples

    base, env, arrays = _fit(tiny_cfg(tmp_path), [4], cohort=False)
    cl, _, _ = _fit(tiny_cfg(tmp_path, train__contrastive_alpha=0.5), [4], cohort=False)
    (b_up, bn, bm), (c_up, cn, cm) = base[0], cl[0]
    assert bn == cn and cm["loss"] > bm["loss"]
    # rebuild the expected rows: BPR rows + 0.5 * contrastive rows on the union of ids
    from clients.state import DictStore
    from fedrec.build import build_client

    c = build_client(env, 4, DictStore())
    s = contrastive_samples(c.train_items, env.model.n_items, c.exclusion_mask(), 15,
                            c.stream(_CONTRASTIVE, 3))
    ids, rows, _ = contrastive_grad(arrays[0], *s)
    want = {int(i): r.copy() for i, r in zip(b_up[0], b_up[1])}
    for i, r in zip(ids, rows):
        want[int(i)] = want.get(int(i), np.zeros_like(r)) + np.float32(0.5) * r
    assert np.array_equal(c_up[0], np.array(sorted(want)))
    np.testing.assert_allclose(c_up[1], np.stack([want[i] for i in sorted(want)]), rtol=1e-6, atol=1e-8)
    assert len(c_up[0]) > len(b_up[0])  # the negatives' rows are uploaded too


def test_contrastive_uploads_do_not_depend_on_the_cohort(tmp_path):
    cfg = tiny_cfg(tmp_path, train__contrastive_alpha=1.0)
    one, _, _ = _fit(cfg, [1, 2, 3, 5], cohort=False)
    many, _, _ = _fit(cfg, [1, 2, 3, 5], cohort=True)
    for (a, _, _), (b, _, _) in zip(one, many):
        for x, y in zip(a, b):
            assert np.array_equal(x, y)

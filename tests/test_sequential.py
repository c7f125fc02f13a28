"""SASRec and BERT4Rec: causality, cloze masking, sparse uploads, a private representation,
gradients against an independent reference, cohort = single fit, the runners."""

import numpy as np
import pytest
import torch

from clients.benign import BenignClient
from clients.cohort import fit_cohort, user_vectors
from clients.state import DictStore
from fedrec.build import build_env, initial_arrays
from fedrec.config import from_dict
from fedrec.errors import ConfigError
from fedrec.models.bert4rec import BERT4Rec
from fedrec.models.sasrec import SASRec

N_ITEMS, DIM, MAX_LEN = 50, 8, 20


@pytest.fixture(autouse=True)
def one_torch_thread():
    """As the runners do (fedrec/runtime.py): tiny ops crawl when two threads contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed):
    return np.random.Generator(np.random.PCG64(seed))


def _model(cls, **kw):
    kw = {"dropout": 0.0, "max_len": MAX_LEN, "heads": 2, "device": "cpu", **kw}
    m = cls(N_ITEMS, DIM, **kw)
    table, pred = m.init_global(np.random.default_rng(0))
    return m, table, pred


def _hidden(model, table, pred, ids, replace=None):
    """Encoder output (L, d) of one sequence, no dropout."""
    from fedrec.models.sequential import Example

    ex = Example(ids=np.asarray(ids), replace=replace, tpos=np.zeros(0, np.int64),
                 titems=np.zeros(0, np.int64), neg=None, length=model.padded_length(len(ids)))
    with torch.no_grad():
        P = model._params(pred, 1, grad=False)
        h, *_ = model._forward(table, P, [ex], E_leaf=False)
    return h[0, -len(ids):].numpy()


def test_sasrec_is_causal_and_bert4rec_is_not():
    ids = np.arange(1, 13)
    later = ids.copy()
    later[8:] = [40, 41, 42, 43]  # change every item after position t = 7
    m, table, pred = _model(SASRec)
    h1, h2 = _hidden(m, table, pred, ids), _hidden(m, table, pred, later)
    assert np.array_equal(h1[:8], h2[:8])  # positions <= t never see what comes after
    assert not np.allclose(h1[8:], h2[8:])
    b, table, pred = _model(BERT4Rec)
    g1, g2 = _hidden(b, table, pred, ids), _hidden(b, table, pred, later)
    assert not np.allclose(g1[:8], g2[:8], atol=1e-5)  # bidirectional: the control


def test_bert4rec_cloze_masking():
    m, table, pred = _model(BERT4Rec, mask_prob=0.3)
    hist = np.arange(1, 41)  # longer than max_len: the last 20 items are used
    ex = m.train_example(hist, np.arange(5), _gen(1), train=True)
    assert np.array_equal(ex.ids, hist[-MAX_LEN:])
    assert ex.replace.any() and np.array_equal(np.flatnonzero(ex.replace), ex.tpos)
    assert np.array_equal(ex.titems, ex.ids[ex.tpos])  # targets are the hidden originals
    rates = [m.cloze_mask(400, _gen(s)).mean() for s in range(5)]  # mask_last_prob 0 here
    assert abs(np.mean(rates) - 0.3) < 0.03
    never = BERT4Rec(N_ITEMS, DIM, mask_prob=0.0, max_len=MAX_LEN, device="cpu")
    assert list(never.cloze_mask(6, _gen(0))) == [False] * 5 + [True]  # at least one: the last
    last = BERT4Rec(N_ITEMS, DIM, mask_prob=0.5, mask_last_prob=0.25, max_len=MAX_LEN, device="cpu")
    only_last = [list(last.cloze_mask(60, _gen(s))) == [False] * 59 + [True] for s in range(400)]
    assert 0.19 < np.mean(only_last) < 0.31  # the evaluation task, in a share of the rounds
    # a masked input position carries no information about its item
    replace = np.zeros(12, bool)
    replace[4] = True
    ids2 = np.arange(1, 13)
    ids2[4] = 33
    assert np.array_equal(_hidden(m, table, pred, np.arange(1, 13), replace),
                          _hidden(m, table, pred, ids2, replace))
    # training uploads: n_samples = masked positions; evaluation reads an appended [MASK]
    g = m.gradients(table, pred, None, hist, np.arange(30, 40), _gen(1))
    assert g.n_samples == len(ex.tpos)
    ev = m.eval_example(hist)
    assert len(ev.ids) == MAX_LEN and ev.replace[-1] and ev.replace.sum() == 1
    assert np.array_equal(ev.ids[:-1], hist[-(MAX_LEN - 1):])


@pytest.mark.parametrize("cls,loss", [(SASRec, "bce"), (SASRec, "sampled_softmax"),
                                      (BERT4Rec, "sampled_softmax")])
def test_uploads_hold_only_touched_rows(cls, loss):
    m, table, pred = _model(cls, loss=loss, softmax_samples=7, dropout=0.2)
    hist = np.array([3, 9, 4, 17, 25, 8, 11, 30, 2, 6], np.int64)
    neg = np.array([40, 41, 42, 43, 44, 45, 46, 47, 48])[: m.negatives_needed(len(hist), 1)]
    g = m.gradients(table, pred, None, hist, neg, _gen(2), weight_decay=1e-3)
    touched = np.unique(np.concatenate([hist, neg]))
    if cls is BERT4Rec:  # only masked items are targets, but every input row gets a gradient
        assert set(g.item_ids) <= set(touched) and set(neg) <= set(g.item_ids)
    else:
        np.testing.assert_array_equal(g.item_ids, touched)
    assert g.item_rows.shape == (len(g.item_ids), DIM) and np.abs(g.item_rows).sum(1).min() > 0
    assert [a.shape for a in g.predictor] == [tuple(s) for s in m.predictor_shapes]
    assert g.user_grad.size == 0
    # the dense variant is labelled: every item, every time
    d, table, pred = _model(cls, loss="full_softmax_dense")
    assert d.dense_upload and d.negatives_needed(len(hist), 1) == 0
    gd = d.gradients(table, pred, None, hist, np.zeros(0, np.int64), _gen(2))
    np.testing.assert_array_equal(gd.item_ids, np.arange(N_ITEMS))


def _reference_sasrec_grads(m, table, pred, hist, neg):
    """Plain single-sequence SASRec in float64 autograd, written independently: no padding,
    no client axis, the whole item table as one leaf."""
    d, n = m.dim, len(hist) - 1
    P = {k: torch.tensor(a, dtype=torch.float64, requires_grad=True)
         for k, a in zip(m.param_names, pred)}
    V = torch.tensor(table, dtype=torch.float64, requires_grad=True)
    inp, tgt = torch.from_numpy(hist[:-1]), torch.from_numpy(hist[1:])
    x = V[inp] * d ** 0.5 + P["pos_emb"][m.max_len - n:]
    causal = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
    ln = torch.nn.functional.layer_norm
    for b in range(m.blocks):
        p = {k[len(f"b{b}."):]: v for k, v in P.items() if k.startswith(f"b{b}.")}
        h = ln(x, (d,), p["ln1_w"], p["ln1_b"], eps=1e-8)
        q, k, v = (h @ p["attn_in_w"].T + p["attn_in_b"]).split(d, dim=-1)
        heads, dh = m.heads, d // m.heads
        q, k, v = (t.view(n, heads, dh).transpose(0, 1) for t in (q, k, v))
        att = (q @ k.transpose(1, 2) / dh ** 0.5).masked_fill(causal, float("-inf"))
        o = (torch.softmax(att, -1) @ v).transpose(0, 1).reshape(n, d)
        x = x + o @ p["attn_out_w"].T + p["attn_out_b"]
        h = ln(x, (d,), p["ln2_w"], p["ln2_b"], eps=1e-8)
        x = x + torch.relu(h @ p["ffn1_w"].T + p["ffn1_b"]) @ p["ffn2_w"].T + p["ffn2_b"]
    x = ln(x, (d,), P["ln_f_w"], P["ln_f_b"], eps=1e-8)
    pos_s = (x * V[tgt]).sum(-1)
    neg_s = (x * V[torch.from_numpy(neg)]).sum(-1)
    loss = (torch.nn.functional.softplus(-pos_s) + torch.nn.functional.softplus(neg_s)).mean()
    loss.backward()
    return V.grad.numpy(), [P[k].grad.numpy() for k in m.param_names], float(loss)


def test_sasrec_gradient_matches_an_independent_reference():
    m, table, pred = _model(SASRec)
    pred = [a + np.random.default_rng(5).normal(0, 0.1, a.shape).astype(np.float32) for a in pred]
    hist = np.array([3, 9, 4, 17, 25, 8, 11, 30, 2, 6, 12, 13], np.int64)
    neg = np.array([40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 40])
    g = m.gradients(table, pred, None, hist, neg, _gen(0))
    Vg, Pg, loss = _reference_sasrec_grads(m, table, pred, hist, neg)
    assert g.loss == pytest.approx(loss, rel=1e-5) and g.n_samples == 11
    np.testing.assert_array_equal(g.item_ids, np.flatnonzero(np.abs(Vg).sum(1)))
    np.testing.assert_allclose(g.item_rows, Vg[g.item_ids], rtol=1e-4, atol=1e-6)
    for name, a, b in zip(m.param_names, g.predictor, Pg):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)


def _env(tmp_path, model="sasrec", **over):
    raw = {"data": {"synthetic": {"n_users": 40, "n_items": 60, "mean_history": 14},
                    "cache_dir": str(tmp_path / "cache"), "negatives": "fresh"},
           "model": {"name": model, "dim": 8, "heads": 2, "max_len": 16, "device": "cpu",
                     "softmax_samples": 9},
           "train": {"weight_decay": 1e-3}}
    for k, v in over.items():
        section, key = k.split("__")
        raw.setdefault(section, {})[key] = v
    cfg = from_dict(raw)
    env = build_env(cfg)
    return env, initial_arrays(cfg, env.model)


@pytest.mark.parametrize("model", ["sasrec", "bert4rec"])
def test_representation_never_leaves_the_client(tmp_path, model):
    env, arrays = _env(tmp_path, model, data__negatives="static")
    user = next(u for u in range(env.data.n_users) if len(env.data.train_of(u)) >= 20
                and not env.data.pool_mask[u])
    store = DictStore()
    c = BenignClient(user, env, store)
    up, n, metrics = c.fit(arrays, {"round": 1})
    # no user row: the device keeps its clock and negatives, nothing else
    assert set(store.state) == {"clock", "negatives"}
    assert len(up) == 2 + len(env.model.predictor_shapes) and c.get_parameters({}) == []
    ids, neg = up[0], store.state["negatives"]
    window = env.data.train_of(user)[-17:]  # max_len inputs + 1 target (SASRec)
    if model == "sasrec":
        np.testing.assert_array_equal(ids, np.unique(np.concatenate([window, neg])))
    else:
        assert set(neg) <= set(ids) <= set(window[1:]) | set(neg)
    for a, shape in zip(up[2:], env.model.predictor_shapes):
        assert a.shape == tuple(shape) and a.dtype == np.float32
    # the representation the device computes is not among the uploaded numbers
    for split in ("val", "test"):
        u = c.user_vector(1, split, arrays)
        assert u.shape == (8,) and np.abs(u).sum() > 0
        for a in up:
            assert not np.isin(a.ravel(), u[u != 0]).any()
    _, n_eval, m_eval = c.evaluate(arrays, {"round": 1})
    assert n_eval == 1 and set(m_eval) >= {"val_hr@5", "test_ndcg@10"}


@pytest.mark.parametrize("model,negatives", [("sasrec", "fresh"), ("bert4rec", "static")])
def test_cohort_fit_equals_single_fit_bit_for_bit(tmp_path, model, negatives):
    env, arrays = _env(tmp_path, model, data__negatives=negatives, model__dropout=0.3)
    users = list(range(14))
    single = [BenignClient(u, env, DictStore()).fit(arrays, {"round": 3}) for u in users]
    cohort = fit_cohort([BenignClient(u, env, DictStore()) for u in users],
                                     arrays, {"round": 3})
    for (up1, n1, m1), (up2, n2, m2) in zip(single, cohort):
        assert n1 == n2 and m1 == m2
        assert all(np.array_equal(x, y) for x, y in zip(up1, up2))
    # ... and evaluation vectors: one by one equals batched
    cl = [BenignClient(u, env, DictStore()) for u in users]
    batch = user_vectors(cl, 3, "test", arrays)
    for c, v in zip(cl, batch):
        assert np.array_equal(c.user_vector(3, "test", arrays), v)


def test_config_rejects_what_a_model_cannot_do(tmp_path):
    with pytest.raises(ConfigError, match="model.loss"):
        _env(tmp_path, "bert4rec", model__loss="bce")
    with pytest.raises(ConfigError, match="multiple of model.heads"):
        _env(tmp_path, "sasrec", model__heads=3)
    with pytest.raises(ConfigError, match="model.device"):
        _env(tmp_path, "sasrec", model__device="tpu")


@pytest.mark.parametrize("model", ["sasrec", "bert4rec"])
def test_engine_runs_and_workers_are_bit_identical(tmp_path, model):
    import multiprocessing as mp

    from conftest import tiny_cfg
    from fedrec.engine import Engine
    from fedrec.parallel import fork_available

    cfg = tiny_cfg(tmp_path, model__name=model, model__heads=2, model__max_len=16,
                   model__device="cpu", model__softmax_samples=9, data__negatives="fresh",
                   train__rounds=4, train__clients_per_round=12)
    runs = []
    for workers in ((1, 2) if fork_available() else (1,)):
        eng = Engine(cfg, progress=False, workers=workers)
        out = eng.run()
        runs.append((out["final"], [a.copy() for a in eng.strategy.global_arrays()]))
        assert not mp.active_children()
    final, arrays = runs[0]
    assert final["test_users"] > 0 and 0 < final["test_hr@20"] <= 1
    assert len(arrays) == 1 + len(Engine(cfg, progress=False).env.model.predictor_shapes)
    for other_final, other_arrays in runs[1:]:
        assert other_final == final
        assert all(np.array_equal(a, b) for a, b in zip(arrays, other_arrays))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("cls", [SASRec, BERT4Rec])
def test_cuda_gradients_and_vectors_match_the_cpu(cls):
    cpu, table, pred = _model(cls, dropout=0.2)
    gpu = cls(N_ITEMS, DIM, dropout=0.2, max_len=MAX_LEN, heads=2, device="cuda")
    hists = [np.arange(1, 12), np.arange(20, 45), np.array([3, 4])]
    negs = [np.arange(30, 30 + cpu.negatives_needed(len(h), 1)) % N_ITEMS for h in hists]
    a = cpu.gradients_cohort(table, pred, [None] * 3, hists, negs, [_gen(i) for i in range(3)])
    b = gpu.gradients_cohort(table, pred, [None] * 3, hists, negs, [_gen(i) for i in range(3)])
    for x, y in zip(a, b):  # the same dropout masks (drawn on the CPU), other kernels
        np.testing.assert_array_equal(x.item_ids, y.item_ids)
        np.testing.assert_allclose(x.item_rows, y.item_rows, rtol=1e-3, atol=1e-5)
        for p, q in zip(x.predictor, y.predictor):
            np.testing.assert_allclose(p, q, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(cpu.user_vectors_from_history(table, pred, hists),
                               gpu.user_vectors_from_history(table, pred, hists), rtol=1e-4, atol=1e-5)
    u = np.ones((2, DIM), np.float32)
    np.testing.assert_allclose(cpu.score(u, table, pred), gpu.score(u, table, pred), rtol=1e-9)


def test_local_epochs_upload_a_pseudo_gradient(tmp_path):
    env, arrays = _env(tmp_path, "sasrec", train__local_epochs=2, train__local_lr=0.05,
                       data__negatives="static")
    user = next(u for u in range(env.data.n_users) if len(env.data.train_of(u)) >= 6)
    store = DictStore()
    up, n, metrics = BenignClient(user, env, store).fit(arrays, {"round": 2})
    window = env.data.train_of(user)[-17:]
    np.testing.assert_array_equal(up[0], np.unique(np.concatenate([window, store.state["negatives"]])))
    assert n == len(window) - 1 and list(store.state["clock"]) == [2, 1]
    # two SGD steps on the device: the upload is (global - local) / local_lr, not one gradient
    g = env.model.gradients(arrays[0], arrays[1:], None, env.data.train_of(user),
                            store.state["negatives"], np.random.default_rng(0), weight_decay=1e-3)
    assert np.isfinite(up[1]).all() and not np.allclose(up[1], g.item_rows, atol=1e-4)

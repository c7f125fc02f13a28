"""PipAttack (Zhang et al., WSDM 2022) and the model-poisoning baselines that share its code:
explicit boosting and a boosted model-replacement attack (Bhagoji et al., 2019).

Threat model (PipAttack's): compromised real users. A malicious client knows its own data,
its private user embedding, the global model it receives each round it is sampled, the item
set and the public interaction counts of every item (popularity side information,
`fedrec.targets.item_counts`). It never sees benign users' data, embeddings or uploads.
Knowledge: local (runs in a deployment). It trains honestly before `attack.start_round`.

From then on, when sampled, it computes its honest gradient g (its own item rows and the
predictor) and learns a deceptive gradient g~ (rows of its own items plus the targets,
`attack.target`, and the predictor), starting from g with zero rows for the targets, by
`params.steps` steps of `params.optimizer` (Adam by default; lr `params.lr`) on

    L(g~) = L_exp + alpha * L_pop + gamma * L_dis, at the lookahead model  Theta - eta * g~

- L_exp = -sum_t log sigmoid(score(u, v_t)): the target promoted for the client's own u;
- L_pop = -sum_t log f(v_t)[top class]: f = the popularity estimator (clients/malicious/
  popularity.py), trained on the item table of the client's first attacking round with the
  public counts (the targets excluded), then frozen (kept in the device's private state);
- L_dis = ||g~ - g||_2: the distance to the client's own honest gradient;
eta = params.lookahead_lr (< 0: server.lr). Each term is switchable (params.exp, pop, dis).
The upload carries exactly the client's own item ids plus the targets. alpha < 0 takes the
paper's value: 60 at attacker shares <= 10% and 20 above on ML-1M, 10 on Amazon sets.
params.alpha_scale "joint" divides it by |U_mal|, the number of malicious users: the paper's
L_exp and L_dis sum over all of them and L_pop is a single term, so that is each client's
share of the joint objective; "client" (the default) weighs alpha L_pop against the client's
own L_exp term alone, |U_mal| times more L_pop than the paper's joint objective.

Colluding (`attack.knowledge: colluding`; simulation only, the in-process runner): the paper's
"distance to all malicious users' original local gradients". The clients upload their honest
gradients and the adversary hook crafts every malicious upload of the round at once: L_dis =
||g~_i - g_bar|| with g_bar the mean of the colluding set's honest updates (the round's own,
or the pool's with attack.pool_sample > 0), dense over the rows any of them sent (absent rows
0), on client i's uploaded rows (its own ids plus the targets) and the predictor. Every
uploaded row is then optimised (not only the targets'), from the client's honest gradient;
L_exp uses each client's private user row (HonestUpdate.user_row, read by the hook). One
estimator for the adversary, trained on the table of its first attacking round, then frozen.

explicit_boost: PipAttack with L_exp alone (alpha = gamma = 0; the paper's EB baseline).
boosted: honest gradient plus `params.boost` times the gradient of L_exp at the current model
(one step, no lookahead; boost < 0: 1 / attack.malicious_fraction, the inverse share of the
round the attackers hold, as Bhagoji et al. scale their update).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clients.malicious.base import MaliciousClient, colluding_set, dense_stats
from fedrec.errors import ConfigError

_ESTIMATOR = 24  # the client's stream tag for its estimator's split and initialisation
_EST_KEY = "pop_est_"  # private-state keys of the frozen estimator's arrays
_CACHE: dict = {}  # (config digest, round) -> estimator weights: one training per round and process
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}  # attack.params.optimizer


@dataclass
class PipAttackParams:
    alpha: float = -1.0  # weight of L_pop (< 0: the paper's value for the data and share)
    gamma: float = 5e-4  # weight of L_dis
    steps: int = 30  # optimisation steps per round
    lr: float = 0.01  # their learning rate
    # their optimiser: the paper gives 30 epochs at lr 0.01, not the optimiser. "adam" moves
    # every coordinate by up to lr a step whatever its gradient's size (a scale-free step);
    # "sgd" (plain gradient descent, as the paper's FedRec trains) moves it by lr * gradient
    optimizer: str = "adam"
    # alpha against what: "client" (alpha L_pop against this client's own L_exp term) or
    # "joint" (the paper's objective, whose L_exp and L_dis sum over all |U_mal| malicious
    # users while L_pop is one term: each client's share of alpha L_pop is alpha / |U_mal|)
    alpha_scale: str = "client"
    lookahead_lr: float = -1.0  # eta of the lookahead model (< 0: server.lr)
    exp: bool = True  # L_exp on
    pop: bool = True  # L_pop on
    dis: bool = True  # L_dis on
    # craft the predictor too (the paper's g~: own rows + predictor), or upload the honest
    # predictor gradient and craft the target rows alone, against the lookahead of that honest
    # step: a defense-aware form (a Krum-type selection over predictors drops crafted ones)
    predictor: bool = True

    def validate(self):
        if not (self.alpha < 0 or self.alpha >= 0):
            raise ConfigError(f"attack.params.alpha: {self.alpha!r} is not a number")
        if self.gamma < 0:
            raise ConfigError(f"attack.params.gamma: {self.gamma!r} is negative")
        if not 0 <= self.steps <= 10_000:
            raise ConfigError(f"attack.params.steps: {self.steps!r} is outside [0, 10000]")
        if not self.lr > 0:
            raise ConfigError(f"attack.params.lr: expected a number > 0, got {self.lr!r}")
        if self.alpha_scale not in ("client", "joint"):
            raise ConfigError(f"attack.params.alpha_scale: {self.alpha_scale!r} is not one of "
                              "client, joint")
        if not isinstance(self.predictor, bool):
            raise ConfigError(f"attack.params.predictor: expected true or false, got "
                              f"{self.predictor!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"attack.params.optimizer: {self.optimizer!r} is not one of "
                              f"{', '.join(OPTIMIZERS)}")


def paper_alpha(cfg) -> float:
    """PipAttack's alpha: 10 on the Amazon sets; 60 at attacker shares <= 10%, else 20."""
    name = str(cfg.data.dataset).lower()
    if any(k in name for k in ("cellphone", "amazon", "beauty")):
        return 10.0
    return 60.0 if cfg.attack.malicious_fraction <= 0.1 + 1e-9 else 20.0


def effective_weights(params, cfg, n_users: int) -> tuple:
    """(alpha, gamma, exp, pop, dis) in effect: alpha < 0 is the paper's value, divided by the
    number of malicious users with alpha_scale "joint"; a term at weight 0 is off."""
    from fedrec.roles import n_malicious

    alpha = paper_alpha(cfg) if params.alpha < 0 else params.alpha
    if params.alpha_scale == "joint":
        alpha /= max(n_malicious(cfg, n_users), 1)
    return alpha, params.gamma, params.exp, params.pop and alpha > 0, params.dis and params.gamma > 0


def lookahead_eta(params, cfg) -> float:
    return params.lookahead_lr if params.lookahead_lr >= 0 else cfg.server.lr


def torch_scores(model, u: torch.Tensor, V: torch.Tensor, P: list) -> torch.Tensor:
    """score(u, v) for the rows of V (differentiable in V and P): MF and NCF (both forms)."""
    if model.name == "mf":
        return V @ u
    d = V.shape[1]
    neumf = model.form == "neumf"
    h, (w1, b1, w2, b2, wo, bo) = (P[0] if neumf else None), P[-6:]
    x = torch.cat([u.expand(V.shape[0], d), V], dim=1)
    s = torch.tanh(torch.tanh(x @ w1.T + b1) @ w2.T + b2) @ wo + bo
    if neumf:
        s = s + (V * u) @ h
    return s


class PipAttackClient(MaliciousClient):
    name = "pipattack"
    knowledge_levels = ("local", "colluding")
    Params = PipAttackParams
    terms = None  # subclasses fix the terms (explicit_boost)
    needs_user_rows = True  # colluding: the hook crafts with each client's private row

    def __init__(self, user, env, store):
        super().__init__(user, env, store)
        if not self.model.has_user_row:
            raise ConfigError(f"attack.name: {self.name} needs a model with a user row (mf, ncf)")

    # --- public side information ------------------------------------------------------------
    def targets(self) -> np.ndarray:
        t = getattr(self.env, "_targets", None)
        if t is None:
            from fedrec.targets import resolve_targets

            t = resolve_targets(self.cfg, self.data)
            object.__setattr__(self.env, "_targets", t)
        if not len(t):
            raise ConfigError(f"attack.target: {self.name} needs a target item, not none")
        return t

    def weights(self):
        """(alpha, gamma, exp, pop, dis) in effect."""
        if self.terms is not None:
            return self.terms
        return effective_weights(self.params, self.cfg, self.data.n_users)

    def estimator(self, state, table, rnd) -> list:
        """The frozen popularity estimator: the one in the private state, else trained now."""
        keys = sorted(k for k in state if k.startswith(_EST_KEY))
        if keys:
            return [state[k] for k in sorted(keys, key=lambda k: int(k[len(_EST_KEY):]))]
        w = train_for_round(self.cfg, self.data, table, self.targets(), rnd)
        for i, a in enumerate(w):
            state[f"{_EST_KEY}{i}"] = a
        return w

    # --- the crafted upload ---------------------------------------------------------------------
    def poison_upload(self, ids, rows, predictor, state, rnd):
        table, P = self._global[0], list(self._global[1:])
        targets = self.targets()
        alpha, gamma, exp, pop, dis = self.weights()
        est = self.estimator(state, table, rnd) if pop else None
        out_ids = np.union1d(ids, targets).astype(np.int64)
        g0 = np.zeros((len(out_ids), table.shape[1]), np.float32)
        g0[np.searchsorted(out_ids, ids)] = rows
        rows_new, pred_new = craft(self.model, state["user"], table[out_ids], P, g0,
                                   [np.asarray(p, np.float32) for p in predictor],
                                   np.searchsorted(out_ids, targets), est, alpha, gamma, exp, pop,
                                   dis, lookahead_eta(self.params, self.cfg), self.params.steps,
                                   self.params.lr, optimizer=self.params.optimizer,
                                   craft_predictor=self.params.predictor)
        return out_ids, rows_new, pred_new

    # --- colluding: the whole round's uploads in the adversary hook -------------------------
    @classmethod
    def adversary_context(cls, cfg, env):
        from fedrec.targets import resolve_targets

        return {"cfg": cfg, "data": env.data, "model": env.model,
                "targets": resolve_targets(cfg, env.data)}

    @classmethod
    def craft_round(cls, view, params, memory, rng):
        ctx = view.context
        cfg, model, targets = ctx["cfg"], ctx["model"], ctx["targets"]
        alpha, gamma, exp, pop, dis = effective_weights(params, cfg, ctx["data"].n_users)
        table, P = view.item_table, list(view.predictor)
        est = None
        if pop:
            if "estimator" not in memory:  # trained at the attack's first round, then frozen
                memory["estimator"] = train_for_round(cfg, ctx["data"], table, targets, view.round)
            est = memory["estimator"]
        known = [u for u in colluding_set(view) if len(u.item_ids)]
        ref_ids, ref_mean, _, ref_pred = dense_stats(known) if known else (None, None, None, None)
        out = []
        for u in view.own:
            if not len(u.item_ids):  # nothing trained: nothing to attack with
                out.append((u.item_ids, u.item_rows, u.predictor))
                continue
            out_ids = np.union1d(u.item_ids, targets).astype(np.int64)
            g0 = np.zeros((len(out_ids), table.shape[1]), np.float32)
            g0[np.searchsorted(out_ids, u.item_ids)] = u.item_rows
            p0 = [np.asarray(p, np.float32) for p in u.predictor]
            ref = (reference_rows(out_ids, ref_ids, ref_mean),
                   [m.astype(np.float32) for m, _ in ref_pred]) if known else None
            rows, pred = craft(model, u.user_row, table[out_ids], P, g0, p0,
                               np.searchsorted(out_ids, targets), est, alpha, gamma, exp, pop,
                               dis, lookahead_eta(params, cfg), params.steps, params.lr, ref=ref,
                               optimizer=params.optimizer, craft_predictor=params.predictor)
            out.append((out_ids, rows, pred))
        return out, {"reference_updates": len(known)}

    # --- evaluation probe (evaluation code calls it; it never reaches the defense) ------------
    @classmethod
    def eval_probe(cls, env, arrays, rnd, targets, memory) -> dict:
        """The popularity estimator trained on the model at the attack's start (once, frozen):
        its held-out macro-F1 and, every evaluation, the class it gives each target."""
        from clients.malicious.popularity import predict

        cfg = env.cfg
        if rnd < cfg.attack.start_round - 1:
            return {}
        if "weights" not in memory:
            from clients.malicious.popularity import train_estimator
            from fedrec.targets import item_counts, popularity_classes

            classes = popularity_classes(item_counts(env.data))
            w, f1 = train_estimator(np.asarray(arrays[0]), classes, targets, [cfg.seed, 7, int(rnd)])
            memory.update(weights=w, f1=f1, round=int(rnd))
        cls_t = predict(memory["weights"], np.asarray(arrays[0])[targets])
        return {"pop_f1": float(memory["f1"]), "pop_target_class": float(cls_t.mean()),
                "pop_target_top": float((cls_t == 0).mean())}


def train_for_round(cfg, data, table, targets, rnd) -> list:
    """The estimator every malicious client attacking first in round `rnd` trains (the same
    public inputs and seed give the same weights, so one process trains it once)."""
    key = (cfg.digest(), int(rnd))
    w = _CACHE.get(key)
    if w is None:
        from clients.malicious.popularity import train_estimator
        from fedrec.targets import item_counts, popularity_classes

        classes = popularity_classes(item_counts(data))
        w, _ = train_estimator(np.asarray(table), classes, targets, [cfg.seed, _ESTIMATOR, int(rnd)])
        if len(_CACHE) > 4:
            _CACHE.clear()
        _CACHE[key] = w
    return [a.copy() for a in w]


def reference_rows(out_ids, ref_ids, ref_rows) -> np.ndarray:
    """The reference's rows at out_ids (0 for an id none of the reference updates sent)."""
    out = np.zeros((len(out_ids), ref_rows.shape[1]), np.float32)
    pos = np.searchsorted(ref_ids, out_ids).clip(max=max(len(ref_ids) - 1, 0))
    hit = ref_ids[pos] == out_ids if len(ref_ids) else np.zeros(len(out_ids), bool)
    out[hit] = ref_rows[pos[hit]]
    return out


def craft(model, u, V, P, g0, p0, tpos, est, alpha, gamma, exp, pop, dis, eta, steps, lr, ref=None,
          optimizer="adam", craft_predictor=True):
    """The deceptive (rows, predictor) after `steps` steps of `optimizer` (OPTIMIZERS) on L
    (module docstring).
    V: the uploaded ids' current rows; g0/p0: the honest gradient (zero rows for targets not
    among the client's own items); tpos: the targets' positions among the rows; ref: L_dis's
    reference (rows at the uploaded ids, predictor), None = the honest g0/p0 (local).
    craft_predictor False: the predictor stays p0 (uploaded as is, and the lookahead takes
    its honest step); only rows are optimised.

    Local: only the target rows and the predictor enter L_exp and L_pop; every other row
    starts at its honest value, where L_dis's gradient with respect to it is zero, so it never
    moves: those rows are left out of the optimisation (same result, far less work). With a
    reference of its own every row moves (toward it)."""
    tpos = np.asarray(tpos, np.int64)
    if ref is None:
        move, at, ref_rows, ref_pred = tpos, np.arange(len(tpos)), g0, p0
    else:
        move, at, (ref_rows, ref_pred) = np.arange(len(g0)), tpos, ref
    G = torch.from_numpy(np.ascontiguousarray(g0[move]).copy()).requires_grad_()
    Gp = [torch.from_numpy(p.copy()).requires_grad_(craft_predictor) for p in p0]
    Vt0 = torch.from_numpy(np.asarray(V, np.float32)[tpos])
    P = [torch.from_numpy(np.asarray(p, np.float32)) for p in P]
    g0t = torch.from_numpy(np.ascontiguousarray(ref_rows[move], np.float32))
    p0t = [torch.from_numpy(np.asarray(p, np.float32)) for p in ref_pred]
    at = torch.from_numpy(at)
    ut = torch.from_numpy(np.asarray(u, np.float32))
    opt = OPTIMIZERS[optimizer]([G, *Gp] if craft_predictor else [G], lr=lr)
    for _ in range(steps):
        Vt = Vt0 - eta * G[at]
        Pn = [p - eta * g for p, g in zip(P, Gp)]
        loss = torch.zeros(())
        if exp:
            loss = loss - torch.nn.functional.logsigmoid(torch_scores(model, ut, Vt, Pn)).sum()
        if pop:
            from clients.malicious.popularity import logits

            loss = loss - alpha * torch.log_softmax(logits(est, Vt), dim=1)[:, 0].sum()
        if dis:
            sq = ((G - g0t) ** 2).sum() + sum(((g - p) ** 2).sum() for g, p in zip(Gp, p0t))
            loss = loss + gamma * torch.sqrt(sq + 1e-12)
        if not loss.requires_grad:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    rows = g0.copy()
    rows[move] = G.detach().numpy()
    return rows, [g.detach().numpy().copy() for g in Gp]


class ExplicitBoostClient(PipAttackClient):
    """PipAttack's EB baseline: the deceptive gradient learned from L_exp alone."""

    name = "explicit_boost"
    knowledge_levels = ("local",)  # no L_dis, so nothing to collude on

    def weights(self):
        return 0.0, 0.0, True, False, False


@dataclass
class BoostedParams:
    boost: float = -1.0  # scale of the target-promoting gradient (< 0: 1 / malicious_fraction)


class BoostedClient(PipAttackClient):
    """Boosted model replacement (Bhagoji et al., 2019): honest gradient plus a scaled
    gradient of L_exp at the current model, on the client's own rows, the targets' and the
    predictor."""

    name = "boosted"
    knowledge_levels = ("local",)
    Params = BoostedParams

    def poison_upload(self, ids, rows, predictor, state, rnd):
        table, P = self._global[0], list(self._global[1:])
        targets = self.targets()
        out_ids = np.union1d(ids, targets).astype(np.int64)
        g0 = np.zeros((len(out_ids), table.shape[1]), np.float32)
        g0[np.searchsorted(out_ids, ids)] = rows
        boost = self.params.boost if self.params.boost >= 0 else 1.0 / max(self.cfg.attack.malicious_fraction, 1e-9)
        tpos = np.searchsorted(out_ids, targets)
        Vt = torch.from_numpy(np.asarray(table[targets], np.float32)).requires_grad_()
        Pt = [torch.from_numpy(np.asarray(p, np.float32)).requires_grad_() for p in P]
        ut = torch.from_numpy(np.asarray(state["user"], np.float32))
        loss = -torch.nn.functional.logsigmoid(torch_scores(self.model, ut, Vt, Pt)).sum()
        loss.backward()
        g0[tpos] += np.float32(boost) * Vt.grad.numpy()
        pred = [np.asarray(p, np.float32) + np.float32(boost) * t.grad.numpy() for p, t in zip(predictor, Pt)]
        return out_ids, g0, pred

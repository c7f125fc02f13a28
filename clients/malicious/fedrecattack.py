"""FedRecAttack (Rong et al., ICDE 2022), in fedrec's protocol: model poisoning that promotes the
targets using a small share of public interactions.

Threat model: local knowledge plus public data. The attacker knows the global model each
round it is sampled, and a public share `params.public_share` of all users' training
interactions (drawn once with the experiment's seed: public profiles, reviews...). It never
sees benign uploads or private user embeddings.

When sampled at t >= attack.start_round, a malicious client
1. approximates the embeddings of `params.users` users that have public interactions (a seeded
   draw per round) by `params.fit_steps` Adam steps (lr 0.05) of the model's pointwise loss on
   their public positives against as many uniform negatives, the item table and predictor
   fixed (one fit per round and process: every attacker of a round gets the same);
2. computes L_atk = sum_u sum_t softplus(s(u, k-th) - s(u, t)), where s(u, k-th) is the score of
   u's K-th best item (K = `params.k`, public items masked), i.e. the bar to enter u's top K;
3. uploads its honest gradient with each target's row replaced by the gradient of L_atk with
   respect to it, rescaled to the largest norm among its honest rows (the norm constraint that
   keeps it inconspicuous). Its ids: its own plus the targets; the predictor: honest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clients.malicious.pipattack import PipAttackClient
from fedrec.errors import ConfigError

_PUBLIC = 6700421  # stream tag of the public-interaction draw (one per experiment)
_APPROX: dict = {}  # (digest, round) -> approximated user embeddings, one fit per round and process


@dataclass
class FedRecAttackParams:
    public_share: float = 0.01  # share of the training interactions that are public
    users: int = 256  # approximated users per round
    fit_steps: int = 30  # Adam steps fitting their embeddings
    k: int = 5  # the top-K bar of L_atk

    def validate(self):
        if not 0.0 < self.public_share <= 1.0:
            raise ConfigError(f"attack.params.public_share: {self.public_share!r} is outside (0, 1]")
        if self.users < 1 or self.fit_steps < 0 or self.k < 1:
            raise ConfigError("attack.params: users and k must be >= 1, fit_steps >= 0")


def public_interactions(cfg, data, share: float):
    """(users, items) of the public interactions: a seeded share of the training pairs."""
    n = len(data.train_items)
    owner = np.repeat(np.arange(data.n_users), np.diff(data.train_indptr))
    rng = np.random.default_rng([cfg.seed, _PUBLIC])
    pick = np.sort(rng.choice(n, size=max(1, int(round(share * n))), replace=False))
    return owner[pick], np.asarray(data.train_items[pick], np.int64)


class FedRecAttackClient(PipAttackClient):
    name = "fedrecattack"
    Params = FedRecAttackParams
    # the public share of every user's interactions comes from the prepared data set: a
    # device built from its exported partition does not have it (fedrec.build refuses)
    needs_public_interactions = True

    def approx_users(self, table, P, rnd):
        key = (self.cfg.digest(), int(rnd))
        hit = _APPROX.get(key)
        if hit is not None:
            return hit
        p = self.params
        users, items = public_interactions(self.cfg, self.data, p.public_share)
        uniq = np.unique(users)
        rng = np.random.default_rng([self.cfg.seed, _PUBLIC, int(rnd)])
        chosen = np.sort(rng.choice(uniq, size=min(p.users, len(uniq)), replace=False))
        keep = np.isin(users, chosen)
        row = np.searchsorted(chosen, users[keep])
        pos = items[keep]
        neg = rng.integers(0, self.model.n_items, size=len(pos))
        d = table.shape[1]
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        U = (torch.randn((len(chosen), d), generator=gen) * 0.01).requires_grad_()
        V = torch.from_numpy(np.asarray(table, np.float32))
        Pt = [torch.from_numpy(np.asarray(a, np.float32)) for a in P]
        opt = torch.optim.Adam([U], lr=0.05)
        r = torch.from_numpy(row)
        for _ in range(p.fit_steps):
            s_pos = self._pair_scores(U[r], V[torch.from_numpy(pos)], Pt)
            s_neg = self._pair_scores(U[r], V[torch.from_numpy(neg)], Pt)
            loss = -(torch.nn.functional.logsigmoid(s_pos).mean()
                     + torch.nn.functional.logsigmoid(-s_neg).mean())
            opt.zero_grad()
            loss.backward()
            opt.step()
        out = (chosen, U.detach())
        if len(_APPROX) > 4:
            _APPROX.clear()
        _APPROX[key] = out
        return out

    def _pair_scores(self, U, V, P):
        """score(u_b, v_b) row by row (differentiable)."""
        if self.model.name == "mf":
            return (U * V).sum(1)
        d = V.shape[1]
        neumf = self.model.form == "neumf"
        w1, b1, w2, b2, wo, bo = P[-6:]
        s = torch.tanh(torch.tanh(torch.cat([U, V], 1) @ w1.T + b1) @ w2.T + b2) @ wo + bo
        return s + (U * V) @ P[0] if neumf else s

    def poison_upload(self, ids, rows, predictor, state, rnd):
        table, P = self._global[0], list(self._global[1:])
        targets = self.targets()
        users, U = self.approx_users(table, P, rnd)
        Vt = torch.from_numpy(np.asarray(table[targets], np.float32)).requires_grad_()
        Pt = [torch.from_numpy(np.asarray(a, np.float32)) for a in P]
        scores = self.model.score(U.numpy(), table, P)  # (B, N), vectorised, no gradient
        scores[:, targets] = -np.inf
        bar = torch.from_numpy(np.partition(scores, -self.params.k, axis=1)[:, -self.params.k]
                               .astype(np.float32))
        B, T = U.shape[0], len(targets)
        s_t = self._pair_scores(U.repeat_interleave(T, 0), Vt.repeat(B, 1), Pt).reshape(B, T)
        loss = torch.nn.functional.softplus(bar[:, None] - s_t).sum()
        loss.backward()
        grad = Vt.grad.numpy()
        out_ids = np.union1d(ids, targets).astype(np.int64)
        out = np.zeros((len(out_ids), table.shape[1]), np.float32)
        out[np.searchsorted(out_ids, ids)] = rows
        kappa = float(np.linalg.norm(rows, axis=1).max()) if len(rows) else 1.0
        norms = np.linalg.norm(grad, axis=1, keepdims=True)
        out[np.searchsorted(out_ids, targets)] = grad * (kappa / np.maximum(norms, 1e-12))
        return out_ids, out, predictor

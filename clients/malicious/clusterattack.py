"""ClusterAttack (Yu et al., AAAI 2023): poisonous item gradients that pull the item
embeddings into a few dense clusters.

Threat model: colluding. The attacker controls the malicious clients: their data, the
training code, and the global model they receive; it pools their honest updates (for the
norm statistics: those of the round's sampled malicious clients, or with attack.pool_sample
= N those of up to N of all its clients at the current model, as the reference code's 50)
and keeps its own state across rounds (K and the loss EMA). It sees no benign client's data
or update. Per round in which some malicious client is sampled:

1. k-means (K clusters, warm-started from the last centroids) over every item embedding V;
2. L_attack = sum_i ||v_i - c_k(i)||^2 / K, whose gradient 2 (v_i - c_k(i)) / K is the
   malicious item gradient (every item row: a dense upload);
3. norm matching: mu, sigma = mean and std of the L2 norms of the item-row gradients in the
   malicious clients' honest updates (every row of every pool update when there is a pool,
   else of the round's own); each malicious client (the round's own) rescales each row to norm
   mu + lambda * sigma, lambda ~ U[0, 3) drawn per row (params.norm_mode "clip" only shrinks,
   as in the paper's slides: g / max(1, ||g|| / b));
4. adaptive K (Algorithm 1): bias-corrected EMA (beta) of L_attack; count rises and falls;
   when rises - falls >= R: K = min(floor(K + sqrt(Kmax - K)), Kmax); when falls - rises >= R:
   K = max(floor(K - sqrt(K - Kmin)), Kmin); counters, t and the EMA reset, and R grows by
   (1 + r_growth) (the reference's undefined rate; default 0).
The predictor gradient is the honest one. With params.contrastive_alpha > 0 (ClusterAttack+CL)
each client adds alpha times the gradient of UNION's contrastive loss on its own positives,
which keeps the item embeddings looking uniform to UNION's filter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from clients.malicious.base import MaliciousClient, colluding_set
from fedrec.errors import ConfigError
from fedrec.models.losses import contrastive_table_grad


def lloyd_kmeans(table: np.ndarray, k: int, rng, tol: float = 1e-4, max_iter: int = 1000):
    """(labels, centroids, inertia) of the reference code's k-means: k distinct rows drawn at
    random as the initial centroids, then Lloyd steps until the centroids move by less than
    `tol` (Frobenius norm of the change); an empty cluster keeps its centroid."""
    x = table.astype(np.float64)
    k = int(min(k, len(x)))
    centroids = x[rng.choice(len(x), size=k, replace=False)]
    sq = (x * x).sum(1)
    for _ in range(max_iter):
        dist = sq[:, None] - 2.0 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
        labels = dist.argmin(1)
        counts = np.bincount(labels, minlength=k)
        sums = cluster_sums(x, labels, k)
        new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centroids)
        shift = float(np.sqrt(((new - centroids) ** 2).sum()))
        centroids = new
        if shift < tol:  # as the reference: the labels of the last assignment step
            break
    return labels, centroids, float(((x - centroids[labels]) ** 2).sum())


def cluster_sums(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(k, d) sums of the rows of x (n, d) per label, added in row order from 0.0 as
    np.add.at(zeros, labels, x) does (the same numbers), by one bincount over (label,
    column) keys: ~4x cheaper than ufunc.at on ML-1M's 3,706 x 64 table."""
    n, d = x.shape
    keys = (labels[:, None] * d + np.arange(d)).ravel()
    return np.bincount(keys, weights=x.ravel(), minlength=k * d).reshape(k, d)


def kmeans(table: np.ndarray, k: int, rng, init=None, max_iter: int = 20):
    """(labels, centroids, inertia) of k-means on the rows of `table` (scikit-learn)."""
    from sklearn.cluster import KMeans

    k = int(min(k, len(table)))
    if init is not None and len(init) == k:
        km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=max_iter)
    else:
        km = KMeans(n_clusters=k, n_init=1, max_iter=max_iter,
                    random_state=int(rng.integers(2**31 - 1)))
    labels = km.fit_predict(table.astype(np.float64))
    return labels, km.cluster_centers_, float(km.inertia_)


def cluster_gradient(table: np.ndarray, labels: np.ndarray, centroids: np.ndarray, k: int):
    """(gradient (n_items, dim), loss) of L = sum_i ||v_i - c_k(i)||^2 / K w.r.t. V."""
    diff = table.astype(np.float64) - centroids[labels]
    return (2.0 * diff / k).astype(np.float32), float((diff * diff).sum() / k)


def match_norms(grad: np.ndarray, mu: float, sigma: float, lam: np.ndarray, mode: str = "rescale"):
    """Each row of grad to L2 norm b = mu + lam * sigma (mode "rescale"), or clipped to b
    (mode "clip": g / max(1, ||g|| / b))."""
    b = (mu + lam * sigma)[:, None]
    norm = np.linalg.norm(grad, axis=1, keepdims=True)
    safe = np.where(norm > 0, norm, 1.0)
    if mode == "rescale":
        return (grad * (b / safe)).astype(np.float32)
    return (grad / np.maximum(1.0, norm / np.maximum(b, 1e-30))).astype(np.float32)


@dataclass
class AdaptiveK:
    """Algorithm 1's state (one per attacker)."""

    k: int = 2
    k_min: int = 1
    k_max: int = 50
    r: float = 100.0
    beta: float = 0.999
    r_growth: float = 0.0
    rounding: str = "floor"  # floor (Algorithm 1 as published) | round (the reference code)
    t: int = 0
    ema: float = 0.0
    last: float = math.nan
    n_inc: int = 0
    n_dec: int = 0

    def update(self, loss: float) -> int:
        """Feed this round's L_attack; returns the K for the next attack round."""
        self.t += 1
        self.ema = self.beta * self.ema + (1 - self.beta) * loss
        hat = self.ema / (1 - self.beta ** self.t)
        if not math.isnan(self.last):  # the first value after a reset has nothing to compare
            if hat > self.last:
                self.n_inc += 1
            else:
                self.n_dec += 1
        self.last = hat
        to_int = math.floor if self.rounding == "floor" else round
        if self.n_inc - self.n_dec >= self.r:
            self.k = min(to_int(self.k + math.sqrt(self.k_max - self.k)), self.k_max)
            self._reset()
        elif self.n_dec - self.n_inc >= self.r:
            self.k = max(to_int(self.k - math.sqrt(self.k - self.k_min)), self.k_min)
            self._reset()
        return self.k

    def _reset(self):
        self.t, self.ema, self.last, self.n_inc, self.n_dec = 0, 0.0, math.nan, 0, 0
        self.r *= 1 + self.r_growth


@dataclass
class ClusterAttackParams:
    k0: int = 2
    k_min: int = 1
    k_max: int = 50
    r: int = 100  # threshold R of Algorithm 1
    r_growth: float = 0.0
    beta: float = 0.999
    lambda_max: float = 3.0  # lambda ~ U[0, lambda_max)
    norm_mode: str = "rescale"  # rescale | clip
    kmeans_iter: int = 20
    # warm: scikit-learn k-means from last round's centroids (kmeans_iter steps);
    # random: the reference code's (k random items as centroids, Lloyd steps to convergence)
    kmeans_init: str = "warm"
    k_rounding: str = "floor"  # floor (the paper's Algorithm 1) | round (the reference code)
    adaptive: bool = True
    contrastive_alpha: float = 0.0  # > 0: ClusterAttack+CL (UNION's contrastive loss added)
    contrastive_negatives: int = 15

    def validate(self):
        if not 1 <= self.k_min <= self.k0 <= self.k_max:
            raise ConfigError("attack.params: need 1 <= k_min <= k0 <= k_max")
        if self.norm_mode not in ("rescale", "clip"):
            raise ConfigError(f"attack.params.norm_mode: {self.norm_mode!r} is not one of rescale, clip")
        if self.kmeans_init not in ("warm", "random"):
            raise ConfigError(f"attack.params.kmeans_init: {self.kmeans_init!r} is not one of warm, random")
        if self.k_rounding not in ("floor", "round"):
            raise ConfigError(f"attack.params.k_rounding: {self.k_rounding!r} is not one of floor, round")


class ClusterAttackClient(MaliciousClient):
    name = "clusterattack"
    knowledge_levels = ("colluding",)
    Params = ClusterAttackParams

    @classmethod
    def craft_round(cls, view, params, memory, rng):
        state = memory.get("adaptive")
        if state is None:
            state = memory["adaptive"] = AdaptiveK(k=params.k0, k_min=params.k_min, k_max=params.k_max,
                                                   r=params.r, beta=params.beta, r_growth=params.r_growth,
                                                   rounding=params.k_rounding)
        k = state.k
        table = view.item_table
        if params.kmeans_init == "random":
            labels, centroids, _ = lloyd_kmeans(table, k, rng)
        else:
            labels, centroids, _ = kmeans(table, k, rng, init=memory.get("centroids"),
                                          max_iter=params.kmeans_iter)
        memory["centroids"] = centroids
        grad, loss = cluster_gradient(table, labels, centroids, k)
        known = colluding_set(view)
        norms = np.concatenate([np.linalg.norm(u.item_rows, axis=1) for u in known]) \
            if known else np.zeros(0)
        mu, sigma = (float(norms.mean()), float(norms.std())) if norms.size else (0.0, 0.0)
        ids = np.arange(table.shape[0], dtype=np.int64)
        out = []
        for u in view.own:
            rows = grad
            if params.contrastive_alpha > 0:
                rows = rows + params.contrastive_alpha * contrastive_table_grad(
                    table, u.train_items, params.contrastive_negatives, rng)
            lam = rng.uniform(0.0, params.lambda_max, size=len(ids))
            out.append((ids, match_norms(rows, mu, sigma, lam, params.norm_mode), u.predictor))
        if params.adaptive:
            state.update(loss)
        return out, {"K": k, "loss": loss, "norm_mu": mu, "norm_sigma": sigma}

"""On-device countermeasures, applied to a client's upload before it leaves the device.

- `ldp`: local DP, Gaussian mechanism: clip the upload's values ([item rows | predictor
  gradients], one vector) to L2 norm C, add N(0, sigma^2) to every uploaded value with
  sigma = C * sqrt(2 ln(1.25/delta)) / epsilon: Flower's LocalDpMod calibration, with the
  clipping norm as the sensitivity. LocalDpMod itself does not apply to fedrec's uploads: it
  clips and noises (returned parameters - received parameters) array by array, while a
  fedrec upload is [item ids, item rows, predictor gradients] of other shapes than the global
  arrays (it would also noise the integer ids), and it draws from numpy's global generator.
  Flower's server-side DP wrappers noise the aggregate, after the server has seen each
  upload: no protection against an honest-but-curious server;
- `laplace`: clip as above, then Laplace(0, b) per value, b = b_rel * C / sqrt(D) (D values:
  b_rel = 1 is noise as large as an upload at the clipping norm);
- `padding`: r * |P| extra random ids (not uploaded, not the user's own items) whose rows are
  negative-like gradients (BCE's negative coefficient q*sigmoid(s)/n at the device's own user
  row); the predictor gradient is unchanged. Drawn afresh every round.
Every draw comes from a generator seeded by (seed, user, round, purpose).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

LDP, LAPLACE, PADDING = 21, 22, 23


@dataclass
class Countermeasure:
    kind: str = "none"  # none | ldp | laplace | padding
    epsilon: float = 0.0
    delta: float = 1e-8
    clip: float = 0.01
    b_rel: float = 0.0
    pad_ratio: float = 0.0

    def label(self) -> str:
        if self.kind == "ldp":
            return f"LDP eps={self.epsilon:g}"
        if self.kind == "laplace":
            return f"Laplace b_rel={self.b_rel:g}"
        if self.kind == "padding":
            return f"padding r={self.pad_ratio:g}"
        return "none"


def _rng(seed, user, rnd, purpose):
    return np.random.default_rng([int(seed), int(user), int(rnd), purpose])


def _clip(values: list, C: float) -> list:
    norm = np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in values))
    f = min(1.0, C / norm) if norm > 0 else 1.0
    return [v * np.float32(f) for v in values]


def gaussian_sigma(C: float, epsilon: float, delta: float) -> float:
    return C * np.sqrt(2 * np.log(1.25 / delta)) / epsilon


def make_protect(cm: Countermeasure, seed: int):
    """(client, rnd, upload arrays, n, global arrays) -> protected upload arrays, or None."""
    if cm.kind == "none":
        return None

    def protect(client, rnd, arrays, n, global_arrays):
        ids, values = arrays[0], [np.asarray(a, np.float32) for a in arrays[1:]]
        if cm.kind in ("ldp", "laplace"):
            values = _clip(values, cm.clip)
            if cm.kind == "ldp":
                rng = _rng(seed, client.user, rnd, LDP)
                sigma = gaussian_sigma(cm.clip, cm.epsilon, cm.delta)
                values = [(v + rng.normal(0.0, sigma, v.shape)).astype(np.float32) for v in values]
            else:
                rng = _rng(seed, client.user, rnd, LAPLACE)
                D = sum(v.size for v in values)
                b = cm.b_rel * cm.clip / np.sqrt(max(D, 1))
                values = [(v + rng.laplace(0.0, b, v.shape)).astype(np.float32) for v in values]
            return [ids, *values]
        if cm.kind == "padding":
            return _pad(client, rnd, ids, values, n, global_arrays, cm, seed)
        raise ValueError(f"unknown countermeasure {cm.kind!r}")

    return protect


def _pad(client, rnd, ids, values, n, global_arrays, cm, seed):
    from fedrec.privacy.simulator import _t, round_model

    n_pos = len(client.train_items)
    extra = int(round(cm.pad_ratio * n_pos))
    if extra <= 0:
        return [ids, *values]
    free = np.ones(client.model.n_items, bool)
    free[ids] = False
    free[client.known_sorted] = False
    pool = np.flatnonzero(free)
    rng = _rng(seed, client.user, rnd, PADDING)
    pad = np.sort(rng.choice(pool, size=min(extra, len(pool)), replace=False))
    rm = round_model(client.model, client.cfg, global_arrays, pad)
    u = client.private_state()["user"]
    with torch.no_grad():
        f = rm.forward(_t(u)[None])
        c = rm.q * torch.sigmoid(f["s"]) / float(n)
        rows = (c[:, :, None] * f["ds_dv"] + rm.wd * rm.V)[0].numpy().astype(np.float32)
    all_ids = np.concatenate([ids, pad])
    order = np.argsort(all_ids)
    all_rows = np.concatenate([values[0], rows])[order]
    return [all_ids[order], all_rows, *values[1:]]

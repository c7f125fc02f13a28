"""Who is malicious: ground truth, read only by clients (their own flag), attack and evaluation code.

A defense never imports this module (tests/test_adversary.py checks the imports).
"""

from __future__ import annotations

import numpy as np

from fedrec.errors import ConfigError

_ROLES = 7919  # stream tag: the malicious draw has its own generator


def n_malicious(cfg, n_users: int) -> int:
    if cfg.attack.name == "none":
        return 0
    return int(round(cfg.attack.malicious_fraction * n_users))


def malicious_users(cfg, data) -> np.ndarray:
    """Sorted ids of the malicious users: `attack.malicious_fraction` of all users, drawn
    from the attacker pool with `attack.draw_seed` (None: the experiment's seed). The pool is
    excluded from evaluation in every run, so a clean run and an attacked run with the same
    seed are evaluated on the same users."""
    k = n_malicious(cfg, data.n_users)
    if k == 0:
        return np.zeros(0, np.int64)
    pool = np.asarray(data.attacker_pool, dtype=np.int64)
    if k > len(pool):
        raise ConfigError(
            f"attack.malicious_fraction: {cfg.attack.malicious_fraction} of {data.n_users} users is "
            f"{k} attackers, but the attacker pool (data.attacker_pool = {cfg.data.attacker_pool}) "
            f"holds {len(pool)}; raise data.attacker_pool")
    draw_seed = cfg.seed if cfg.attack.draw_seed is None else cfg.attack.draw_seed
    rng = np.random.default_rng([draw_seed, _ROLES])
    return np.sort(rng.choice(pool, size=k, replace=False)).astype(np.int64)


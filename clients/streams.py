"""A device's random streams: one per (seed, user, purpose, round), independent of the order
in which devices run.

Each (seed, user, purpose) seeds a PCG64 once; round r uses that stream advanced by r * 2**70
draws (PCG64's period is 2**128, and a round draws far fewer than 2**70 numbers, so rounds
never overlap). Re-seeding per round through SeedSequence gives the same independence but
costs ~6x more, and the in-process runner does it 50x a round.

Purposes 1-4 are the honest client's; attacks number their own streams from 10 up.
"""

from __future__ import annotations

import numpy as np

INIT, STATIC_NEGATIVES, ROUND, CONTRASTIVE = 1, 2, 3, 4


class Streams:
    def __init__(self, seed: int, user: int):
        self.seed, self.user = int(seed), int(user)
        self._bases: dict = {}

    def __call__(self, purpose: int, rnd: int = 0) -> np.random.Generator:
        base = self._bases.get(purpose)
        if base is None:
            bg = np.random.PCG64(np.random.SeedSequence([self.seed, self.user, purpose]))
            base = self._bases[purpose] = (bg, bg.state)
        bg, state = base
        bg.state = state
        bg.advance(int(rnd) << 70)
        return np.random.Generator(bg)

"""The upload replayed through the package's own client code (a ground-truth tool: it runs a
simulated device with its private generator, so the attack modules never import it)."""

from __future__ import annotations

import numpy as np


def replay_upload(client, arrays, user, pos, neg, rnd: int):
    """The package's own client code on (user row, pairs) at `arrays`, with the client's round
    generator (its dropout masks): (ids, rows, predictor) as the client computes them, before
    any countermeasure. Exact for dropout and fresh negatives alike."""
    from clients.streams import ROUND

    rng = client.stream(ROUND, rnd)
    if client.cfg.data.negatives == "fresh":  # the round's first draws are its negatives
        client.draw_negatives(rng)
    g = client.model.gradients(arrays[0], list(arrays[1:]), np.asarray(user, np.float32),
                               np.asarray(pos), np.asarray(neg), rng, **client.weight_decay())
    g = client.reduced(g)
    return g.item_ids, g.item_rows, g.predictor

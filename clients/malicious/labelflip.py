"""LabelFlip: data poisoning by swapping positive and negative labels.

Threat model: local. The attacker controls its own devices' data and runs the honest
training code on it; it knows nothing of other clients. Each malicious client trains on its
pairs with the labels swapped (the sampled negatives become positives and vice versa), so its
upload is an honest-looking gradient of the flipped data.
"""

from __future__ import annotations

from clients.malicious.base import MaliciousClient


class LabelFlipClient(MaliciousClient):
    name = "labelflip"
    knowledge_levels = ("local",)

    def poison_pairs(self, pos, neg, state, rng):
        return neg, pos

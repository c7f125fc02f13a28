"""The simulation-only adversary hook: colluding and omniscient attacks get their knowledge here.

The runner calls `Adversary.intervene` between collecting a round's uploads and handing them
to the strategy (the defense), and records the diagnostics it returns. It knows the ground truth (which users are malicious, from
`fedrec.roles`), builds the `AdversaryView` the attack's threat model grants (its own
clients' honest updates; with `omniscient` also the round's benign updates), asks the attack
class for the malicious uploads and puts them in place of the honest ones. The strategy then
receives an ordinary list of uploads: it never learns who sent what, and never imports this
module.

Only the in-process runner and `flwr run`'s simulation runtime can call it. In a real
deployment the server has no such view, so `fedrec.server_app` refuses non-local attacks there.
"""

from __future__ import annotations

import numpy as np

from fedrec.protocol import encode_upload

_ADVERSARY = 6700417  # stream tag of the adversary's own generator


def attack_class(cfg):
    """The attack's client class, or None for a clean run."""
    if cfg.attack.name == "none":
        return None
    from fedrec.registry import attack_class as lookup

    return lookup(cfg.attack.name)


def make_adversary(cfg, env):
    """The run's Adversary (None for a clean run). For a local attack it crafts nothing and
    only logs how many malicious uploads each round had (the ground truth stays here)."""
    cls = attack_class(cfg)
    if cls is None:
        return None
    from fedrec.roles import malicious_users

    return Adversary(cfg, env, cls, malicious_users(cfg, env.data))


class Adversary:
    def __init__(self, cfg, env, attack_cls, malicious):
        self.cfg = cfg
        self.attack_cls = attack_cls
        self.params = attack_cls.params_from(cfg)
        self.knowledge = attack_cls.knowledge_from(cfg)
        self.malicious = set(int(u) for u in malicious)
        self.n_items = env.model.n_items
        self.data = env.data
        self.memory: dict = {}  # the attacker's state across rounds (e.g. ClusterAttack's K)

    def state_dict(self) -> dict:
        """The attacker's memory across rounds (its per-round generator derives from the seed)."""
        import copy

        return {"memory": copy.deepcopy(self.memory)}

    def load_state_dict(self, state: dict):
        import copy

        self.memory = copy.deepcopy(state["memory"])

    def rng(self, rnd: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, _ADVERSARY, int(rnd)])

    def intervene(self, rnd: int, results: list, global_arrays: list) -> tuple[list, dict]:
        """results: [(user, upload arrays, num_examples, metrics)] -> (the same list with the
        malicious uploads replaced, order and everything else unchanged; the round's attack
        diagnostics for the metrics row, {} when the attack did not act)."""
        from clients.malicious.base import AdversaryView, HonestUpdate

        if rnd < self.cfg.attack.start_round:
            return results, {}
        own_pos = [i for i, r in enumerate(results) if int(r[0]) in self.malicious
                   and isinstance(r[1], (list, tuple))]  # bytes that did not decode: nothing to know
        if not own_pos:
            return results, {}
        if self.knowledge == "local":  # the clients crafted their uploads themselves
            return results, {"attack_uploads": len(own_pos)}

        def view_of(i, own=False):
            user, up, n, _ = results[i]
            return HonestUpdate(int(user), np.asarray(up[0]), np.asarray(up[1]),
                                [np.asarray(p) for p in up[2:]], int(n),
                                self.data.train_of(int(user)) if own else None)

        # an empty upload (a client with nothing to train on) carries no knowledge
        own = [view_of(i, own=True) for i in own_pos]
        benign = None
        if self.knowledge == "omniscient":
            mal = set(own_pos)
            benign = [view_of(i) for i in range(len(results))
                      if i not in mal and isinstance(results[i][1], (list, tuple))
                      and int(results[i][2]) > 0]
        view = AdversaryView(round=int(rnd), item_table=global_arrays[0],
                             predictor=list(global_arrays[1:]), own=own, benign=benign,
                             n_clients=len(results), n_items=self.n_items,
                             weighting=self.cfg.server.weighting)
        crafted, diag = self.attack_cls.craft_round(view, self.params, self.memory, self.rng(rnd))
        if len(crafted) != len(own):
            raise RuntimeError(f"{self.attack_cls.name}.craft_round returned {len(crafted)} "
                               f"uploads for {len(own)} malicious clients")
        out = list(results)
        for i, (ids, rows, pred) in zip(own_pos, crafted):
            user, _, n, metrics = out[i]
            out[i] = (user, encode_upload(ids, rows, pred), n, metrics)
        diagnostics = {f"attack_{k}": v for k, v in diag.items()}
        diagnostics["attack_uploads"] = len(own)
        return out, diagnostics

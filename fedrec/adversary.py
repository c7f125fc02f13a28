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

The pool (`attack.pool_sample` = N > 0; in-process runner only): in every round it acts, the
adversary also learns the honest updates of up to N malicious clients drawn without
replacement from all of them, at the current global model (`view.pool`), as the
ClusterAttack/UNION reference's colluding attacker takes its statistics from up to 50 of its
clients whether sampled or not. The runner computes them (`honest_updates`, on twins of the
devices: their private state is read, never changed); a drawn client sampled in the round
contributes the honest update it sent. `flwr run`'s ServerApp cannot read the devices'
private state and refuses N > 0.

User rows (an attack with `needs_user_rows`, e.g. colluding PipAttack; in-process runner
only): the adversary controls its devices, so it also reads each own client's private user
row after the round's fit (the runner's `user_rows` callback) into `HonestUpdate.user_row`;
`flwr run` refuses such an attack (fedrec.server_app.check_pool).
"""

from __future__ import annotations

import numpy as np

from fedrec.protocol import encode_upload

_ADVERSARY = 6700417  # stream tag of the adversary's own generator
_POOL = 1  # sub-tag of the pool's draw: a generator of its own, so that the attack's draws
# from `Adversary.rng(rnd)` are the same numbers with or without a pool


def attack_class(cfg):
    """The attack's client class, or None for a clean run."""
    if cfg.attack.name == "none":
        return None
    from fedrec.registry import attack_class as lookup

    return lookup(cfg.attack.name)


def honest_update(user, upload, num_examples, train_items=None):
    """An upload (a list of arrays) as the adversary's HonestUpdate (the arrays as they came)."""
    from clients.malicious.base import HonestUpdate

    return HonestUpdate(int(user), np.asarray(upload[0]), np.asarray(upload[1]),
                        [np.asarray(p) for p in upload[2:]], int(num_examples), train_items)


def make_adversary(cfg, env, honest_updates=None, user_rows=None):
    """The run's Adversary (None for a clean run). For a local attack it crafts nothing and
    only logs how many malicious uploads each round had (the ground truth stays here).
    honest_updates(users, arrays, rnd) -> [(upload, num_examples, metrics)]: the runner's
    callback for the pool (needed when attack.pool_sample > 0). user_rows(users, rnd) ->
    (k, dim): the runner's callback for the private user rows of its own clients (needed by
    an attack with `needs_user_rows`, e.g. colluding PipAttack)."""
    cls = attack_class(cfg)
    if cls is None:
        return None
    from fedrec.roles import malicious_users

    return Adversary(cfg, env, cls, malicious_users(cfg, env.data), honest_updates, user_rows)


class Adversary:
    def __init__(self, cfg, env, attack_cls, malicious, honest_updates=None, user_rows=None):
        self.cfg = cfg
        self.honest_updates = honest_updates
        self.user_rows = user_rows
        self.attack_cls = attack_cls
        self.params = attack_cls.params_from(cfg)
        self.knowledge = attack_cls.knowledge_from(cfg)
        # the attack's view of the public setting (targets, model, ...), built once
        self.context = None if self.knowledge == "local" else attack_cls.adversary_context(cfg, env)
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

    def pool_rng(self, rnd: int) -> np.random.Generator:
        """The pool's draw: derived from the adversary's seed and round, apart from `rng`."""
        return np.random.default_rng([self.cfg.seed, _ADVERSARY, int(rnd), _POOL])

    def pool_users(self, rnd: int) -> list:
        """The round's pool: up to attack.pool_sample malicious users, drawn without
        replacement from all of them (sorted, so the draw depends on the seed alone)."""
        every = np.array(sorted(self.malicious), dtype=np.int64)
        n = min(int(self.cfg.attack.pool_sample), len(every))
        return [int(u) for u in self.pool_rng(rnd).choice(every, size=n, replace=False)]

    def pool(self, rnd: int, results: list, own: list, global_arrays: list) -> list:
        """[HonestUpdate] of the round's pool, in draw order: a user sampled in the round
        gives its honest upload (view.own; none if it did not decode), any other one its
        honest update computed by the runner at `global_arrays`."""
        if self.honest_updates is None:
            raise RuntimeError("attack.pool_sample > 0 needs the runner's honest_updates callback "
                               "(the in-process runner gives it; flwr run cannot)")
        users = self.pool_users(rnd)
        sampled = {int(r[0]) for r in results}
        by_user = {u.user: u for u in own}
        missing = [u for u in users if u not in sampled]
        computed = dict(zip(missing, self.honest_updates(missing, global_arrays, rnd)
                            if missing else []))
        out = []
        for u in users:
            if u in computed:
                up, n, _ = computed[u]
                out.append(honest_update(u, up, n, self.data.train_of(u)))
            elif u in by_user:
                out.append(by_user[u])
        return out

    def intervene(self, rnd: int, results: list, global_arrays: list) -> tuple[list, dict]:
        """results: [(user, upload arrays, num_examples, metrics)] -> (the same list with the
        malicious uploads replaced, order and everything else unchanged; the round's attack
        diagnostics for the metrics row, {} when the attack did not act)."""
        from clients.malicious.base import AdversaryView

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
            return honest_update(user, up, n, self.data.train_of(int(user)) if own else None)

        # an empty upload (a client with nothing to train on) carries no knowledge
        own = [view_of(i, own=True) for i in own_pos]
        if self.attack_cls.needs_user_rows:
            if self.user_rows is None:
                raise RuntimeError(f"{self.attack_cls.name} needs the runner's user_rows callback "
                                   "(the in-process runner gives it; flwr run cannot)")
            for u, row in zip(own, self.user_rows([u.user for u in own], rnd)):
                u.user_row = np.asarray(row, np.float32)
        benign = None
        if self.knowledge == "omniscient":
            mal = set(own_pos)
            benign = [view_of(i) for i in range(len(results))
                      if i not in mal and isinstance(results[i][1], (list, tuple))
                      and int(results[i][2]) > 0]
        pool = None
        if self.cfg.attack.pool_sample > 0:
            pool = self.pool(rnd, results, own, global_arrays)
        view = AdversaryView(round=int(rnd), item_table=global_arrays[0],
                             predictor=list(global_arrays[1:]), own=own, benign=benign,
                             n_clients=len(results), n_items=self.n_items,
                             weighting=self.cfg.server.weighting, pool=pool,
                             context=self.context)
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
        if pool is not None:
            diagnostics["attack_pool"] = len(pool)
        return out, diagnostics

"""YAML names -> classes for aggregation rules (and, later, attacks and defenses).

Entries are "module:Class" strings imported on first use, so `fedrec/` never imports
`strategies/` or `clients/` at module load. Adding a rule = one file + one line here.
"""

from __future__ import annotations

import importlib

from fedrec.errors import ConfigError

RULES = {
    "mean": "strategies.mean:MeanRule",
    "median": "strategies.median:MedianRule",
    "trimmed_mean": "strategies.trimmed_mean:TrimmedMeanRule",
    "krum": "strategies.krum:KrumRule",
    "multikrum": "strategies.krum:MultiKrumRule",
    "bulyan": "strategies.bulyan:BulyanRule",
    "norm_bound": "strategies.norm_bound:NormBoundRule",
}


# server.filter: a filter wraps the rule (it drops uploads, the rule aggregates the rest)
FILTERS = {
    "none": None,
    "union": "strategies.union:UnionRule",
    "detector": "strategies.detector:DetectorRule",
}


# attack.name -> MaliciousClient subclass (one file per attack in clients/malicious/)
ATTACKS = {
    "labelflip": "clients.malicious.labelflip:LabelFlipClient",
    "gaussian": "clients.malicious.gaussian:GaussianClient",
    "lie": "clients.malicious.lie:LIEClient",
    "fang": "clients.malicious.fang:FangClient",
    "dynopt": "clients.malicious.dynopt:DynOptClient",
    "fedattack": "clients.malicious.fedattack:FedAttackClient",
    "clusterattack": "clients.malicious.clusterattack:ClusterAttackClient",
    "spattack": "clients.malicious.spattack:SpattackClient",
    # not an attack on the model: arbitrary bytes and metrics, to test the server (fedrec.fuzz)
    "hostile": "clients.malicious.hostile:HostileClient",
}


def attack_class(name: str):
    if name not in ATTACKS:
        raise ConfigError(f"attack.name: {name!r} is not one of none, {', '.join(ATTACKS)}")
    return load_class(ATTACKS[name])


def load_class(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def make_rule(cfg):
    name = getattr(cfg.server, "rule", "mean")
    if name not in RULES:
        raise ConfigError(f"server.rule: {name!r} is not one of {', '.join(RULES)}")
    cls = load_class(RULES[name])
    # rules with parameters read them (server.rule_f, ..., train.clients_per_round) and
    # check them against the round size themselves; the others only take the granularity
    rule = cls.from_config(cfg) if hasattr(cls, "from_config") else cls(cfg.server.aggregation)
    name = getattr(cfg.server, "filter", "none")
    if name not in FILTERS:
        raise ConfigError(f"server.filter: {name!r} is not one of {', '.join(FILTERS)}")
    if FILTERS[name] is not None:
        rule = load_class(FILTERS[name]).from_config(cfg, rule)
    return rule

"""YAML names -> classes, and the one place that builds rules and filters from a config.

Entries are "module:Class" strings imported on first use, so `fedrec/` never imports
`strategies/` or `clients/` at module load. A rule or a pre-aggregation step takes only its
own parameters; its entry says which config value feeds each constructor argument:
"section.key" (a config key), or "@name" (a value derived here, see `_derived`). Adding a
rule or a filter = one file + one line here.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from fedrec.errors import ConfigError

# server.rule -> (class, {constructor argument: config source})
RULES = {
    "mean": ("strategies.mean:MeanRule", {"granularity": "server.aggregation"}),
    "median": ("strategies.median:MedianRule", {"granularity": "server.aggregation", "f": "server.rule_f"}),
    "trimmed_mean": ("strategies.trimmed_mean:TrimmedMeanRule",
                     {"granularity": "server.aggregation", "f": "server.rule_f"}),
    "krum": ("strategies.krum:KrumRule", {"granularity": "server.aggregation", "f": "server.rule_f"}),
    "multikrum": ("strategies.krum:MultiKrumRule", {"granularity": "server.aggregation",
                                                    "f": "server.rule_f", "m": "server.multikrum_m"}),
    "bulyan": ("strategies.bulyan:BulyanRule", {"granularity": "server.aggregation", "f": "server.rule_f"}),
    "norm_bound": ("strategies.norm_bound:NormBoundRule",
                   {"granularity": "server.aggregation", "bound": "server.norm_bound"}),
}

# server.filters entries: pre-aggregation steps, applied in order before the rule
FILTERS = {
    "union": ("strategies.union:UnionFilter", {
        "sample_items": "server.union_sample_items", "gap_b": "server.union_gap_b",
        "expected_attackers": "@union_expected_attackers", "seed": "seed",
        "cache_dir": "@cache_dir", "optimizer": "@server_optimizer", "device": "@union_device"}),
    "detector": ("strategies.detector:DetectorFilter", {
        "detector": "@detector", "threshold": "server.detector_threshold"}),
    "clip": ("strategies.clip:ClipFilter", {"bound": "server.norm_bound",
                                            "granularity": "server.aggregation"}),
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
    # targeted (promotion of attack.target): PipAttack and its baselines
    "pipattack": "clients.malicious.pipattack:PipAttackClient",
    "explicit_boost": "clients.malicious.pipattack:ExplicitBoostClient",
    "boosted": "clients.malicious.pipattack:BoostedClient",
    "random_attack": "clients.malicious.fakeprofile:RandomAttackClient",
    "popular_attack": "clients.malicious.fakeprofile:PopularAttackClient",
    "fedrecattack": "clients.malicious.fedrecattack:FedRecAttackClient",
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


def detector_path(cfg) -> str:
    """server.detector_path with `{attack}` replaced by attack.name (one detector file per
    attack); a relative path is taken from the YAML's directory when the file is there, else
    from the working directory."""
    raw = cfg.server.detector_path
    if not raw:
        raise ConfigError("server.detector_path: required with the detector filter")
    spec = Path(str(raw).replace("{attack}", cfg.attack.name)).expanduser()
    if not spec.is_absolute() and cfg.base_dir and (Path(cfg.base_dir) / spec).exists():
        spec = Path(cfg.base_dir) / spec
    return str(spec)


def _derived(name: str, cfg):
    s = cfg.server
    if name == "cache_dir":
        from fedrec.data.prepare import cache_dir

        return cache_dir(cfg)
    if name == "server_optimizer":
        return {"optimizer": s.optimizer, "lr": s.lr, "betas": tuple(s.betas), "eps": s.eps}
    if name == "union_expected_attackers":  # < 0: as many as the rule assumes
        return s.union_expected_attackers if s.union_expected_attackers >= 0 else s.rule_f
    if name == "union_device":
        from fedrec.runtime import resolve_device

        return resolve_device(s.union_device, "server.union_device").type
    if name == "detector":
        return load_class("strategies.detector:load_detector")(detector_path(cfg))
    raise KeyError(f"no derived value {name!r}")


def _build(table: dict, name: str, key: str, cfg):
    if name not in table:
        raise ConfigError(f"{key}: {name!r} is not one of {', '.join(table)}")
    spec, sources = table[name]
    kwargs = {}
    for arg, source in sources.items():
        if source.startswith("@"):
            kwargs[arg] = _derived(source[1:], cfg)
        else:
            value = cfg
            for part in source.split("."):
                value = getattr(value, part)
            kwargs[arg] = value
    return load_class(spec)(**kwargs)


def make_rule(cfg, extra_steps=()):
    """The aggregation of `cfg`: its server.filters in order (then `extra_steps`, e.g. a
    feature recorder), then server.rule; the rule's needs checked against the round size."""
    rule = _build(RULES, cfg.server.rule, "server.rule", cfg)
    problem = rule.requirement(int(cfg.train.clients_per_round))
    if problem:
        raise ConfigError(f"server.rule {cfg.server.rule!r} with train.clients_per_round="
                          f"{cfg.train.clients_per_round}: {problem}")
    steps = [_build(FILTERS, name, "server.filters", cfg) for name in cfg.server.filter_steps()]
    steps += list(extra_steps)
    if not steps:
        return rule
    from strategies.rule import FilterChain

    return FilterChain(steps, rule)

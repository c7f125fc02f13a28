"""YAML names -> classes for aggregation rules (and, later, attacks and defenses).

Entries are "module:Class" strings imported on first use, so `fedrec/` never imports
`strategies/` or `clients/` at module load. Adding a rule = one file + one line here.
"""

from __future__ import annotations

import importlib

from fedrec.errors import ConfigError

RULES = {
    "mean": "strategies.mean:MeanRule",
}


def load_class(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def make_rule(cfg):
    name = getattr(cfg.server, "rule", "mean")
    if name not in RULES:
        raise ConfigError(f"server.rule: {name!r} is not one of {', '.join(RULES)}")
    return load_class(RULES[name])(cfg.server.aggregation)

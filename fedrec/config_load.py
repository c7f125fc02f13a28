"""Experiment YAML to configs: value coercion, overrides, merging, `grid:` expansion, loading.

The dataclasses and their validation are in fedrec.config_schema; fedrec.config re-exports
the public names of both.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import typing
from pathlib import Path
from typing import Any

import yaml

from fedrec.config_schema import AttackConfig, ExperimentConfig, type_hints, valid_keys
from fedrec.errors import ConfigError


def _coerce(key: str, value: Any, t) -> Any:
    origin = typing.get_origin(t)
    if t is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if t is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if t is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-5" as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if t is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if t is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_num(v) for v in value]
    if t is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _num(v):
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _build(cls, raw: dict, prefix: str = ""):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'experiment'}: expected a mapping, got {raw!r}")
    hints = type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - {"base_dir"}
    unknown = sorted(set(raw) - names)
    if unknown:
        valid = ", ".join(f"{prefix}{k}" for k in valid_keys(cls))
        raise ConfigError(f"unknown key {prefix + unknown[0]!r}; valid keys: {valid}")
    kwargs = {}
    for name, value in raw.items():
        t = hints[name]
        if dataclasses.is_dataclass(t):
            kwargs[name] = _build(t, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, t)
    return cls(**kwargs)


# ---------------------------------------------------------------------------- loading


def parse_overrides(pairs) -> dict:
    """`["train.rounds=10", "seed=3"]` -> nested dict; values are parsed as YAML."""
    out: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {pair!r}: {e.__class__.__name__}") from None
        _set_dotted(out, key.strip(), parsed)
    return out


def _set_dotted(d: dict, key: str, value):
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
    d[parts[-1]] = value


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such experiment file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


# top-level blocks read by other commands, not experiment keys: `privacy` (fedrec privacy run),
# `paper` (fedrec reproduce: the published numbers; validated here, see fedrec/paper.py)
OTHER_BLOCKS = ("privacy", "paper")


def is_config_key(key: str) -> bool:
    """A dotted experiment key, or a key inside a mapping-valued one (attack.params.variant)."""
    keys = valid_keys(ExperimentConfig)
    if key in keys:
        return True
    defaults = ExperimentConfig().to_dict()
    return any(key.startswith(f"{k}.") and isinstance(_dotted_get(defaults, k), dict)
               for k in keys)


def _dotted_get(d: dict, key: str):
    for part in key.split("."):
        d = d[part]
    return d


def _pop_other_blocks(raw: dict):
    if "paper" in raw:
        from fedrec.paper import parse_paper

        parse_paper(raw["paper"], is_config_key)
    for block in OTHER_BLOCKS:
        raw.pop(block, None)


def clean_attack(cfg: ExperimentConfig) -> ExperimentConfig:
    """A clean run (attack none, or no attackers) with its attack section at the defaults, so
    every clean combination of a grid is one run; the target stays (ER@K of the same item)."""
    if cfg.attack.name == "none" or cfg.attack.malicious_fraction == 0:
        cfg.attack = AttackConfig(target=cfg.attack.target)
    return cfg


def from_dict(raw: dict, base_dir: str = "") -> ExperimentConfig:
    raw = dict(raw)
    raw.pop("grid", None)
    _pop_other_blocks(raw)
    cfg = _build(ExperimentConfig, raw)
    cfg.base_dir = str(base_dir)
    return cfg.validate()


def expand(raw: dict, overrides: dict | None = None, base_dir: str = "") -> list[ExperimentConfig]:
    """A YAML dict (with an optional `grid:` block) -> one validated config per combination.

    `grid` maps dotted keys to lists of values; the runs are the cartesian product, in the
    order the keys are written.
    """
    raw = deep_merge(raw, overrides or {})
    _pop_other_blocks(raw)
    grid = raw.pop("grid", None) or {}
    if not isinstance(grid, dict):
        raise ConfigError("grid: expected a mapping of dotted keys to lists of values")
    keys = list(grid)
    for k in keys:
        if not isinstance(grid[k], list) or not grid[k]:
            raise ConfigError(f"grid.{k}: expected a non-empty list of values")
    # a key that is not a config key and whose values are mappings is a bundle: each value
    # sets several dotted keys at once (an optional `label` names it in the run directory)
    known = set(valid_keys(ExperimentConfig))
    bundles = {k for k in keys if k not in known and all(isinstance(v, dict) for v in grid[k])}
    for k in bundles:
        for v in grid[k]:
            bad = sorted(set(v) - known - {"label"})
            if bad:
                raise ConfigError(f"grid.{k}: {bad[0]!r} is not a config key")
    combos = list(itertools.product(*(grid[k] for k in keys))) if keys else [()]
    configs, seen = [], set()
    for combo in combos:
        run_raw = copy.deepcopy(raw)
        labels = []
        for k, v in zip(keys, combo):
            if k in bundles:  # a bundle: several keys set together, e.g. a whole defense
                for kk, vv in v.items():
                    if kk != "label":
                        _set_dotted(run_raw, kk, vv)
                labels.append(f"{k}={v.get('label') or ','.join(f'{a}={b}' for a, b in v.items())}")
            else:
                _set_dotted(run_raw, k, v)
                labels.append(f"{k.split('.')[-1]}={v}")
        cfg = from_dict(run_raw, base_dir)
        if cfg.attack.name == "none" or cfg.attack.malicious_fraction == 0:
            clean_attack(cfg)  # every clean combination of a grid is one run
            if keys and cfg.digest() in seen:
                continue
        seen.add(cfg.digest())
        if keys:
            label = ",".join(labels)
            # the digest keeps a finished run from being reused after a value outside the
            # grid changed (runs are skipped only when their whole config matches)
            cfg.output.name = f"{cfg.output.name or cfg.name}[{label}]-{cfg.digest()[:6]}"
        configs.append(cfg)
    return configs


def load(path, overrides=None) -> list[ExperimentConfig]:
    """Load an experiment YAML (list of configs: one unless it has a `grid:`)."""
    path = Path(path)
    return expand(read_yaml(path), parse_overrides(overrides), base_dir=str(path.resolve().parent))


def load_one(path, overrides=None) -> ExperimentConfig:
    cfgs = load(path, overrides)
    if len(cfgs) != 1:
        raise ConfigError(f"{path}: has a grid of {len(cfgs)} runs; expected a single run here")
    return cfgs[0]

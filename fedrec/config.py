"""Experiment configuration: dataclasses, YAML loading, validation, overrides, grids.

One YAML drives every way of running (`fedrec run`, `flwr run .`). Every key is declared in
fedrec/config_schema.py (the dataclasses and their validation); an unknown key is rejected with
the list of valid ones, and a bad value gets a one-line `ConfigError`. Reading YAML, overrides
and `grid:` expansion are in fedrec/config_load.py. This module is the one the rest of the
package imports from.
"""

from __future__ import annotations

from fedrec.config_load import (OTHER_BLOCKS, clean_attack, deep_merge, expand, from_dict,
                                is_config_key, load, load_one, parse_overrides, read_yaml)
from fedrec.config_schema import (AttackConfig, DataConfig, EvalConfig, ExperimentConfig,
                                  FlowerConfig, ModelConfig, OutputConfig, RayConfig,
                                  ServerConfig, SyntheticConfig, TrainConfig, valid_keys)
from fedrec.errors import ConfigError

__all__ = [
    "AttackConfig", "DataConfig", "EvalConfig", "ExperimentConfig", "FlowerConfig",
    "ModelConfig", "OutputConfig", "RayConfig", "ServerConfig", "SyntheticConfig",
    "TrainConfig", "ConfigError", "OTHER_BLOCKS", "clean_attack", "deep_merge", "expand",
    "from_dict", "is_config_key", "load", "load_one", "parse_overrides", "read_yaml",
    "valid_keys",
]

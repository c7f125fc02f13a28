"""YAML model names -> classes, each imported when first asked for.

A model's module is imported on first use, not with the registry: MF's client path is numpy
only, and a SuperNode's ClientApp (a fresh process per message in a deployment) would
otherwise import torch for every message through NCF's and the sequential models' modules
(~1.5-3.5 s of CPU each time).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

# name -> (module, class)
_MODEL_PATHS = {
    "mf": ("fedrec.models.mf", "MF"),
    "ncf": ("fedrec.models.ncf", "NCF"),
    "sasrec": ("fedrec.models.sasrec", "SASRec"),
    "bert4rec": ("fedrec.models.bert4rec", "BERT4Rec"),
}


class LazyModels(Mapping):
    """A read-only {name: class} mapping that imports a class's module when it is looked up."""

    def __init__(self, paths: dict):
        self._paths = dict(paths)

    def __getitem__(self, name):
        module, cls = self._paths[name]
        return getattr(importlib.import_module(module), cls)

    def __iter__(self):
        return iter(self._paths)

    def __len__(self):
        return len(self._paths)

    def __contains__(self, name):
        return name in self._paths


MODELS = LazyModels(_MODEL_PATHS)


def make_model(cfg, n_items: int):
    """Build the model named by an experiment's `model:` section."""
    from fedrec.errors import ConfigError

    if cfg.name not in MODELS:
        raise ConfigError(f"model.name: {cfg.name!r} is not one of {', '.join(MODELS)}")
    return MODELS[cfg.name](n_items=n_items, dim=cfg.dim, dropout=cfg.dropout,
                            mlp_layers=cfg.mlp_layers, ncf_form=cfg.ncf_form, max_len=cfg.max_len, blocks=cfg.blocks,
                            heads=cfg.heads, loss=cfg.loss, softmax_samples=cfg.softmax_samples,
                            mask_prob=cfg.mask_prob, mask_last_prob=cfg.mask_last_prob,
                            device=cfg.device)

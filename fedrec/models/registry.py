"""YAML model names -> classes."""

from fedrec.models.mf import MF
from fedrec.models.ncf import NCF

MODELS = {"mf": MF, "ncf": NCF}


def make_model(cfg, n_items: int):
    """Build the model named by an experiment's `model:` section."""
    from fedrec.errors import ConfigError

    if cfg.name not in MODELS:
        raise ConfigError(f"model.name: {cfg.name!r} is not one of {', '.join(MODELS)}")
    return MODELS[cfg.name](n_items=n_items, dim=cfg.dim, dropout=cfg.dropout,
                            mlp_layers=cfg.mlp_layers)

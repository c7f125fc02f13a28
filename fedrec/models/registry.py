"""YAML model names -> classes."""

from fedrec.models.bert4rec import BERT4Rec
from fedrec.models.mf import MF
from fedrec.models.ncf import NCF
from fedrec.models.sasrec import SASRec

MODELS = {"mf": MF, "ncf": NCF, "sasrec": SASRec, "bert4rec": BERT4Rec}


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

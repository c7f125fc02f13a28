"""Recommender models with an explicit item / predictor / user parameter split."""

from fedrec.models.base import ClientGrad, RecModel
from fedrec.models.registry import MODELS, make_model

__all__ = ["ClientGrad", "RecModel", "MODELS", "make_model"]

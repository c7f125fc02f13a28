"""fedrec: security of federated recommender systems on Flower."""

__version__ = "0.1.0"

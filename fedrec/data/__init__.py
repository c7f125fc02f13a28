"""Datasets: published formats, the synthetic generator, preprocessing."""

from fedrec.data.types import Interactions

__all__ = ["Interactions"]

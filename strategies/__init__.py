"""Flower Strategy classes: the FedRec strategy, robust aggregation rules, UNION."""

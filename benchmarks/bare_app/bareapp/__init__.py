"""A Flower app that does no work (see benchmarks/flwr_overhead.py)."""

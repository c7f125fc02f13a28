"""Broadcasts an (n-items, dim) float32 table to `clients-per-round` sampled SuperNodes per
round and decodes their replies; nothing else. Writes per-round wall times to `output`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.common import Context, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import Server, ServerApp, ServerAppComponents, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import Strategy


class BareStrategy(Strategy):
    def __init__(self, table, k, min_nodes, seed, rounds, output):
        super().__init__()
        self.table, self.k, self.min_nodes, self.rounds = table, k, min_nodes, rounds
        self.rng = np.random.default_rng(seed)
        self.output = output
        self.fit_start: dict = {}
        self.fit_end: dict = {}
        self.rows_received = 0

    def initialize_parameters(self, client_manager):
        return ndarrays_to_parameters([self.table])

    def configure_fit(self, server_round, parameters, client_manager):
        self.fit_start[server_round] = time.perf_counter()
        if self.min_nodes:
            client_manager.wait_for(self.min_nodes, timeout=3600)
        proxies = client_manager.all()
        cids = sorted(proxies)
        idx = np.sort(self.rng.choice(len(cids), size=min(self.k, len(cids)), replace=False))
        ins = FitIns(ndarrays_to_parameters([self.table]), {"round": server_round})
        return [(proxies[cids[i]], ins) for i in idx]

    def aggregate_fit(self, server_round, results, failures):
        for _, res in results:
            self.rows_received += len(parameters_to_ndarrays(res.parameters)[0])
        self.fit_end[server_round] = time.perf_counter()
        if server_round == self.rounds:
            self._write(len(results), len(failures))
        return None, {"results": len(results), "failures": len(failures)}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None

    def _write(self, results, failures):
        r = self.rounds
        spr = ((self.fit_end[r] - self.fit_start[2]) / (r - 1)) if r >= 2 else None
        out = {"rounds": r, "clients_per_round": self.k, "min_nodes": self.min_nodes,
               "seconds_per_round_after_first": spr,
               "round_time_s": [self.fit_end[i] - self.fit_start[i] for i in range(1, r + 1)],
               "rows_received": self.rows_received, "last_round_results": results,
               "last_round_failures": failures}
        if self.output:
            Path(self.output).write_text(json.dumps(out, indent=1))


def server_fn(context: Context) -> ServerAppComponents:
    rc = context.run_config
    rounds = int(rc["num-server-rounds"])
    table = np.random.default_rng(1).standard_normal((int(rc["n-items"]), int(rc["dim"])))
    strategy = BareStrategy(table.astype(np.float32), int(rc["clients-per-round"]),
                            int(rc["min-nodes"]), int(rc["seed"]), rounds, str(rc["output"]))
    server = Server(client_manager=SimpleClientManager(), strategy=strategy)
    if int(rc["max-workers"]) > 0:
        server.set_max_workers(int(rc["max-workers"]))
    return ServerAppComponents(server=server, config=ServerConfig(num_rounds=rounds))


app = ServerApp(server_fn=server_fn)

"""server.filters: pre-aggregation steps chained before server.rule, built by the registry.

Hand-computed rounds through public APIs: clipping changes Krum's pick, the drops of each step
are reported under its own name and mapped back to the round's positions, the old
`server.filter` key still works, and every experiment YAML still validates and builds."""

from pathlib import Path

import numpy as np
import pytest

from fedrec import config
from fedrec.config import from_dict
from fedrec.errors import ConfigError
from fedrec.protocol import Upload
from fedrec.registry import make_rule
from strategies.clip import ClipFilter
from strategies.krum import KrumRule
from strategies.mean import MeanRule
from strategies.median import MedianRule
from strategies.rule import AggregationRule, FilterChain, PreAggregationStep, RoundUpdates, drop_uploads
from strategies.union import UnionFilter

ROOT = Path(__file__).resolve().parents[1]


def _one_item_round(values):
    """Client c sends item 0 with the 1-d row [values[c]]."""
    ups = [Upload(np.array([0]), np.array([[v]], np.float32), [], 1, str(c))
           for c, v in enumerate(values)]
    return RoundUpdates(ups, np.ones(len(ups)), 1, 1)


def _cfg(**server):
    return from_dict({"server": server, "train": {"clients_per_round": 4}})


class DropPositions(PreAggregationStep):
    """A step that drops fixed positions of the round it sees (a planted outlier)."""

    def __init__(self, positions, name):
        self.positions, self.name = positions, name

    def __call__(self, updates):
        return drop_uploads(updates, self.positions, {})


def test_clip_then_krum_differs_from_krum_by_hand():
    # clipped to 2: rows 0, 1, 2, 2; Krum (f = 0, 2 neighbours) scores 5, 2, 1, 1 -> client 2.
    # unclipped: 0, 1, 3, 100 score 10, 5, 13, ~1e4 -> client 1
    updates = _one_item_round([0.0, 1.0, 3.0, 100.0])
    chain = make_rule(_cfg(filters=["clip"], rule="krum", rule_f=0, norm_bound=2, aggregation="item"))
    assert isinstance(chain, FilterChain) and isinstance(chain.steps[0], ClipFilter)
    assert isinstance(chain.rule, KrumRule)
    agg = chain(updates)
    assert agg.item_grad[0, 0] == 2.0
    assert agg.dropped == [0, 1, 3]
    assert agg.dropped_by == {}  # clipping drops nobody: not a detection stage
    assert agg.info["clip_clipped"] == 2
    plain = make_rule(_cfg(rule="krum", rule_f=0, aggregation="item"))(updates)
    assert plain.item_grad[0, 0] == 1.0


def test_norm_bound_rule_is_clip_then_mean():
    updates = _one_item_round([0.5, -4.0, 3.0, 1.0])
    for granularity in ("dense", "item"):
        rule = make_rule(_cfg(rule="norm_bound", norm_bound=2, aggregation=granularity))
        chain = make_rule(_cfg(filters=["clip"], rule="mean", norm_bound=2, aggregation=granularity))
        want = (0.5 - 2.0 + 2.0 + 1.0) / 4
        np.testing.assert_allclose(rule(updates).item_grad[0, 0], want, rtol=1e-6)
        np.testing.assert_allclose(chain(updates).item_grad[0, 0], want, rtol=1e-6)


def test_each_step_reports_its_own_drops_in_round_positions():
    # the first step drops the planted outlier (position 3); the second then drops its own
    # position 1, which is position 1 of the round; the median sees 10 and 12
    updates = _one_item_round([10.0, 11.0, 12.0, 1e6])
    agg = FilterChain([DropPositions([3], "outer"), DropPositions([1], "inner")], MedianRule("item"))(updates)
    assert agg.item_grad[0, 0] == 11.0
    assert agg.dropped == [1, 3]
    assert agg.dropped_by == {"outer": [3], "inner": [1]}
    assert agg.info["dropped"] == 2 and agg.info["inner_dropped"] == 0


def test_later_drops_map_back_past_an_earlier_drop():
    updates = _one_item_round([1e6, 10.0, 11.0, 12.0])
    agg = FilterChain([DropPositions([0], "outer"), DropPositions([1], "inner")], MeanRule("item"))(updates)
    # the second step's position 1 is the round's position 2
    assert agg.dropped_by == {"outer": [0], "inner": [2]}
    assert agg.item_grad[0, 0] == np.float32((10.0 + 12.0) / 2)


def test_everything_dropped_is_a_zero_update_with_everyone_reported():
    updates = _one_item_round([1.0, 2.0, 3.0])
    agg = FilterChain([DropPositions([0, 1, 2], "all")], MeanRule("item"))(updates)
    assert agg.dropped == [0, 1, 2] and not agg.item_grad.any()


def test_registry_builds_the_chain_in_order():
    rule = make_rule(_cfg(filters=["union", "clip"], rule="median", rule_f=1))
    assert isinstance(rule, FilterChain)
    assert [type(s) for s in rule.steps] == [UnionFilter, ClipFilter]
    assert isinstance(rule.rule, MedianRule) and rule.steps[1].bound == 0.1


def test_old_filter_key_and_misconfigurations():
    assert _cfg(filter="union").server.filter_steps() == ["union"]
    assert [type(s) for s in make_rule(_cfg(filter="union")).steps] == [UnionFilter]
    assert _cfg().server.filter_steps() == []
    with pytest.raises(ConfigError, match="server.filter and server.filters"):
        _cfg(filter="union", filters=["clip"])
    with pytest.raises(ConfigError, match="server.filters"):
        make_rule(_cfg(filters=["krum"]))
    with pytest.raises(ConfigError, match="server.detector_path"):
        _cfg(filters=["clip", "detector"])


def test_every_experiment_yaml_validates_and_builds_its_rules():
    yamls = sorted((ROOT / "experiments").glob("*.yaml"))
    assert yamls
    for path in yamls:
        for cfg in config.load(path):
            if "detector" not in cfg.server.filter_steps():  # needs a trained detector file
                assert isinstance(make_rule(cfg), AggregationRule), path.name


def test_strategies_never_import_ground_truth_at_run_time():
    """No defense is an import away from who is malicious (a fresh interpreter)."""
    import subprocess
    import sys

    modules = sorted(p.stem for p in (ROOT / "strategies").glob("*.py") if p.stem != "__init__")
    code = ("import sys\n" + "".join(f"import strategies.{m}\n" for m in modules)
            + "print(sorted(m for m in sys.modules if m.startswith(('fedrec.build', 'fedrec.roles', "
              "'fedrec.adversary', 'fedrec.evaluation', 'fedrec.registry', 'clients'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.strip() == "[]"

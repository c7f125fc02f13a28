"""Experiment config: defaults, unknown keys, bad values, overrides, grids, YAML errors, digest."""

import pytest

from fedrec.config import (ExperimentConfig, expand, from_dict, load, load_one, parse_overrides,
                           valid_keys)
from fedrec.errors import ConfigError


def _err(raw) -> str:
    with pytest.raises(ConfigError) as e:
        from_dict(raw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_load():
    cfg = from_dict({})
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.seed == 0 and cfg.name == "experiment"
    assert cfg.model.name == "mf" and cfg.model.dim == 64 and cfg.model.dropout == 0.2
    assert cfg.train.batch_size == 512 and cfg.train.weight_decay == 1e-5
    assert cfg.train.weight_decay_scope == "touched" and cfg.train.local_epochs == 0
    assert cfg.server.optimizer == "adam" and cfg.server.lr == 0.002
    assert cfg.server.betas == [0.9, 0.999] and cfg.server.eps == 1e-8
    assert cfg.server.aggregation == "dense" and cfg.server.rule == "mean"
    assert cfg.data.attacker_pool == 0.05 and cfg.data.negatives == "static"
    assert cfg.data.neg_ratio == 1 and cfg.eval.ks == [5, 10, 20]
    # a nested section given as null keeps its defaults
    assert from_dict({"train": None}).train.rounds == 100


def test_unknown_top_level_key_lists_valid_keys():
    msg = _err({"seeed": 1})
    assert "'seeed'" in msg
    for k in ("seed", "name", "train.rounds", "server.lr", "data.synthetic.n_users"):
        assert k in msg


def test_unknown_nested_key_names_dotted_key_and_lists_section():
    msg = _err({"train": {"roundz": 3}})
    assert "'train.roundz'" in msg
    assert "train.rounds" in msg and "train.clients_per_round" in msg
    msg = _err({"data": {"synthetic": {"n_userz": 3}}})
    assert "'data.synthetic.n_userz'" in msg and "data.synthetic.n_users" in msg


def test_valid_keys_are_dotted():
    keys = valid_keys(ExperimentConfig)
    assert "train.rounds" in keys and "data.synthetic.seed" in keys and "seed" in keys
    assert "base_dir" not in keys and "train" not in keys


@pytest.mark.parametrize("raw, key", [
    ({"train": {"rounds": "ten"}}, "train.rounds"),  # wrong type
    ({"train": {"rounds": 1.5}}, "train.rounds"),  # not an integer
    ({"train": {"rounds": True}}, "train.rounds"),  # bool is not an int
    ({"train": {"rounds": 0}}, "train.rounds"),  # out of range
    ({"model": {"dropout": 1.5}}, "model.dropout"),
    ({"model": {"dropout": "x"}}, "model.dropout"),
    ({"server": {"lr": -0.1}}, "server.lr"),
    ({"server": {"optimizer": "adagrad"}}, "server.optimizer"),  # bad choice
    ({"server": {"aggregation": "sparse"}}, "server.aggregation"),
    ({"server": {"betas": [0.9]}}, "server.betas"),
    ({"server": {"betas": [0.9, 1.0]}}, "server.betas"),
    ({"train": {"sampling": "random"}}, "train.sampling"),
    ({"train": {"weight_decay_scope": "some"}}, "train.weight_decay_scope"),
    ({"data": {"split": "loo"}}, "data.split"),
    ({"data": {"negatives": "dynamic"}}, "data.negatives"),
    ({"data": {"attacker_pool": 0.95}}, "data.attacker_pool"),
    ({"eval": {"ks": []}}, "eval.ks"),
    ({"eval": {"ks": [5, -1]}}, "eval.ks"),
    ({"eval": {"ks": 5}}, "eval.ks"),
    ({"model": {"mlp_layers": [64, 0]}}, "model.mlp_layers"),
    ({"output": {"progress": "yes"}}, "output.progress"),
    ({"train": 5}, "train"),
])
def test_bad_values_raise_one_line_config_error(raw, key):
    msg = _err(raw)
    assert msg.startswith(key)


def test_bad_choice_message_lists_choices():
    msg = _err({"server": {"optimizer": "adagrad"}})
    assert "'adagrad'" in msg and "adam" in msg and "sgd" in msg


def test_string_floats_accepted():
    # YAML 1.1 reads 1e-5 as a string
    cfg = from_dict({"train": {"weight_decay": "1e-5"}, "server": {"lr": 1}})
    assert cfg.train.weight_decay == 1e-5 and isinstance(cfg.server.lr, float)


def test_parse_overrides_dotted_and_yaml_typed():
    over = parse_overrides(["train.rounds=10", "seed=3", "server.lr=0.5", "model.name=ncf",
                            "eval.ks=[1, 2]", "output.progress=false", "data.synthetic.n_users=7",
                            "name=a=b"])
    assert over == {"train": {"rounds": 10}, "seed": 3, "server": {"lr": 0.5},
                    "model": {"name": "ncf"}, "eval": {"ks": [1, 2]}, "output": {"progress": False},
                    "data": {"synthetic": {"n_users": 7}}, "name": "a=b"}
    cfg = expand({"train": {"rounds": 5, "batch_size": 8}}, over)[0]
    assert cfg.train.rounds == 10 and cfg.train.batch_size == 8  # merged, not replaced
    assert cfg.seed == 3 and cfg.server.lr == 0.5 and cfg.eval.ks == [1, 2]
    assert cfg.data.synthetic.n_users == 7 and cfg.output.progress is False


def test_parse_overrides_errors():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.rounds"])
    with pytest.raises(ConfigError, match="not a section"):
        parse_overrides(["seed=1", "seed.x=2"])
    with pytest.raises(ConfigError, match="train.roundz"):
        expand({}, parse_overrides(["train.roundz=3"]))


def test_grid_expansion():
    raw = {"name": "g", "grid": {"seed": [0, 1, 2], "server.lr": [0.1, 0.2]}}
    cfgs = expand(raw)
    assert len(cfgs) == 6
    assert [(c.seed, c.server.lr) for c in cfgs] == [
        (0, 0.1), (0, 0.2), (1, 0.1), (1, 0.2), (2, 0.1), (2, 0.2)]
    names = [c.output.name for c in cfgs]
    assert len(set(names)) == 6 and names[1].startswith("g[seed=0,lr=0.2]-")
    assert len({c.digest() for c in cfgs}) == 6
    # no grid: one run, name left to the run directory (name + digest)
    assert len(expand({"seed": 4})) == 1 and expand({})[0].output.name == ""


def test_grid_with_explicit_output_name_keeps_runs_apart():
    cfgs = expand({"output": {"name": "mine"}, "grid": {"seed": [0, 1]}})
    names = [c.output.name for c in cfgs]
    assert names[0].startswith("mine[seed=0]-") and names[1].startswith("mine[seed=1]-")


def test_grid_names_change_when_a_value_outside_the_grid_changes():
    # otherwise a rerun after editing the YAML would skip runs with stale results
    a = expand({"name": "g", "train": {"rounds": 5}, "grid": {"seed": [0]}})[0].output.name
    b = expand({"name": "g", "train": {"rounds": 6}, "grid": {"seed": [0]}})[0].output.name
    assert a != b and a.startswith("g[seed=0]-")


def test_grid_errors():
    with pytest.raises(ConfigError, match="grid.seed"):
        expand({"grid": {"seed": []}})
    with pytest.raises(ConfigError, match="grid"):
        expand({"grid": [1, 2]})
    with pytest.raises(ConfigError, match="train.rounds"):
        expand({"grid": {"train.rounds": [1, -1]}})


def test_load_yaml_file_with_grid_and_overrides(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("name: x\ntrain:\n  rounds: 4\ngrid:\n  seed: [1, 2]\n")
    cfgs = load(p, ["train.rounds=9"])
    assert [c.seed for c in cfgs] == [1, 2] and all(c.train.rounds == 9 for c in cfgs)
    assert cfgs[0].base_dir == str(tmp_path.resolve())
    with pytest.raises(ConfigError, match="grid of 2 runs"):
        load_one(p)
    assert load_one(p, ["grid.seed=[5]"]).seed == 5  # an override can narrow the grid


def test_invalid_yaml_gives_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ntrain:\n  rounds: 4\n  batch_size: [1, 2\nseed: 3\n")
    with pytest.raises(ConfigError) as e:
        load(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:") and "invalid YAML" in msg
    line = int(msg[len(str(p)) + 1:].split(":")[0])
    assert line in (4, 5)  # the unclosed list (line 4) is detected on line 5
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load(p)
    with pytest.raises(ConfigError, match="no such"):
        load(tmp_path / "missing.yaml")


def test_digest_stable_and_sensitive():
    a, b = from_dict({"seed": 1}), from_dict({"seed": 1})
    assert a.digest() == b.digest() and len(a.digest()) == 10
    assert from_dict({"seed": 2}).digest() != a.digest()
    assert from_dict({"seed": 1, "server": {"lr": 0.003}}).digest() != a.digest()
    # output settings do not change what is computed
    assert from_dict({"seed": 1, "output": {"dir": "elsewhere", "progress": False}}).digest() == a.digest()
    # a key added later at its default keeps the digests (and run directories) of older runs
    assert from_dict({"seed": 1, "eval": {"from_round": 0}}).digest() == a.digest()
    assert from_dict({"seed": 1, "eval": {"from_round": 5}}).digest() != a.digest()


def test_grid_keeps_one_clean_run_per_setting():
    from fedrec.config import expand

    raw = {"attack": {"name": "lie"},
           "grid": {"attack.malicious_fraction": [0.0, 0.01, 0.05],
                    "attack.name": ["none", "lie", "fang"]}}
    cfgs = expand(raw)
    clean = [c for c in cfgs if c.attack.name == "none"]
    assert len(clean) == 1  # (0, *), (*, none) are all the same clean run
    assert len(cfgs) == 1 + 2 * 2
    assert len({c.digest() for c in cfgs}) == len(cfgs)


# users per shipped data set (REFERENCE.md; the loaders' counts)
N_USERS = {"ml-100k": 943, "ml-1m": 6040, "gowalla": 29858, "beauty": 22363}


def test_no_committed_experiment_samples_more_clients_than_users():
    """The strategy refuses clients_per_round above the users (an error, not a silent clamp):
    a committed YAML asking for "every user" must say how many there are."""
    from pathlib import Path

    import yaml as _yaml

    from fedrec.config import expand

    root = Path(__file__).resolve().parent.parent / "experiments"
    checked = 0
    for p in sorted(root.rglob("*.yaml")):
        raw = _yaml.safe_load(p.read_text())
        for cfg in expand(raw, base_dir=str(p.parent)):
            n = N_USERS.get(cfg.data.dataset)
            if n is not None:
                assert cfg.train.clients_per_round <= n, f"{p.name}: {cfg.train.clients_per_round} > {n}"
                checked += 1
    assert checked > 100


def test_as_dict_is_dataclasses_asdict_on_every_committed_experiment():
    """ExperimentConfig.to_dict (and so every run's digest and directory name) goes through
    config_schema.as_dict, a faster asdict: the same dict, key order and types included."""
    import dataclasses
    from pathlib import Path

    from fedrec.config_load import load
    from fedrec.config_schema import as_dict

    root = Path(__file__).resolve().parent.parent / "experiments"
    checked = 0
    for path in sorted(root.rglob("*.yaml")):
        for cfg in load(path)[:4]:
            expected = dataclasses.asdict(cfg)
            assert repr(as_dict(cfg)) == repr(expected), path  # order and types too
            checked += 1
    assert checked > 80

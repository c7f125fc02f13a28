"""`fedrec reproduce`: paper tables from run directories, their states, the `paper:` block."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from fedrec.cli import main
from fedrec.config import expand
from fedrec.errors import ConfigError
from fedrec.reproduce import PAPER_DIR, load_table, report_table, table_names

ROOT = Path(__file__).resolve().parent.parent

GRID = """name: tiny
data:
  dataset: synthetic
  synthetic: {{n_users: 60, n_items: 80, mean_history: 12}}
  attacker_pool: 0.5
  cache_dir: {root}/cache
model: {{dim: 8}}
train: {{rounds: 6, clients_per_round: 10}}
server: {{lr: 0.05}}
eval: {{every: 2}}
attack: {{malicious_fraction: 0.3}}
output: {{dir: {root}/runs, progress: false}}
grid:
  seed: {seeds}
  attack.name: [none, gaussian, labelflip]
"""

PAPER = """paper:
  source: "a tiny table"
  metric: test_hr@5
  compare: relative_drop
  baseline: {attack.name: none}
  tolerance: 1000
  order: [[Gaussian, LabelFlip]]
  cells:
    - {label: clean, select: {attack.name: none}, compare: value, published: 1.0, tolerance: 0.01}
    - {label: Gaussian, select: {attack.name: gaussian}, published: {value: 0.02, clean: 0.03}}
    - {label: LabelFlip, select: {attack.name: labelflip}, published: -0.3, at_most: 1000}
"""

ALL_PASS = """paper:
  source: "every check holds"
  compare: value
  cells:
    - {label: clean, select: {attack.name: none}, published: 0.5, tolerance: 0.5}
    - {label: Gaussian, select: {attack.name: gaussian}, at_least: 0}
"""


def write_table(folder: Path, name: str, root: Path, seeds="[0, 1]", paper=PAPER) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"{name}.yaml"
    p.write_text(GRID.format(root=root, seeds=seeds) + paper)
    return p


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """The tiny table reproduced once end to end (6 runs), then a second time."""
    root = tmp_path_factory.mktemp("repro")
    tables = root / "tables"
    write_table(tables, "tiny", root)
    assert main(["reproduce", "tiny", "--tables", str(tables), "--no-progress"]) == 0
    mtimes = {p: p.stat().st_mtime_ns for p in (root / "runs").glob("*/summary.json")}
    assert main(["reproduce", "tiny", "--tables", str(tables), "--no-progress"]) == 0
    return root, tables, mtimes


def finals(root: Path) -> dict:
    """(attack, seed) -> final test_hr@5, read straight from the summaries."""
    out = {}
    for d in (root / "runs").iterdir():
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        s = json.loads((d / "summary.json").read_text())
        assert s["status"] == "complete"
        out[(cfg["attack"]["name"], cfg["seed"])] = s["final"]["test_hr@5"]
    return out


def pop_mean_std(xs):
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def test_second_reproduce_skips_the_finished_runs(ran):
    root, _, mtimes = ran
    assert len(mtimes) == 6
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_table_is_the_hand_computed_mean_std_drop_and_marks(ran):
    root, tables, _ = ran
    hr = finals(root)
    rep = report_table(load_table(tables / "tiny.yaml"))
    by = {r.label: r for r in rep.results}
    m, sd = pop_mean_std([hr[("none", 0)], hr[("none", 1)]])
    assert (by["clean"].mean, by["clean"].std, by["clean"].n) == (pytest.approx(m), pytest.approx(sd), 2)
    assert by["clean"].passed is False  # |ours - 1.0| > 0.01
    for label, attack in (("Gaussian", "gaussian"), ("LabelFlip", "labelflip")):
        drops = [100 * (hr[("none", s)] - hr[(attack, s)]) / hr[("none", s)] for s in (0, 1)]
        m, sd = pop_mean_std(drops)
        assert by[label].mean == pytest.approx(m) and by[label].std == pytest.approx(sd)
        assert by[label].passed is True
    assert any(hr[("none", s)] != hr[("gaussian", s)] for s in (0, 1))  # a drop that is not 0
    assert by["Gaussian"].published == pytest.approx(100 * (0.03 - 0.02) / 0.03)
    (text, holds), = rep.orders
    assert holds == (by["Gaussian"].mean > by["LabelFlip"].mean)
    assert set(by["Gaussian"].by_seed) == {0, 1}  # keyed by the runs' own seeds
    diffs = [by["Gaussian"].by_seed[s] - by["LabelFlip"].by_seed[s] for s in (0, 1)]
    assert f"Gaussian − LabelFlip {sum(diffs) / 2:+.1f} ±" in text and "(n = 2" in text
    assert rep.state == f"done ({2 + holds} of 4 checks pass)"
    walls = [json.loads(p.read_text())["wall_time_s"] for p in (root / "runs").glob("*/summary.json")]
    assert rep.wall_total == pytest.approx(sum(walls))


def late_hr(run_dir: Path) -> float:
    """Mean test_hr@5 of the evaluations after half the run's rounds, by hand from metrics.csv."""
    import csv

    rounds = json.loads((run_dir / "summary.json").read_text())["rounds"]
    with open(run_dir / "metrics.csv", newline="") as f:
        ys = [float(r["test_hr@5"]) for r in csv.DictReader(f)
              if r.get("test_hr@5") not in (None, "") and int(r["round"]) > rounds / 2]
    return sum(ys) / len(ys)


def test_late_readout_is_the_mean_of_the_second_halfs_evaluations(ran, capsys):
    root, tables, _ = ran
    late = {}
    for d in (root / "runs").iterdir():
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        late[(cfg["attack"]["name"], cfg["seed"])] = late_hr(d)
    hr = finals(root)
    assert late != hr  # two evaluations (rounds 4 and 6) in the mean, not the final alone
    rep = report_table(load_table(tables / "tiny.yaml"), "late")
    by = {r.label: r for r in rep.results}
    m, sd = pop_mean_std([late[("none", 0)], late[("none", 1)]])
    assert (by["clean"].mean, by["clean"].std) == (pytest.approx(m), pytest.approx(sd))
    drops = [100 * (late[("none", s)] - late[("gaussian", s)]) / late[("none", s)] for s in (0, 1)]
    assert by["Gaussian"].mean == pytest.approx(pop_mean_std(drops)[0])
    assert main(["reproduce", "tiny", "--table-only", "--readout", "late",
                 "--tables", str(tables)]) == 0
    out = capsys.readouterr().out
    assert "readout: each run's metric is the mean of its evaluations after half" in out
    assert main(["reproduce", "tiny", "--table-only", "--tables", str(tables)]) == 0
    assert "readout:" not in capsys.readouterr().out  # the paper's readout says nothing
    assert main(["reproduce", "--list", "--readout", "late", "--tables", str(tables)]) != 0
    assert "--readout: applies to a named table" in capsys.readouterr().err


def test_printed_table_has_ours_beside_the_paper(ran, capsys):
    _, tables, _ = ran
    assert main(["reproduce", "tiny", "--table-only", "--tables", str(tables)]) == 0
    out = capsys.readouterr().out
    assert "| Gaussian | HR@5 drop |" in out and "33.33%" in out and "✗ ±0.01" in out
    assert "order Gaussian" in out and "2/2" in out


def test_list_states(ran, capsys):
    root, tables, _ = ran
    other = root / "states"
    write_table(other, "a-not-run", root, seeds="[5]")
    write_table(other, "b-partial", root, seeds="[0, 1, 2]")
    write_table(other, "c-done", root)
    write_table(other, "d-passing", root, paper=ALL_PASS)
    write_table(other, "e-unsupported", root,
                paper=ALL_PASS.replace("compare: value", "compare: value\n  unsupported: no data"))
    assert main(["reproduce", "--list", "--tables", str(other)]) == 0
    lines = capsys.readouterr().out.splitlines()
    states = {line.split()[0]: line.split("runs", 1)[1].strip() for line in lines}
    assert states["a-not-run"] == "not run"
    # the 3 runs left at the complete runs' pace (a fraction of a second each here)
    assert states["b-partial"] == "partial (6 of 9 runs; ~1 run-minutes left)"
    assert states["c-done"].startswith("done (")
    assert states["d-passing"] == "passing (2 of 2 checks)"
    assert states["e-unsupported"] == "unsupported: no data"
    assert main(["reproduce", "e-unsupported", "--tables", str(other)]) == 2
    # a run begun but not complete (running, or stopped: resumable) is counted apart; the
    # started directories share the module's runs/ with the other tests: removed after
    started = []
    try:
        for name in ("a-not-run", "b-partial"):
            table = load_table(other / f"{name}.yaml", archive=None)
            started.append(Path(next(d for d in table.dirs
                                     if not (Path(d) / "summary.json").exists())))
            started[-1].mkdir()
        assert main(["reproduce", "--list", "--tables", str(other)]) == 0
        lines = capsys.readouterr().out.splitlines()
        states = {line.split()[0]: line.split("runs", 1)[1].strip() for line in lines}
        assert states["a-not-run"] == "not run (1 started)"
        assert states["b-partial"] == "partial (6 of 9 runs, 1 started; ~1 run-minutes left)"
    finally:
        for d in started:
            d.rmdir()


def test_write_docs_has_the_tables_and_plots(ran, tmp_path):
    _, tables, _ = ran
    out = tmp_path / "docs" / "reproduction.md"
    assert main(["reproduce", "--write-docs", str(out), "--tables", str(tables)]) == 0
    text = out.read_text()
    assert "## tiny" in text and "| Gaussian | HR@5 drop |" in text and "tiny     " in text
    assert (tmp_path / "docs" / "reproduction" / "tiny-test_hr5.png").stat().st_size > 1000
    assert "](reproduction/tiny-test_hr5.png)" in text


def test_unknown_table_lists_the_valid_ones(ran, capsys):
    _, tables, _ = ran
    assert main(["reproduce", "nope", "--tables", str(tables)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown table 'nope'; valid: tiny" in err


def test_a_cell_must_select_one_setting(tmp_path):
    p = write_table(tmp_path, "t", tmp_path, paper=PAPER.replace(
        "select: {attack.name: gaussian}", "select: {seed: 0}"))
    with pytest.raises(ConfigError, match=r"cells\[1\] \(Gaussian\) selects 3 settings"):
        load_table(p)


def test_a_reference_run_must_be_in_the_grid(tmp_path):
    p = write_table(tmp_path, "t", tmp_path, paper=PAPER.replace(
        "baseline: {attack.name: none}", "baseline: {attack.name: none, server.lr: 0.5}"))
    with pytest.raises(ConfigError, match=r"reference run .* is not in the grid"):
        load_table(p)


BASE = {"source": "s", "cells": [{"label": "a", "select": {"attack.name": "none"}}]}


@pytest.mark.parametrize("change, message", [
    ({"source": ""}, "paper.source: expected a non-empty string"),
    ({"sourse": "x"}, "unknown key 'paper.sourse'"),
    ({"compare": "ratio"}, "paper.compare: 'ratio' is not one of relative_drop, value"),
    ({"compare": "relative_drop"}, r"paper.cells\[0\].baseline: relative_drop needs"),
    ({"tolerance": -1}, "paper.tolerance: expected a number >= 0"),
    ({"cells": [{"label": "a", "select": {"attack.nam": "x"}}]},
     r"paper.cells\[0\].select: 'attack.nam' is not a config key"),
    ({"cells": [{"label": "a"}]}, r"paper.cells\[0\].select: expected a mapping"),
    ({"cells": [{"label": "a", "select": {"seed": 0}, "published": {"value": 1, "clean": 2}}]},
     r"paper.cells\[0\].published: a mapping is \{value, clean\} under compare: relative_drop"),
    ({"cells": [{"label": "a", "select": {"seed": 0}, "published": "high"}]},
     r"paper.cells\[0\].published: expected a number"),
    ({"cells": [{"label": "a", "select": {"seed": 0}, "colour": 1}]},
     r"unknown key 'paper.cells\[0\].colour'"),
    ({"cells": [{"label": "a", "select": {"seed": 0}}, {"label": "a", "select": {"seed": 1}}]},
     "paper.cells: label 'a' is used twice"),
    ({"order": [["a", "b"]]}, r"paper.order\[0\]: 'b' is not a cell label"),
    ({"order": ["a"]}, "paper.order: expected a list of chains"),
])
def test_paper_block_errors_are_one_line(change, message):
    raw = {"data": {"dataset": "synthetic"}, "paper": {**BASE, **change}}
    with pytest.raises(ConfigError, match=message) as e:
        expand(raw)
    assert "\n" not in str(e.value)


def test_paper_keys_in_attack_params_are_config_keys():
    raw = {"paper": {**BASE, "cells": [{"label": "a", "select": {"attack.params.variant": "O-D"}}]}}
    assert len(expand(raw)) == 1


def test_run_stops_on_a_bad_paper_block(tmp_path, capsys):
    p = write_table(tmp_path, "t", tmp_path, paper="paper: {source: s, compare: ratio}\n")
    assert main(["run", str(p), "--no-progress"]) == 2
    assert "paper.compare" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", table_names())
def test_every_paper_table_loads_and_its_grid_expands(name):
    table = load_table(PAPER_DIR / f"{name}.yaml")
    assert table.cfgs and table.cells
    assert len({c.digest() for c in table.cfgs}) == len(table.cfgs)
    assert all(len(c.dirs) == 3 for c in table.cells)  # 3 seeds per cell
    text = (PAPER_DIR / f"{name}.yaml").read_text()
    assert text.startswith("#") and any(w in text for w in ("Table", "Figure", "figure"))
    assert report_table(table).state.startswith(
        ("not run", "unsupported", "partial", "done", "passing"))


def test_keys_and_readme_list_the_paper_block(capsys):
    from fedrec.paper import PAPER_DEFAULTS

    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    readme = (ROOT / "README.md").read_text()
    for key in PAPER_DEFAULTS:
        assert key in out
        assert f"`{key}`" in readme, key


def test_metric_values_from_detection_and_metrics_csv(ran):
    import csv

    from fedrec.reproduce import detection_value, run_value

    s = {"detection": {"precision": 0.25, "recall": 1.0, "union": {"precision": 0.5}}}
    assert detection_value(s, "det_precision") == 0.25
    assert detection_value(s, "det_union_precision") == 0.5
    assert detection_value(s, "det_union_recall") is None
    root, _, _ = ran
    d = next(p.parent for p in sorted((root / "runs").glob("*/summary.json")))
    with open(d / "metrics.csv") as f:
        last = [r["train_loss"] for r in csv.DictReader(f) if r["train_loss"]][-1]
    summary = json.loads((d / "summary.json").read_text())
    assert run_value(d, summary, "train_loss") == float(last)
    assert run_value(d, summary, "test_hr@5") == summary["final"]["test_hr@5"]


def test_plots_draw_one_curve_per_set_of_runs(tmp_path, monkeypatch):
    """Cells that read the same runs under another metric (HR@5 and NDCG@5 of one attack)
    give one curve, named after the first such cell."""
    from types import SimpleNamespace as NS

    import fedrec.plots
    from fedrec import reproduce_docs

    seen = []
    monkeypatch.setattr(fedrec.plots, "plot_mean_curves",
                        lambda groups, out, metric, title="": seen.append((metric, groups)) or False)
    monkeypatch.setattr(reproduce_docs, "_columns", lambda d: set())
    cell = lambda label, metric, dirs: NS(spec=NS(label=label, metric=metric), dirs=dirs)
    clean = NS(attack=NS(name="none"))
    table = NS(name="t", dirs=["a", "b", "c"], cfgs=[clean] * 3,
               cells=[cell("No attack", "test_hr@5", ["a"]), cell("Attack", "test_hr@5", ["b", "c"]),
                      cell("No attack NDCG@5", "test_ndcg@5", ["a"]),
                      cell("Attack NDCG@5", "test_ndcg@5", ["b", "c"])])
    reproduce_docs.table_plots(NS(table=table, done={"a", "b", "c"}), tmp_path, "x")
    assert [m for m, _ in seen] == ["test_hr@5", "test_ndcg@5"]
    for _, groups in seen:
        assert groups == {"No attack": ["a"], "Attack": ["b", "c"]}


def test_a_value_cell_does_not_inherit_the_drop_tolerance():
    from fedrec.paper import parse_paper

    raw = {"source": "s", "compare": "relative_drop", "baseline": {"attack.name": "none"},
           "tolerance": 5, "cells": [
               {"label": "clean", "select": {"attack.name": "none"}, "compare": "value",
                "published": 0.0135},
               {"label": "clean2", "select": {"attack.name": "none"}, "compare": "value",
                "published": 0.0135, "tolerance": 0.001},
               {"label": "drop", "select": {"attack.name": "gaussian"}, "published": 10}]}
    cells = {c.label: c for c in parse_paper(raw, lambda k: True).cells}
    assert cells["clean"].tolerance is None  # 5 points of drop are no HR@5 tolerance
    assert cells["clean2"].tolerance == 0.001 and cells["drop"].tolerance == 5


def test_a_subset_grid_run_is_found_under_the_full_grids_label(tmp_path):
    """The clean run of a grid that crosses attacks with fractions is one config: a subset
    grid (one fraction) names it after its own value; the full grid and `fedrec reproduce`
    find it by its config digest instead of rerunning it."""
    full = GRID.format(root=tmp_path, seeds="[0]").replace(
        "attack.name: [none, gaussian, labelflip]",
        "attack.malicious_fraction: [0.2, 0.3]\n  attack.name: [none, gaussian]")
    subset = full.replace("[0.2, 0.3]", "[0.3]")
    (tmp_path / "sub.yaml").write_text(subset)
    assert main(["run", str(tmp_path / "sub.yaml"), "--no-progress"]) == 0
    made = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert any("malicious_fraction=0.3,name=none" in n for n in made)
    (tmp_path / "full.yaml").write_text(full)
    from fedrec.results import run_dir_for

    dirs = {run_dir_for(c) for c in expand(yaml.safe_load(full), base_dir=str(tmp_path))}
    clean = [d for d in dirs if "name=none" in d.name]
    assert len(clean) == 1 and "malicious_fraction=0.3" in clean[0].name  # found, not 0.2's
    mtime = (clean[0] / "summary.json").stat().st_mtime_ns
    assert main(["run", str(tmp_path / "full.yaml"), "--no-progress"]) == 0
    assert (clean[0] / "summary.json").stat().st_mtime_ns == mtime  # skipped, not rerun
    assert not any("malicious_fraction=0.2,name=none" in p.name
                   for p in (tmp_path / "runs").iterdir())


def test_reproduce_says_what_it_will_run_before_running(tmp_path, capsys):
    """A table name runs its grid: the command says how many runs it starts first (a long
    grid must not start silently), and says nothing of the kind once every run is done."""
    tables = tmp_path / "tables"
    write_table(tables, "tiny", tmp_path, seeds="[0]")
    assert main(["reproduce", "tiny", "--tables", str(tables), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "tiny: 0 of 3 runs done, running the other 3 (--jobs 1;" in err
    assert "--table-only" in err
    assert main(["reproduce", "tiny", "--tables", str(tables), "--no-progress"]) == 0
    assert "runs done" not in capsys.readouterr().err


def test_a_table_takes_another_tables_run_of_the_same_computation(tmp_path, capsys):
    """Table B's grid holds runs identical to table A's but for the name (and a UNION setting,
    inert without the UNION filter): B reports A's results for them and `fedrec reproduce B`
    does not run them again; a run that differs in a setting that matters is not shared."""
    from fedrec.reproduce import computation_digest

    tables = tmp_path / "tables"
    tables.mkdir()
    grid_a = GRID.format(root=tmp_path, seeds="[0]").replace(
        "output: {dir: %s/runs," % tmp_path, "output: {dir: %s/runs/a," % tmp_path)
    (tables / "a.yaml").write_text(grid_a + PAPER)
    grid_b = grid_a.replace("name: tiny", "name: other").replace("/runs/a,", "/runs/b,").replace(
        "server: {lr: 0.05}", "server: {lr: 0.05, union_expected_attackers: 3}").replace(
        "attack.name: [none, gaussian, labelflip]", "attack.name: [none, gaussian, labelflip, lie]")
    (tables / "b.yaml").write_text(grid_b + PAPER)
    assert main(["reproduce", "a", "--tables", str(tables), "--no-progress"]) == 0
    capsys.readouterr()
    table_b = load_table(tables / "b.yaml")
    assert sorted(table_b.shared) == [0, 1, 2]  # none, gaussian, labelflip; lie is B's own
    assert all(Path(d).parent.name == "a" for d in table_b.shared.values())
    assert main(["reproduce", "b", "--tables", str(tables), "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "3 of 4 runs done, running the other 1" in out.err
    assert "shared: 3 runs are another table's identical runs" in out.out
    assert len(list((tmp_path / "runs" / "b").glob("*/summary.json"))) == 1  # only lie ran
    a_cell = report_table(load_table(tables / "a.yaml")).results[1]
    b_cell = report_table(load_table(tables / "b.yaml")).results[1]
    assert (a_cell.label, a_cell.mean) == (b_cell.label, b_cell.mean)  # Gaussian's drop
    # the same computation, whatever the name or an inert UNION key; not another learning rate
    cfg = load_table(tables / "a.yaml").cfgs[0]
    assert computation_digest(cfg) == computation_digest(table_b.cfgs[0])
    other = expand(yaml.safe_load(grid_a.replace("lr: 0.05", "lr: 0.06")))[0]
    assert computation_digest(other) != computation_digest(cfg)


def test_paired_difference_by_seed():
    """Differences of two cells paired by seed (a seed only one has is left out): mean and
    standard error (sample sd / sqrt(n)); one seed gives an infinite error."""
    from fedrec.reproduce import CellResult, paired_difference

    def cell(by_seed):
        return CellResult("c", "test_hr@5", "relative_drop", len(by_seed), 3, None, None,
                          None, [], None, None, by_seed)

    a, b = cell({0: 10.0, 1: 14.0, 2: 30.0}), cell({0: 4.0, 1: 6.0, 5: 1.0})
    mean, se, n = paired_difference(a, b)  # differences 6 and 8
    assert (mean, n) == (7.0, 2) and se == pytest.approx(1.0)  # sd sqrt(2), / sqrt(2)
    assert paired_difference(a, cell({2: 1.0}))[1] == float("inf")
    assert paired_difference(a, cell({7: 1.0})) is None


def test_order_line_with_one_seed_gives_no_error_estimate():
    """An order chain's paired difference over one seed is printed as a difference with
    no error estimate (not "± inf ... within noise"); over two seeds with one."""
    from fedrec.paper import PaperSpec
    from fedrec.reproduce import CellResult, order_checks

    def cell(label, by_seed):
        vals = list(by_seed.values())
        return CellResult(label, "test_hr@5", "relative_drop", len(vals), 3,
                          sum(vals) / len(vals), 0.0, None, [], None, None, by_seed)

    spec = PaperSpec("s", "test_hr@5", "relative_drop", {}, None, order=[["A", "B"]])
    (text, holds), = order_checks(spec, [cell("A", {2: 10.7}), cell("B", {2: -14.7})])
    assert holds is True
    assert "A − B +25.4 points (one seed: no error estimate)" in text and "inf" not in text
    (text, _), = order_checks(spec, [cell("A", {0: 10.0, 1: 12.0}), cell("B", {0: 1.0, 1: 1.0})])
    assert "A − B +10.0 ± 1.0 points (n = 2)" in text


def test_cells_runs_only_the_runs_behind_the_named_cells(tmp_path, capsys):
    """`--cells LabelFlip` runs LabelFlip's runs and their clean reference runs, seed by seed,
    and not Gaussian's; the table still prints every cell (Gaussian's as not run); a text
    that names no cell is a one-line error listing the cells."""
    from fedrec.reproduce import cell_runs

    tables = tmp_path / "tables"
    path = write_table(tables, "tiny", tmp_path, seeds="[0, 1]")
    table = load_table(path)
    by_name = {i: (c.attack.name, c.seed) for i, c in enumerate(table.cfgs)}
    order = cell_runs(table, ["labelflip"])
    assert [by_name[i] for i in order] == [("none", 0), ("none", 1),
                                           ("labelflip", 0), ("labelflip", 1)]
    # two patterns: the second cell's runs after the first's, each run once
    both = cell_runs(table, ["Gauss", "clean"])
    assert [by_name[i] for i in both] == [("none", 0), ("none", 1),
                                          ("gaussian", 0), ("gaussian", 1)]
    assert main(["reproduce", "tiny", "--tables", str(tables), "--no-progress",
                 "--cells", "LabelFlip"]) == 0
    out = capsys.readouterr()
    assert "tiny: 0 of the 4 runs of the cells asked for done, running the other 4" in out.err
    ran_names = sorted(yaml.safe_load((d / "config.yaml").read_text())["attack"]["name"]
                       for d in (tmp_path / "runs").iterdir() if (d / "summary.json").is_file())
    assert ran_names == ["labelflip", "labelflip", "none", "none"]
    assert "| Gaussian |" in out.out and "not run" in out.out
    # --list: a partial table tells how the checks of its complete cells stand (clean: a value
    # far from the published 1.0, fails; LabelFlip's generous bounds hold; Gaussian: no runs)
    assert main(["reproduce", "--list", "--tables", str(tables)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.endswith("partial (4 of 6 runs; ~1 run-minutes left; "
                         "complete cells: 1 of 2 checks pass)"), line
    with pytest.raises(ConfigError, match=r"--cells 'Fang': no cell of tiny .*cells: clean; Gaussian; LabelFlip"):
        cell_runs(table, ["Fang"])


def test_a_wall_time_that_covers_only_the_last_stretch_of_a_resumed_run_is_left_out():
    """Runs resumed before wall_time_s spanned resumes kept only their last segment's time
    (a 6000-round run could read 26 s): such a wall is unknown, not averaged in."""
    from fedrec.reproduce import whole_run_wall

    assert whole_run_wall({"wall_time_s": 1200.0}) == 1200.0
    assert whole_run_wall({"wall_time_s": 26.5, "resumed_from_round": 5800}) is None
    assert whole_run_wall({"wall_time_s": 1250.0, "wall_time_segment_s": 26.5,
                           "resumed_from_round": 5800}) == 1250.0


def test_a_two_way_grid_of_drops_gets_a_grouped_bar_chart(tmp_path):
    """Cells labelled key1=a,key2=b over the same two keys are drawn as bars grouped by the
    first axis; any other table gets none (mixed keys, one axis, or value cells)."""
    from types import SimpleNamespace as NS

    from fedrec import reproduce_docs
    from fedrec.reproduce import CellResult

    def res(label, mean, n=3, compare="relative_drop"):
        return CellResult(label, "test_hr@5", compare, n, 3, mean, 1.0 if mean is not None else None,
                          None, [], None, None)

    labels = [f"defense={d},attacker={a}" for d in ("none", "median", "krum")
              for a in ("none", "fang")]
    results = [res(lab, 10.0 * i, n=1 if i == 4 else 3) for i, lab in enumerate(labels)]
    results[5] = res(labels[5], None, n=0)  # a cell not run: a gap
    rows, cols, cells = reproduce_docs.two_way_cells(results)
    assert rows == ["none", "median", "krum"] and cols == ["none", "fang"]
    assert cells[("median", "fang")].mean == 30.0
    rep = NS(table=NS(name="fig"), results=results)
    lines = reproduce_docs.drop_bars(rep, tmp_path, "x")
    assert lines == ["![fig: HR@5 drop per cell](x/fig-bars.png)"]
    assert (tmp_path / "fig-bars.png").stat().st_size > 1000
    # not a two-way grid of drops: no bars
    assert reproduce_docs.two_way_cells([res("No attack", 1.0), res("Attack", 2.0)]) is None
    assert reproduce_docs.two_way_cells(
        [res("defense=a,attacker=b", 1.0), res("defense=a,fraction=c", 2.0)]) is None
    assert reproduce_docs.two_way_cells(
        [res("defense=a,attacker=b", 1.0), res("defense=a,attacker=c", 2.0)]) is None  # one group
    values = [res(lab, 1.0, compare="value") for lab in labels]
    assert reproduce_docs.drop_bars(NS(table=NS(name="v"), results=values), tmp_path, "x") == []
    nothing = [res(lab, None, n=0) for lab in labels]
    assert reproduce_docs.drop_bars(NS(table=NS(name="n"), results=nothing), tmp_path, "x") == []
    assert not (tmp_path / "n-bars.png").exists()


def test_the_curves_of_a_two_way_grid_are_drawn_as_one_panel_per_row_value(tmp_path, monkeypatch):
    import fedrec.plots
    from fedrec import reproduce_docs

    groups = {f"defense={d},attacker={a}": [f"{d}-{a}"] for d in ("none", "krum")
              for a in ("none", "fang", "lie")}
    del groups["defense=krum,attacker=lie"]  # a cell without runs: no line
    assert reproduce_docs.curve_panels(groups) == {
        "none": {"none": ["none-none"], "fang": ["none-fang"], "lie": ["none-lie"]},
        "krum": {"none": ["krum-none"], "fang": ["krum-fang"]}}
    assert reproduce_docs.curve_panels({"No attack": ["a"], "Attack": ["b"]}) is None
    monkeypatch.setattr(fedrec.plots, "mean_curve", lambda dirs, metric: ([1, 2], [0.1, 0.2]))
    out = tmp_path / "p.png"
    assert fedrec.plots.plot_mean_curve_panels(reproduce_docs.curve_panels(groups), str(out))
    assert out.stat().st_size > 1000


def test_hours_left_takes_each_runs_cell_pace_else_the_tables():
    """Runs not complete are estimated at their cell's median whole wall time (a UNION cell is
    slower than a median one), the others (clean references, cells not begun) at the median
    of every complete run; a wall time known to cover only a last stretch is not used."""
    from types import SimpleNamespace

    from fedrec.reproduce import TableReport

    slow, fast, new = (SimpleNamespace(dirs=dirs) for dirs in
                       (["s0", "s1", "s2"], ["f0", "f1", "f2"], ["n0", "n1"]))
    table = SimpleNamespace(cells=[slow, fast, new],
                            dirs=["s0", "s1", "s2", "f0", "f1", "f2", "n0", "n1", "ref1"])
    done = {"s0": {"wall_time_s": 3600.0}, "s1": {"wall_time_s": 5400.0},
            "f0": {"wall_time_s": 360.0},
            "f1": {"wall_time_s": 20.0, "resumed_from_round": 900}}  # a last stretch: unknown
    rep = TableReport(table, [], [], done)
    overall = 3600.0  # the median of 3600, 5400 and 360
    # s2 at its cell's 4,500 s; f2 at 360 s (f1's wall is unknown, yet f1 is complete);
    # n0, n1 and the reference at the table's median
    assert rep.hours_left() == pytest.approx((4500 + 360 + 3 * overall) / 3600)
    assert TableReport(table, [], [], {"f1": done["f1"]}).hours_left() is None


def test_hours_left_takes_a_new_cell_at_the_pace_of_the_same_cost_elsewhere():
    """A cell not begun (Figure 2's UNION row) is estimated from the complete runs of the same
    config but for seed and attack, in this table or another (Table 3's UNION runs), at their
    median: not at the table's median of cheaper runs, nor carried by one paused run."""
    from types import SimpleNamespace

    from fedrec.reproduce import TableReport, cost_signature, run_pace

    def cfg(rule, seed, attack, name="figure2"):
        return {"name": name, "seed": seed, "attack": {"name": attack},
                "output": {"dir": f"runs/{name}"}, "server": {"rule": rule}}

    assert cost_signature(cfg("union", 0, "lie")) == cost_signature(cfg("union", 2, "fang", "t3"))
    assert cost_signature(cfg("union", 0, "lie")) != cost_signature(cfg("median", 0, "lie"))
    # figure 2: a median cell complete, a UNION cell not begun
    fig = SimpleNamespace(cells=[SimpleNamespace(dirs=["m0", "m1"]),
                                 SimpleNamespace(dirs=["u0", "u1"])],
                          dirs=["m0", "m1", "u0", "u1"],
                          cfgs=[cfg("median", 0, "lie"), cfg("median", 1, "lie"),
                                cfg("union", 0, "lie"), cfg("union", 1, "lie")])
    fig_rep = TableReport(fig, [], [], {"m0": {"wall_time_s": 300.0},
                                        "m1": {"wall_time_s": 500.0}})
    # alone, the UNION runs can only be taken at the table's median
    assert fig_rep.hours_left() == pytest.approx(2 * 400 / 3600)
    # table 3 ran UNION under another attack: 1,800 s, 2,000 s and one paused run of 9,000 s
    t3 = SimpleNamespace(cells=[SimpleNamespace(dirs=["a", "b", "c"])], dirs=["a", "b", "c"],
                         cfgs=[cfg("union", s, "clusterattack", "t3") for s in range(3)])
    t3_rep = TableReport(t3, [], [], {"a": {"wall_time_s": 1800.0},
                                      "b": {"wall_time_s": 2000.0},
                                      "c": {"wall_time_s": 9000.0}})
    fig_rep.pace = run_pace([fig_rep, t3_rep])
    assert fig_rep.hours_left() == pytest.approx(2 * 2000 / 3600)


def test_hours_left_counts_off_what_a_stopped_run_has_done(tmp_path):
    """A run stopped at round 600 of 1,000 (its metrics.csv's last row) has 40% of its cell's
    pace left; a run with no metrics yet counts whole; rounds_done reads the file's tail."""
    from types import SimpleNamespace

    from fedrec.run_cost import hours_left, rounds_done

    dirs = [tmp_path / n for n in ("done", "stopped", "fresh", "garbled")]
    for d in dirs:
        d.mkdir()
    rows = "\n".join(f"{r},0.5," for r in range(100, 700, 100))
    (dirs[1] / "metrics.csv").write_text(f"round,train_loss,test_hr@5\n{rows}\n")
    (dirs[3] / "metrics.csv").write_text("round,train_loss\nnot-a-number,0.5\n")
    assert rounds_done(dirs[1]) == 600
    assert rounds_done(dirs[2]) is None and rounds_done(dirs[3]) is None
    cfg = {"seed": 0, "train": {"rounds": 1000}}
    table = SimpleNamespace(cells=[SimpleNamespace(dirs=dirs)], dirs=dirs, cfgs=[cfg] * 4)
    done = {dirs[0]: {"wall_time_s": 3600.0}}
    assert hours_left(table, done) == pytest.approx(0.4 + 1.0 + 1.0)


def test_named_table_and_list_estimate_a_new_cell_from_another_tables_runs(tmp_path, capsys):
    """Table B's median cell has no run anywhere in B; table A has a complete median run of
    the same cost (another attack): `fedrec reproduce B` and `--list` both take B's median
    runs at A's pace (2 x 2 h), not at B's only complete run (1 min)."""
    tables = tmp_path / "tables"
    tables.mkdir()
    head = GRID.split("grid:")[0].format(root=tmp_path, seeds="[0]").replace("name: tiny\n", "")
    paper = 'paper: {source: "t", metric: test_hr@5, compare: value}\n'
    (tables / "tinya.yaml").write_text(
        "name: tinya\n" + head + "grid:\n  seed: [0]\n  server.rule: [median]\n"
        "  attack.name: [gaussian]\n" + paper)
    (tables / "tinyb.yaml").write_text(
        "name: tinyb\n" + head + "grid:\n  seed: [0, 1]\n  server.rule: [mean, median]\n"
        "  attack.name: [labelflip]\n" + paper)

    def complete(table, index, wall):
        d = Path(load_table(tables / f"{table}.yaml").dirs[index])
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(
            {"status": "complete", "seed": 0, "wall_time_s": wall, "final": {"test_hr@5": 0.1}}))

    complete("tinya", 0, 7200.0)
    b = load_table(tables / "tinyb.yaml")
    mean_seed0 = next(i for i, c in enumerate(b.cfgs)
                      if c.server.rule == "mean" and c.seed == 0)
    complete("tinyb", mean_seed0, 60.0)
    rep = report_table(b)
    assert rep.hours_left() == pytest.approx(3 * 60 / 3600)  # alone: B's own pace
    assert main(["reproduce", "tinyb", "--table-only", "--tables", str(tables)]) == 0
    assert "partial (1 of 4 runs; ~4.0 run-hours left)" in capsys.readouterr().out
    assert main(["reproduce", "--list", "--tables", str(tables)]) == 0
    assert "partial (1 of 4 runs; ~4.0 run-hours left)" in capsys.readouterr().out

"""The command line: one-line errors with exit code 2, run/report/data/keys behaviour."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedrec.cli import main
from fedrec.config import ExperimentConfig, valid_keys

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fedrec", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=300)


def _one_line_error(res):
    assert res.returncode == 2, res.stderr
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


def tiny_yaml(tmp_path, extra=""):
    p = tmp_path / "tiny.yaml"
    p.write_text(f"""
name: tiny
data:
  dataset: synthetic
  synthetic: {{n_users: 30, n_items: 40, mean_history: 8}}
  cache_dir: {tmp_path / 'cache'}
model: {{dim: 8}}
train: {{rounds: 4, clients_per_round: 10}}
eval: {{every: 2}}
output: {{dir: {tmp_path / 'runs'}, progress: false}}
{extra}
""")
    return p


def test_unknown_key_is_one_line_exit_2(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ntrain:\n  roundz: 3\n")
    line = _one_line_error(run_cli("run", str(p)))
    assert "train.roundz" in line and "train.rounds" in line


def test_bad_value_and_missing_experiment(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  rounds: many\n")
    assert "train.rounds" in _one_line_error(run_cli("run", str(p)))
    assert "no such experiment file" in _one_line_error(run_cli("run", str(tmp_path / "nope.yaml")))


def test_invalid_yaml_names_the_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: x\ntrain: [1, 2\n")
    assert re.search(r"broken\.yaml:\d+", _one_line_error(run_cli("run", str(p))))


def test_missing_data_file_and_corrupt_line(tmp_path):
    missing = tiny_yaml(tmp_path, "")
    text = missing.read_text().replace("dataset: synthetic", f"dataset: {tmp_path / 'none.dat'}")
    missing.write_text(text)
    assert "none.dat" in _one_line_error(run_cli("run", str(missing)))

    bad = tmp_path / "ratings.dat"
    bad.write_text("1::10::5::100\n1::11::4::101\n2::10\n")
    text = text.replace(str(tmp_path / "none.dat"), str(bad))
    missing.write_text(text)
    line = _one_line_error(run_cli("run", str(missing)))
    assert "ratings.dat:3" in line


def test_a_grid_on_missing_data_stops_before_any_run(tmp_path):
    """A grid whose dataset is not here fails once, in one line, before any run starts (not
    once per run, each with a run directory); a grid whose runs are all complete needs no data."""
    grid = tiny_yaml(tmp_path, "grid:\n  seed: [0, 1, 2]\n")
    text = grid.read_text()
    grid.write_text(text.replace("dataset: synthetic", f"dataset: {tmp_path / 'none.dat'}"))
    assert "none.dat" in _one_line_error(run_cli("run", str(grid)))
    assert not (tmp_path / "runs").exists()
    # the same grid on data that exists runs; once complete, the missing file is not looked for
    data = tmp_path / "ratings.dat"
    data.write_text("".join(f"{u}::{i}::5::{100 * u + i}\n" for u in range(1, 31)
                            for i in range(u % 20 + 1, u % 20 + 11)))  # 10 of 30 items each
    grid.write_text(text.replace("dataset: synthetic", f"dataset: {data}"))
    assert run_cli("run", str(grid)).returncode == 0
    data.unlink()
    res = run_cli("run", str(grid))
    assert res.returncode == 0 and res.stdout.count("skipped (already complete)") == 3


def test_run_report_and_grid_resume(tmp_path, capsys):
    p = tiny_yaml(tmp_path, "grid:\n  seed: [0, 1]\n")
    assert main(["run", str(p), "--no-progress"]) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    for r in runs:
        s = json.loads((r / "summary.json").read_text())
        assert s["status"] == "complete" and "test_hr@5" in s["final"]
    capsys.readouterr()
    # a second invocation skips both finished runs
    assert main(["run", str(p), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("skipped (already complete)") == 2
    assert main(["report", str(tmp_path / "runs"), "--format", "csv"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    per_run = out[:out.index("")]
    assert per_run[0].startswith("run,") and len(per_run) == 3
    # the two seeds of one setting are summarised (mean ± std) in a second table
    means = [line for line in out[out.index(""):] if line]
    assert means[0].startswith("setting,seeds,") and len(means) == 2 and ",2," in means[1]
    png = tmp_path / "hr.png"
    assert main(["report", str(tmp_path / "runs"), "--plot", str(png)]) == 0
    assert png.stat().st_size > 1000


def test_set_override_changes_the_run(tmp_path):
    p = tiny_yaml(tmp_path)
    assert main(["run", str(p), "--no-progress", "--set", "train.rounds=2", "--set", "name=short"]) == 0
    (run,) = [r for r in (tmp_path / "runs").iterdir() if r.name.startswith("short")]
    s = json.loads((run / "summary.json").read_text())
    assert s["rounds"] == 2


def test_data_info_on_fixture(tmp_path, capsys):
    f = tmp_path / "u.data"
    f.write_text("1\t10\t5\t100\n1\t11\t4\t101\n2\t10\t3\t102\n")
    assert main(["data", "info", str(f), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["users"], stats["items"], stats["interactions"]) == (2, 2, 3)


def test_readme_documents_every_yaml_key():
    readme = (ROOT / "README.md").read_text()
    missing = []
    for key in valid_keys(ExperimentConfig):
        leaf = key.split(".")[-1]
        if f"`{key}`" in readme or (key.startswith("data.synthetic.") and leaf in readme) \
                or (key.startswith("flower.") and f"`{key}`" in readme):
            continue
        missing.append(key)
    assert not missing, f"README lacks YAML keys: {missing}"


def test_keys_command_lists_every_key(capsys):
    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    for key in valid_keys(ExperimentConfig):
        assert key in out


def _bad_input_cases(tmp_path):
    (tmp_path / "afile").write_text("not a folder\n")
    full = tmp_path / "full.tsv"  # user 1 has interacted with all 4 items
    full.write_text("1\t1\t5\t1\n1\t2\t5\t2\n1\t3\t5\t3\n1\t4\t5\t4\n2\t1\t5\t1\n2\t2\t5\t2\n")
    binary = tmp_path / "binary.dat"
    binary.write_bytes(bytes(range(256)) * 3)
    corrupt = tmp_path / "corrupt.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00\x1b[31m\x07garbage")
    ctl = tmp_path / "ctl.csv"
    ctl.write_bytes(b"user,item\n1,2\n\x1b[31m\x07,\x00\n")
    return {
        "seed=-1": (["seed=-1"], "seed"),
        "synthetic n_items=2": (["data.synthetic.n_items=2"], "data.synthetic.n_items"),
        "synthetic min_history": (["data.synthetic.min_history=30"], "data.synthetic.min_history"),
        "output.dir a file": ([f"output.dir={tmp_path / 'afile'}"], "is a file"),
        "clients_per_round > users": (["train.clients_per_round=31"], "more than the 30 users"),
        "every item interacted": ([f"data.dataset={full}", "data.format=ml-100k",
                                   "train.clients_per_round=2"], "no negatives exist"),
        "binary input": ([f"data.dataset={binary}", "data.format=ml-1m"], str(binary.name)),
        "corrupt gzip": ([f"data.dataset={corrupt}", "data.format=csv"], str(corrupt.name)),
        "control bytes": ([f"data.dataset={ctl}", "data.format=csv"], str(ctl.name)),
    }


@pytest.mark.parametrize("case", ["seed=-1", "synthetic n_items=2", "synthetic min_history",
                                  "output.dir a file", "clients_per_round > users",
                                  "every item interacted", "binary input", "corrupt gzip",
                                  "control bytes"])
def test_bad_inputs_are_one_printable_line_and_leave_no_run_directory(tmp_path, case):
    overrides, words = _bad_input_cases(tmp_path)[case]
    args = ["run", str(tiny_yaml(tmp_path))]
    for o in overrides:
        args += ["--set", o]
    line = _one_line_error(run_cli(*args))
    assert words in line, line
    assert line.isprintable() and "\x1b" not in line and "\x07" not in line, repr(line)
    assert not (tmp_path / "runs").exists()


def test_printable_escapes_control_characters():
    from fedrec.cli import printable

    assert printable("a\x1b[31mb\x07\n\u2028é") == "a\\x1b[31mb\\x07\\x0a\\u2028é"

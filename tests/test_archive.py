"""The results archive: complete runs kept small (config, summary, evaluation rows), read back by
`fedrec reproduce` for runs missing from runs/, never run again, and ignorable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedrec.archive import archive_run, evaluation_rows, round_means
from fedrec.cli import main
from fedrec.errors import FedRecError
from fedrec.reproduce import load_table, report_table

from test_reproduce import write_table


@pytest.fixture(scope="module")
def archived(tmp_path_factory):
    """The tiny table (3 runs, 6 rounds, evaluation every 2) run, its report, then archived."""
    root = tmp_path_factory.mktemp("archive")
    tables = root / "tables"
    write_table(tables, "tiny", root, seeds="[0]")
    assert main(["reproduce", "tiny", "--tables", str(tables), "--no-progress",
                 "--no-archive"]) == 0
    before = report_table(load_table(tables / "tiny.yaml", archive=None))
    assert main(["archive", str(root / "runs"), "--to", str(root / "archive")]) == 0
    return root, tables, before


def test_archived_runs_keep_config_summary_and_only_the_evaluation_rows(archived):
    root, _, _ = archived
    runs = sorted((root / "runs").iterdir())
    assert len(runs) == 3
    for run in runs:
        dest = root / "archive" / "runs" / run.name  # <archive>/<run's folder>/<run>
        assert (dest / "summary.json").read_bytes() == (run / "summary.json").read_bytes()
        assert (dest / "config.yaml").read_bytes() == (run / "config.yaml").read_bytes()
        full = (run / "metrics.csv").read_text().splitlines()
        kept = (dest / "metrics.csv").read_text().splitlines()
        assert kept[0] == full[0]
        assert [r.split(",")[0] for r in kept[1:]] == ["2", "4", "6"]  # eval.every: 2
        assert set(kept[1:]) <= set(full[1:])  # rows as they were
        meta = json.loads((dest / "archived.json").read_text())
        assert (meta["metrics_rows_kept"], meta["metrics_rows_total"]) == (3, 6)
        assert meta["source"] == str(run.resolve())


def test_reproduce_reads_the_archive_when_the_runs_are_gone(archived, tmp_path, capsys):
    root, tables, before = archived
    moved = tmp_path / "runs-elsewhere"
    shutil.move(root / "runs", moved)
    try:
        table = load_table(tables / "tiny.yaml", archive=root / "archive")
        assert sorted(table.archived) == [0, 1, 2]
        after = report_table(table)
        assert [(r.label, r.mean, r.std, r.n) for r in after.results] == \
            [(r.label, r.mean, r.std, r.n) for r in before.results]
        assert report_table(load_table(tables / "tiny.yaml", archive=None)).state == "not run"
        # running the table runs nothing the archive holds, and says where its runs came from
        assert main(["reproduce", "tiny", "--tables", str(tables), "--no-progress",
                     "--archive", str(root / "archive")]) == 0
        out = capsys.readouterr()
        assert "archived: 3 runs taken from" in out.out
        assert "running the other" not in out.err
        assert not (root / "runs").exists()
        # --no-archive: the runs are missing again, so they run
        assert main(["reproduce", "tiny", "--tables", str(tables), "--no-progress",
                     "--no-archive"]) == 0
        assert "0 of 3 runs done, running the other 3" in capsys.readouterr().err
        assert len(list((root / "runs").glob("*/summary.json"))) == 3
    finally:
        shutil.rmtree(root / "runs", ignore_errors=True)
        shutil.move(moved, root / "runs")


def test_archiving_again_writes_nothing_and_an_incomplete_run_is_refused(archived, tmp_path,
                                                                        capsys):
    root, _, _ = archived
    run = sorted((root / "runs").iterdir())[0]
    dest, written = archive_run(run, root / "archive")
    assert not written and (dest / "summary.json").is_file()
    broken = tmp_path / "runs" / "half"
    broken.mkdir(parents=True)
    shutil.copyfile(run / "config.yaml", broken / "config.yaml")
    (broken / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    with pytest.raises(FedRecError, match="not a complete run"):
        archive_run(broken, tmp_path / "archive")
    assert main(["archive", str(tmp_path / "runs"), "--to", str(tmp_path / "archive")]) == 2
    assert "no complete run under" in capsys.readouterr().err


def test_evaluation_rows():
    text = ("round,train_loss,test_hr@5,val_hr@5,det_f1\n"
            "1,0.5,,,0.1\n2,0.4,0.2,,0.2\n3,0.3,,0.1,\n4,0.2,,,\n")
    kept, n_kept, n_total = evaluation_rows(text)
    assert kept.splitlines() == ["round,train_loss,test_hr@5,val_hr@5,det_f1",
                                 "2,0.4,0.2,,0.2", "3,0.3,,0.1,"]
    assert (n_kept, n_total) == (2, 4)
    assert evaluation_rows("") == ("", 0, 0)


def test_round_means_average_every_per_round_column_over_all_its_rows():
    text = ("round,train_loss,test_hr@5,attack_upload_kl,note\n"
            "1,0.5,,0.3,x\n2,0.4,0.2,,y\n3,0.3,,0.1,\n4,0.2,,0.2,\n")
    assert round_means(text) == pytest.approx({"train_loss": 0.35, "attack_upload_kl": 0.2})
    assert round_means("") == {}


def test_report_reads_an_archived_runs_round_means_not_its_kept_rows(tmp_path):
    """A per-round column averaged over an archived run is its mean over every round (kept in
    archived.json), not over the evaluation rows the archive kept; without round_means (an
    older archive) it is unknown."""
    from fedrec.report import _column_mean

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    rows = ["round,test_hr@5,attack_upload_kl"] + [
        f"{r},{0.1 if r % 5 == 0 else ''},{1.0 if r % 5 == 0 else 0.0}" for r in range(1, 21)]
    (run / "metrics.csv").write_text("\n".join(rows) + "\n")
    (run / "config.yaml").write_text("name: r\n")
    (run / "summary.json").write_text(json.dumps({"status": "complete"}))
    assert _column_mean(run, "attack_upload_kl") == pytest.approx(0.2)  # 4 of 20 rounds at 1
    dest, _ = archive_run(run, tmp_path / "archive")
    assert len((dest / "metrics.csv").read_text().splitlines()) == 5  # the 4 eval rows kept
    assert _column_mean(dest, "attack_upload_kl") == pytest.approx(0.2)  # not 1.0
    meta = json.loads((dest / "archived.json").read_text())
    del meta["round_means"]
    (dest / "archived.json").write_text(json.dumps(meta))
    assert _column_mean(dest, "attack_upload_kl") is None


def test_run_archive_keeps_each_run_as_it_finishes_and_not_a_failed_one(tmp_path, capsys):
    """`fedrec run --archive DIR`: every complete run is archived the moment it ends (before
    the next run starts), a failed run is not, and a second call archives nothing new."""
    from fedrec.grid import run_grid
    from fedrec.archive import archive_as_they_finish
    from fedrec import config

    from test_grid import grid_yaml

    p = grid_yaml(tmp_path, grid=f"  data.dataset: [synthetic, {tmp_path / 'missing.csv'}]\n"
                                 "  seed: [0, 1]\n")
    archive = tmp_path / "kept"
    hook = archive_as_they_finish(archive)
    seen = []

    def on_finish(outcome, run_dir):
        hook(outcome, run_dir)
        # at this moment: which runs are archived, and which runs of the grid have ended
        seen.append((outcome.index, bool(outcome.error),
                     sorted(d.name for d in (archive / "runs").iterdir())
                     if (archive / "runs").is_dir() else [],
                     sum((d / "metrics.csv").is_file() for d in (tmp_path / "runs").iterdir())))

    outcomes = run_grid(config.load(p, []), progress=False, on_finish=on_finish)
    assert [bool(o.error) for o in outcomes] == [False, False, True, True]
    runs = sorted(d.name for d in (tmp_path / "runs").iterdir()
                  if (d / "summary.json").is_file() and "complete" in (d / "summary.json").read_text())
    assert len(runs) == 2
    # run 0 was in the archive when its own hook returned, before run 1 had started
    assert seen[0][0] == 0 and len(seen[0][2]) == 1 and seen[0][2][0] in runs
    assert seen[0][3] == 1
    assert seen[1][0] == 1 and seen[1][2] == runs
    assert [s[2] for s in seen[2:]] == [runs, runs]  # the failed runs added nothing
    for name in runs:
        assert (archive / "runs" / name / "summary.json").read_bytes() == \
            (tmp_path / "runs" / name / "summary.json").read_bytes()
    # through the CLI the missing dataset now stops the grid before any run (one line, exit
    # 2; `fedrec run` checks the data of the runs still to do first): nothing is rewritten
    stamps = {n: (archive / "runs" / n / "archived.json").read_text() for n in runs}
    capsys.readouterr()
    assert main(["run", str(p), "--no-progress", "--archive", str(archive)]) == 2
    err = capsys.readouterr().err
    assert "missing.csv" in err and "archived " not in err
    assert {n: (archive / "runs" / n / "archived.json").read_text() for n in runs} == stamps


def test_run_archive_with_no_directory_uses_the_default_archive(tmp_path, monkeypatch, capsys):
    """--archive alone: $FEDREC_ARCHIVE (else results/); with --jobs 2, the local scheduler's
    runs are archived as they end too."""
    from test_grid import grid_yaml

    monkeypatch.setenv("FEDREC_ARCHIVE", str(tmp_path / "env-archive"))
    p = grid_yaml(tmp_path, grid="  seed: [0, 1]\n")
    assert main(["run", str(p), "--no-progress", "--archive", "--jobs", "2"]) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    err = capsys.readouterr().err
    assert len(runs) == 2
    for run in runs:
        assert (tmp_path / "env-archive" / "runs" / run.name / "summary.json").is_file()
        assert f"archived {run.name}" in err


def test_reproduce_archive_done_refuses_no_archive(tmp_path):
    tables = tmp_path / "tables"
    write_table(tables, "tiny", tmp_path, seeds="[0]")
    assert main(["reproduce", "tiny", "--tables", str(tables), "--archive-done",
                 "--no-archive"]) == 2

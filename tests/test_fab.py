"""The FAB that `flwr run .` builds from this project installs on a SuperLink.

Flower's FAB manifest is "path,sha256,size" per file and its installer splits each line on every
comma, so one file with a comma in its path makes every deployment's ServerApp fail at install
(exit code 201). Archived runs (results/<table>/<name>[seed=0,defense=...]/) have such names:
pyproject's `fab-include` keeps the FAB to the code and the experiment YAMLs. These tests build
the FAB the way `flwr run` does and install it with Flower's own installer.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("flwr")
from flwr.cli.build import build_fab_from_disk, build_fab_from_files  # noqa: E402
from flwr.cli.install import install_from_fab  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _names(fab: bytes) -> list[str]:
    return zipfile.ZipFile(io.BytesIO(fab)).namelist()


def _project_files() -> dict[str, Path]:
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", "runs"}
    return {p.relative_to(ROOT).as_posix(): p for p in ROOT.rglob("*")
            if p.is_file() and not skip.intersection(p.relative_to(ROOT).parts)}


def test_the_project_fab_carries_the_apps_and_experiments_only_and_installs(tmp_path):
    fab = build_fab_from_disk(ROOT)
    names = set(_names(fab))
    assert not [n for n in names if "," in n]
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"fedrec", "clients", "strategies", "experiments", "pyproject.toml", ".info"}
    # everything the ServerApp and ClientApp import or read is there
    for folder, pattern in [("fedrec", "*.py"), ("clients", "*.py"), ("strategies", "*.py"),
                            ("experiments", "*.yaml")]:
        wanted = {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob(pattern)
                  if "__pycache__" not in p.parts}
        assert wanted and wanted <= names, sorted(wanted - names)[:5]
    installed = install_from_fab(fab, install_dir=tmp_path / "app", skip_prompt=True)
    assert (installed / "fedrec" / "server_app.py").is_file()
    assert (installed / "experiments" / "quickstart.yaml").is_file()


def test_an_archived_run_with_commas_stays_out_of_the_fab(tmp_path):
    files = _project_files()
    archived = "results/t/t[seed=0,defense=none,attack=none]-abc123"
    for leaf in ("config.yaml", "summary.json", "metrics.csv", "archived.json"):
        files[f"{archived}/{leaf}"] = b"{}\n"
    fab, _ = build_fab_from_files(files)
    assert not [n for n in _names(fab) if n.startswith("results/") or "," in n]
    install_from_fab(fab, install_dir=tmp_path / "app", skip_prompt=True)


def test_without_the_include_rule_such_a_fab_fails_to_install(tmp_path):
    """The defect the rule prevents, shown with Flower's own builder and installer (if a later
    Flower escapes commas, this test fails and the rule's comment can go)."""
    files = _project_files()
    pyproject = (ROOT / "pyproject.toml").read_text()
    start = pyproject.index("fab-include")
    end = pyproject.index("]", start) + 1
    files["pyproject.toml"] = (pyproject[:start] + pyproject[end:]).encode()
    files["experiments/x[seed=0,defense=none].yaml"] = b"name: x\n"
    fab, _ = build_fab_from_files(files)
    assert any("," in n for n in _names(fab))
    with pytest.raises(ValueError):
        install_from_fab(fab, install_dir=tmp_path / "app", skip_prompt=True)

"""FEDREC_* environment variables: read in fedrec/environment.py only, all in the README."""

import re
from pathlib import Path

import pytest

from fedrec import environment
from fedrec.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
READS = re.compile(r"os\.environ|os\.getenv|getenv\(")


def test_only_the_environment_module_reads_the_environment():
    readers = []
    for pkg in ("fedrec", "clients", "strategies"):
        for path in (ROOT / pkg).rglob("*.py"):
            if path.name == "environment.py" and path.parent.name == "fedrec":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if READS.search(line) and "FEDREC_" in line:
                    readers.append(f"{path.relative_to(ROOT)}:{n}")
    assert readers == []


def test_every_variable_named_in_the_package_is_declared_and_documented():
    named = set()
    for pkg in ("fedrec", "clients", "strategies"):
        for path in (ROOT / pkg).rglob("*.py"):
            named |= set(re.findall(r"FEDREC_[A-Z_]+", path.read_text()))
    assert named == set(environment.VARIABLES)
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"`(FEDREC_[A-Z_]+)`", section)) >= set(environment.VARIABLES)


def test_malformed_values_are_one_line_errors(monkeypatch):
    monkeypatch.setenv("FEDREC_WORKERS", "two")
    with pytest.raises(ConfigError, match="FEDREC_WORKERS must be an integer >= 1"):
        environment.workers()
    monkeypatch.setenv("FEDREC_WORKERS", "0")
    with pytest.raises(ConfigError, match="FEDREC_WORKERS"):
        environment.workers()
    monkeypatch.setenv("FEDREC_WORKERS", " 3 ")
    assert environment.workers() == 3
    monkeypatch.setenv("FEDREC_TORCH_THREADS", "-1")
    with pytest.raises(ConfigError, match="FEDREC_TORCH_THREADS"):
        environment.torch_threads()
    monkeypatch.delenv("FEDREC_TORCH_THREADS")
    assert environment.torch_threads() == 1
    monkeypatch.setenv("FEDREC_DATA", "/a:/b")
    assert environment.data_roots() == [Path("/a"), Path("/b")]
    monkeypatch.setenv("FEDREC_SAVE_MODEL", "0")
    assert not environment.save_model()
    monkeypatch.setenv("FEDREC_SAVE_MODEL", "1")
    assert environment.save_model()

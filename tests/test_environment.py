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


@pytest.mark.parametrize("mb", ["64", "0"])
def test_malloc_policy_keeps_large_temporaries_in_the_heap(mb):
    """FEDREC_MALLOC_MB (default 64): a 40 MB array allocated, filled and freed ten times
    page-faults once, not ten times (glibc maps and unmaps blocks over 32 MB by default: the
    page faults were a quarter of a dense paper-protocol round). 0 leaves glibc's policy."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's malloc only")
    code = """
import resource, numpy as np
from fedrec.runtime import configure_memory
applied = configure_memory()
np.ones(10_000_000, np.float32)  # the first one faults in any case
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    np.ones(10_000_000, np.float32)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**__import__("os").environ, "FEDREC_MALLOC_MB": mb}, check=True)
    applied, faults = out.stdout.split()
    # mapped afresh, each array faults at least once per 2 MB (transparent huge pages) and up
    # to once per 4 KB page: 200 to 97,700 faults for the ten; reused from the heap, none
    if mb == "0":
        assert applied == "False" and int(faults) >= 200, faults
    else:
        assert applied == "True" and int(faults) < 50, faults


def test_malloc_mb_is_validated(monkeypatch):
    monkeypatch.setenv("FEDREC_MALLOC_MB", "-1")
    with pytest.raises(ConfigError, match="FEDREC_MALLOC_MB"):
        environment.malloc_mb()
    monkeypatch.delenv("FEDREC_MALLOC_MB")
    assert environment.malloc_mb() == 64


@pytest.mark.parametrize("setting", ["unset", "64"])
def test_malloc_policy_grows_with_the_round(setting):
    """configure_memory(round_bytes): with FEDREC_MALLOC_MB unset, a round whose uploads
    need more than the default keeps 4x its bytes in the heap, never trimmed: a 100 MB
    array (a round of 40 MB) allocated, filled and freed ten times faults once; with the
    variable set (64) its value holds and the array is mapped afresh each time."""
    import os
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's malloc only")
    code = """
import resource, numpy as np
from fedrec.runtime import configure_memory
applied = configure_memory(40 * 1024 * 1024)
np.ones(25_000_000, np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    np.ones(25_000_000, np.float32)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    env = {k: v for k, v in os.environ.items() if k != "FEDREC_MALLOC_MB"}
    if setting != "unset":
        env["FEDREC_MALLOC_MB"] = setting
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=env, check=True)
    applied, faults = out.stdout.split()
    assert applied == "True"
    if setting == "unset":
        assert int(faults) < 50, faults
    else:
        assert int(faults) >= 500, faults  # 100 MB mapped ten times: >= 50 huge pages each


def test_round_upload_bytes():
    """round_upload_bytes: clients x rows x dim x 4, rows = every item for dense uploads,
    else (1 + neg_ratio) x the mean training history (at most every item)."""
    from types import SimpleNamespace as NS

    import numpy as np

    from fedrec.runtime import round_upload_bytes

    data = NS(n_items=1000, n_users=10, train_items=np.zeros(500))
    cfg = NS(train=NS(weight_decay_scope="touched", clients_per_round=4),
             data=NS(neg_ratio=1), model=NS(dim=8))
    assert round_upload_bytes(cfg, data) == 4 * 100 * 8 * 4
    cfg.train.weight_decay_scope = "all"
    assert round_upload_bytes(cfg, data) == 4 * 1000 * 8 * 4
    cfg.train.clients_per_round = 50  # at most every user
    assert round_upload_bytes(cfg, data) == 10 * 1000 * 8 * 4

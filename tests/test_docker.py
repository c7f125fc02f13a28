"""docker/ stays consistent with the code. No Docker daemon here, so the images are not built;
what can be checked statically is: the compose files are the generator's output, every device
container mounts only its own partition file, the Flower versions agree with the Flower the
tests run, the Dockerfile ships every package, and (where `docker compose` or `docker-compose`
is installed) that compose accepts the files."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import load_file_module

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
FILES = {"compose.yml": False, "compose.tls.yml": True}


def _generator():
    return load_file_module("docker/make_compose.py")


@pytest.mark.parametrize("name", FILES)
def test_committed_compose_files_are_the_generators_output(name):
    gen = _generator()
    text = (DOCKER / name).read_text()
    users = int(re.search(r"--users (\d+)", text).group(1))
    assert text == gen.compose(users, FILES[name]), f"regenerate docker/{name}"


@pytest.mark.parametrize("name", FILES)
def test_each_device_container_sees_only_its_own_partition(name):
    spec = yaml.safe_load((DOCKER / name).read_text())
    services = spec["services"]
    nodes = sorted(s for s in services if s.startswith("supernode-"))
    assert nodes
    for s in nodes:
        i = int(s.split("-")[1])
        cmd = services[s]["command"]
        conf = cmd[cmd.index("--node-config") + 1]
        assert f"partition-id={i} " in conf and f"num-partitions={len(nodes)}" in conf
        data_path = re.search(r'data-path="([^"]+)"', conf).group(1)
        app = services[f"clientapp-{i}"]  # runs the ClientApps of supernode-i
        assert app["command"][-1] == f"supernode-{i}:9094"
        mounts = app["volumes"]
        assert mounts == [f"../partitions/user-{i}.json:{data_path}:ro"]
        for other in services.values():  # nobody else mounts this user's file
            if other is not app:
                assert not any(f"user-{i}.json" in m for m in other.get("volumes", []))
        if FILES[name]:
            assert f"--auth-supernode-private-key=/fedrec/certificates/supernode-{i}" in cmd
            assert not any(m.startswith("../certificates:") for m in services[s]["volumes"])
    server = services["serverapp"]
    assert any(m.startswith("../partitions/public.json:") for m in server["volumes"])
    link = services["superlink"]["command"]
    assert ("--insecure" in link) != FILES[name]
    if FILES[name]:
        assert "--enable-supernode-auth" in link


def test_flower_versions_agree_with_the_tested_flower():
    from importlib.metadata import version

    gen = _generator()
    dockerfile = (DOCKER / "Dockerfile").read_text()
    arg = re.search(r"ARG FLWR_VERSION=(\S+)", dockerfile).group(1)
    assert arg == gen.FLWR_VERSION
    assert arg.split(".")[:2] == version("flwr").split(".")[:2], \
        f"images use Flower {arg}, the tests run {version('flwr')}"


def test_dockerfile_ships_every_package_and_the_experiments():
    import tomllib

    dockerfile = (DOCKER / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)\s", dockerfile, flags=re.M))
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    for pattern in include:
        assert pattern.rstrip("*") in copied, pattern
    assert "experiments" in copied and "pyproject.toml" in copied
    assert "torch==" in dockerfile and "download.pytorch.org/whl/cpu" in dockerfile


def _compose_cmd():
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        ok = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if ok.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.mark.parametrize("name", FILES)
def test_compose_accepts_the_files(name):
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    res = subprocess.run(cmd + ["-f", str(DOCKER / name), "config", "--quiet"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr

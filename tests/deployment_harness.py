"""Real Flower deployments for tests and benchmarks: a SuperLink, SuperNodes (one per user, each
from its exported partition file), `flwr run` against them; on loopback or on several "hosts"
(network namespaces joined by veth links to a bridge); plain, or with TLS and SuperNode
authentication (`scripts/make_certs.sh`).

Every process started here (and whatever it starts: SuperExec, ServerApp, ClientApps) runs in
a session of its own and is stopped by PID (`Processes.stop`); namespaces and links are removed
by `Hosts.close`. Used by tests/test_deployment.py and benchmarks/deployment.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BINARIES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr")


def bin_path(name: str) -> str | None:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else shutil.which(name)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if bin_path(b) is None]


_USED_PORTS: set[int] = set()


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` ports free now, below the kernel's ephemeral range (a port from bind(0) can be taken
    by another process's outgoing connection before the server binds it) and never handed out
    twice by this process."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random(os.getpid() * 7919 + time.monotonic_ns())
    out: list[int] = []
    while len(out) < n:
        port = rng.randrange(20000, max(20001, low))
        if port in _USED_PORTS:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _USED_PORTS.add(port)
        out.append(port)
    return out


# ---------------------------------------------------------------------------- processes


def proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, session id, state) for every process (Linux /proc)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(d.name)] = (int(fields[1]), int(fields[3]), fields[0])
    return out


def descendants(roots: set[int]) -> set[int]:
    table = proc_table()
    out = set(roots)
    todo = list(roots)
    while todo:
        parent = todo.pop()
        for pid, (ppid, _, _) in table.items():
            if ppid == parent and pid not in out:
                out.add(pid)
                todo.append(pid)
    return out


def alive(ours: set[int]) -> list[int]:
    return [pid for pid, (_, sid, state) in proc_table().items()
            if (pid in ours or sid in ours) and state != "Z" and pid != os.getpid()]


def kill_tree(pids: set[int], grace: float = 5.0):
    """SIGTERM, then SIGKILL, every process in `pids` or in a session one of them leads."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = alive(pids)
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = alive(pids)


class Processes:
    """Processes started here, each in a session of its own; `stop()` ends them and everything
    they started, also what was re-parented meanwhile. By PID only."""

    def __init__(self, logs: Path):
        self.logs = Path(logs)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.seen: set[int] = set()  # every process that was ever ours (for the final check)
        self.killed: set[int] = set()  # pids stopped on purpose by `kill`

    def start(self, name: str, cmd: list[str], env: dict, cwd: Path) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "a")
        proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        return proc

    def ours(self) -> set[int]:
        self.seen |= descendants({p.pid for _, p in self.procs})
        return set(self.seen)

    def kill(self, name: str, sig=signal.SIGKILL):
        """Kill one process (by the name it was started under) and everything it started,
        as a machine losing power would: no clean shutdown."""
        procs = [p for n, p in self.procs if n == name and p.poll() is None]
        tree = descendants({p.pid for p in procs})
        self.seen |= tree
        self.killed |= {p.pid for p in procs}
        for pid in tree:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait(timeout=10)

    def stop(self):
        ours = self.ours()  # collected before anything is re-parented
        for _, p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 10
        for _, p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        kill_tree(ours)
        for _, p in self.procs:  # reap
            try:
                p.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass

    def log_text(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def tail(self, n: int = 2500) -> str:
        return "\n".join(f"---- {name} ----\n{self.log_text(name)[-n:]}"
                         for name in dict(self.procs))


# ---------------------------------------------------------------------------- hosts


class Hosts:
    """Several hosts on one machine: a network namespace per host, each joined to one bridge
    by a veth link, with an address on 10.<a>.<b>.0/24; the test process reaches them through
    the bridge's address (.254). `prefix(host)` is the command prefix that runs a program on
    that host. Needs root (CAP_NET_ADMIN) and `ip`; `available()` says whether it works here.
    """

    def __init__(self, names: list[str]):
        tag = f"{os.getpid() % 100000:05d}"
        self.tag = tag
        self.bridge = f"frb{tag}"
        self.subnet = f"10.{200 + int(tag) % 50}.{int(tag) % 250}"
        self.names = list(names)
        self.ns = {h: f"fedrec{tag}-{h}" for h in names}
        self.ip = {h: f"{self.subnet}.{i + 1}" for i, h in enumerate(names)}
        self.gateway = f"{self.subnet}.254"
        self._made: list[tuple[str, str]] = []

    @staticmethod
    def available() -> str | None:
        """None if namespaces can be made here, else why not (one line)."""
        if shutil.which("ip") is None:
            return "the `ip` command is missing"
        name = f"fedrecprobe{os.getpid() % 100000}"
        res = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
        if res.returncode != 0:
            return f"cannot create a network namespace: {res.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        return None

    def _ip(self, *args, ns: str | None = None):
        cmd = ["ip"] + (["-n", ns] if ns else []) + list(args)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")

    def open(self) -> "Hosts":
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        self._ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        for i, h in enumerate(self.names):
            ns, outer, inner = self.ns[h], f"fv{self.tag}{i}", f"fp{self.tag}{i}"
            self._ip("netns", "add", ns)
            self._made.append(("netns", ns))
            self._ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            self._made.append(("link", outer))
            self._ip("link", "set", inner, "netns", ns)
            self._ip("link", "set", outer, "master", self.bridge, "up")
            self._ip("addr", "add", f"{self.ip[h]}/24", "dev", inner, ns=ns)
            self._ip("link", "set", inner, "up", ns=ns)
            self._ip("link", "set", "lo", "up", ns=ns)
        return self

    def prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host]]

    def close(self):
        for kind, name in reversed(self._made):
            args = ["netns", "del", name] if kind == "netns" else ["link", "del", name]
            subprocess.run(["ip", *args], capture_output=True)
        self._made.clear()

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------- the federation


def wait_healthy(proc: subprocess.Popen, url: str, what: str, cafile: str | None = None,
                 timeout: float = 60):
    ctx = ssl.create_default_context(cafile=cafile) if url.startswith("https") else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=0.5, context=ctx) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not answer on {url} within {timeout:.0f}s")


class Federation:
    """A SuperLink and its SuperNodes, started as separate processes (optionally each on its
    own host of `hosts`), with TLS (`certs`: a scripts/make_certs.sh folder) and SuperNode
    authentication (`auth`, needs TLS) when asked.

    `link_host`, `node_host(i)`: host names in `hosts` (None: loopback).
    `env`: extra environment for every process (FEDREC_CACHE, ...); `node_env(i)` per node.
    """

    def __init__(self, work: Path, *, certs: Path | None = None, auth: bool = False,
                 hosts: Hosts | None = None, link_host: str | None = None, env: dict | None = None):
        if auth and certs is None:
            raise ValueError("SuperNode authentication needs TLS (certs)")
        self.work = Path(work)
        self.certs = None if certs is None else Path(certs)
        self.auth = auth
        self.hosts = hosts
        self.link_host = link_host
        self.procs = Processes(self.work / "logs")
        self.cwd = self.work / "cwd"  # the processes' working directory: nothing of the project
        self.cwd.mkdir(parents=True, exist_ok=True)
        bindir = str(Path(bin_path("flwr")).parent)
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("FLWR_", "FEDREC_", "RAY_"))}
        base.update({"PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
                     "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"})
        base.update(env or {})
        self.base_env = base
        if hosts is None:
            self.link_address = "127.0.0.1"
            self.link_port = free_ports(1)[0]
        else:
            self.link_address = hosts.ip[link_host]
            self.link_port = 8000  # a host of its own: the default port is free
        self.node_names: dict[int, str] = {}

    # --- helpers
    def _env(self, name: str, extra: dict | None = None) -> dict:
        home = self.work / "homes" / name
        home.mkdir(parents=True, exist_ok=True)
        return {**self.base_env, **(extra or {}), "FLWR_HOME": str(home)}

    def _on(self, host: str | None, cmd: list[str]) -> list[str]:
        return cmd if host is None or self.hosts is None else self.hosts.prefix(host) + cmd

    @property
    def address(self) -> str:
        return f"{self.link_address}:{self.link_port}"

    def _security(self) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        return ["--root-certificates", str(self.certs / "ca.crt")]

    # --- the SuperLink
    def start_superlink(self):
        cmd = [bin_path("flower-superlink"), "--host",
               "127.0.0.1" if self.hosts is None else "0.0.0.0", "--port", str(self.link_port),
               "--disable-runtime-dependency-installation",
               "--database", str(self.work / "superlink.db")]
        if self.certs is None:
            cmd.append("--insecure")
        else:
            cmd += ["--ssl-ca-certfile", str(self.certs / "ca.crt"),
                    "--ssl-certfile", str(self.certs / "superlink.crt"),
                    "--ssl-keyfile", str(self.certs / "superlink.key")]
        if self.auth:
            cmd.append("--enable-supernode-auth")
        link = self.procs.start("superlink", self._on(self.link_host, cmd),
                                self._env("superlink"), self.cwd)
        scheme = "http" if self.certs is None else "https"
        wait_healthy(link, f"{scheme}://{self.address}/health", "flower-superlink",
                     cafile=None if self.certs is None else str(self.certs / "ca.crt"))
        self.write_cli_config()
        return link

    def write_cli_config(self):
        """The `flwr` CLI's connection table, connection `deployment`."""
        home = self.work / "homes" / "cli"
        home.mkdir(parents=True, exist_ok=True)
        conn = f'[superlink.deployment]\naddress = "{self.address}"\n'
        conn += ('insecure = true\n' if self.certs is None
                 else f'root-certificates = "{self.certs / "ca.crt"}"\n')
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n\n' + conn)

    def cli_env(self) -> dict:
        return {**self.base_env, "FLWR_HOME": str(self.work / "homes" / "cli")}

    def register(self, public_key: Path) -> subprocess.CompletedProcess:
        """`flwr supernode register KEY deployment` (node authentication)."""
        return subprocess.run([bin_path("flwr"), "supernode", "register", str(public_key),
                               "deployment"], cwd=str(self.cwd), env=self.cli_env(),
                              capture_output=True, text=True, timeout=60)

    # --- SuperNodes
    def start_supernode(self, name: str, node_config: str, *, host: str | None = None,
                        key: Path | None = None, root_certificates: bool = True,
                        env: dict | None = None, max_retries: int | None = None):
        cmd = [bin_path("flower-supernode"), "--superlink", self.address,
               "--node-config", node_config, "--port", "9094" if host else str(free_ports(1)[0])]
        if self.certs is None:
            cmd.append("--insecure")
        elif root_certificates:
            cmd += ["--root-certificates", str(self.certs / "ca.crt")]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        if max_retries is not None:
            cmd += ["--max-retries", str(max_retries)]
        return self.procs.start(name, self._on(host, cmd), self._env(name, env), self.cwd)

    # --- flwr run
    def flwr_run(self, run_config: str, timeout: float, on_line=None):
        """`flwr run . deployment --stream` from the project root; every output line is passed
        to `on_line(line)` as it arrives (to act mid-run). Returns (exit code, output); the
        exit code is None when it timed out or the SuperLink or a SuperNode exited meanwhile
        (other than by `Processes.kill`)."""
        proc = subprocess.Popen([bin_path("flwr"), "run", str(ROOT), "deployment", "--stream",
                                 "--run-config", run_config], cwd=str(ROOT), env=self.cli_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        lines: list[str] = []

        def pump():
            for line in proc.stdout:
                lines.append(line)
                if on_line is not None:
                    try:
                        on_line(line)
                    except Exception as e:  # noqa: BLE001 - reported with the output
                        lines.append(f"[harness] on_line failed: {e!r}\n")

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            dead = [n for n, p in self.procs.procs
                    if p.poll() is not None and p.pid not in self.procs.killed
                    and n.startswith(("superlink", "supernode"))]
            if dead or time.monotonic() > deadline:
                kill_tree({proc.pid})
                reader.join(5)
                why = f"exited: {', '.join(dead)}" if dead else f"no result in {timeout:.0f}s"
                return None, "".join(lines) + f"\n[harness] flwr run stopped: {why}\n"
            time.sleep(0.5)
        reader.join(10)
        return proc.returncode, "".join(lines)

    def stop(self):
        self.procs.stop()

"""The package's layering, from its import graph (every import statement, lazy ones included).

Floors, from the bottom (README, "Layout"): a module imports only from its own floor or below,
and no set of modules imports itself around a cycle. Defense code (strategies/) never reaches,
even transitively, a module that knows the ground truth or runs clients.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedrec", "clients", "strategies")

# module-name prefix -> floor (the longest matching prefix wins)
FLOORS = {
    # 0: the core: configuration, data, models, the upload format, results, numerics
    "fedrec": 0, "fedrec.errors": 0, "fedrec.config": 0, "fedrec.data": 0, "fedrec.models": 0,
    "fedrec.protocol": 0, "fedrec.results": 0, "fedrec.optim": 0, "fedrec.runtime": 0,
    "fedrec.environment": 0, "fedrec.fuzz": 0, "fedrec.paper": 0,
    # 1: the parts: devices, defenses, ground truth and scoring, the name registry
    "clients": 1, "strategies": 1, "fedrec.evaluation": 1, "fedrec.roles": 1, "fedrec.registry": 1,
    # 2: the simulation-only adversary hook (hands colluding attacks their knowledge)
    "fedrec.adversary": 2,
    # 3: the one place that turns a config into data, model, clients and strategy
    "fedrec.build": 3,
    # 4: the runners and their tools
    "fedrec.engine": 4, "fedrec.workers": 4, "fedrec.parallel": 4, "fedrec.ledger": 4, "fedrec.checkpoint": 4,
    "fedrec.client_app": 4, "fedrec.flower_nodes": 4,
    "fedrec.server_app": 4, "fedrec.detector_tools": 4, "fedrec.report": 4, "fedrec.plots": 4,
    "fedrec.grid": 4, "fedrec.partition": 4, "fedrec.reproduce": 4, "fedrec.reproduce_docs": 4,
    "fedrec.reproduce_format": 4, "fedrec.run_cost": 4,
    # the privacy attack (fedrec/privacy): the server's recorder, the simulator, the inversion,
    # baselines, scoring and countermeasures sit with the parts; its runner and sweeps with the
    # runners (tests/test_privacy.py also checks that the attack never reaches ground truth)
    "fedrec.privacy": 4, "fedrec.privacy.observer": 1, "fedrec.privacy.simulator": 1,
    "fedrec.privacy.inversion": 1, "fedrec.privacy.baselines": 1, "fedrec.privacy.metrics": 1,
    "fedrec.privacy.countermeasures": 1, "fedrec.privacy.replay": 1,
    # 5: the command line
    "fedrec.cli": 5, "fedrec.cli_grid": 5, "fedrec.__main__": 5,
}

# what defense code must never reach: ground truth, the clients, the runners, and the registry
# (it loads client classes by name)
GROUND_TRUTH = ("fedrec.roles", "fedrec.adversary", "fedrec.evaluation", "fedrec.build",
                "fedrec.registry", "fedrec.engine", "fedrec.parallel", "fedrec.server_app",
                "fedrec.client_app", "fedrec.detector_tools", "fedrec.grid", "clients")


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (root / pkg).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in its body)."""
    mods = modules(root)

    def resolve(name: str):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                # `from pkg import module` names a module; `from module import name` does not
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            else:
                continue
            deps.update(r for r in map(resolve, targets) if r)
        deps.discard(name)
        graph[name] = deps
    return graph


def floor(module: str) -> int:
    best = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)
    return FLOORS[best]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for d in graph[todo.pop()]:
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself: an import inside a function, a relative import and a cycle."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "fedrec" / "a.py").write_text("def f():\n    from fedrec.b import g\n")
    (tmp_path / "fedrec" / "b.py").write_text("from . import a\nimport strategies.c\n")
    (tmp_path / "strategies" / "c.py").write_text("from fedrec.roles import x\n")
    (tmp_path / "fedrec" / "roles.py").write_text("")
    g = import_graph(tmp_path)
    assert g["fedrec.a"] == {"fedrec.b"} and g["fedrec.b"] == {"fedrec.a", "strategies.c"}
    assert cycles(g) == [["fedrec.a", "fedrec.b"]]
    assert "fedrec.roles" in reachable(g, "fedrec.b")


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_every_module_has_a_floor_and_imports_only_downwards():
    graph = import_graph()
    upward = [f"{m} (floor {floor(m)}) imports {d} (floor {floor(d)})"
              for m, deps in sorted(graph.items()) for d in sorted(deps) if floor(d) > floor(m)]
    assert upward == []


def test_defenses_never_reach_ground_truth_even_transitively():
    graph = import_graph()
    for module in sorted(m for m in graph if m.startswith("strategies")):
        bad = sorted(d for d in reachable(graph, module) if d.startswith(GROUND_TRUTH))
        assert bad == [], f"{module} reaches {bad}"
    for path in (ROOT / "strategies").glob("*.py"):
        assert "is_malicious" not in path.read_text(), path.name

"""Shared test helpers."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_file_module(relpath: str, name: str | None = None):
    """A script, benchmark or generator of the repository (not a package), imported from its
    path relative to the repository root."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def engine_run_capturing_arrays(cfg, out_root, monkeypatch):
    """fedrec.engine.run_experiment on `cfg`, also returning the final global arrays."""
    import fedrec.engine as engine_mod

    captured = {}

    class Capture(engine_mod.Engine):
        def run(self, save_checkpoint=None, **kw):
            out = super().run(save_checkpoint, **kw)
            captured["arrays"] = [a.copy() for a in self.strategy.global_arrays()]
            return out

    monkeypatch.setattr(engine_mod, "Engine", Capture)
    summary = engine_mod.run_experiment(cfg, output_root=out_root, progress=False, force=True)
    return summary, captured["arrays"]


def tiny_cfg(tmp_path, **over):
    """A small synthetic experiment; keyword `a__b=v` sets raw["a"]["b"] = v."""
    from fedrec.config import from_dict

    raw = {"name": "tiny",
           "data": {"synthetic": {"n_users": 60, "n_items": 80, "mean_history": 12},
                    "cache_dir": str(tmp_path / "cache")},
           "model": {"dim": 8}, "train": {"rounds": 6, "clients_per_round": 10},
           "server": {"lr": 0.01}, "eval": {"every": 2}, "output": {"progress": False}}
    for k, v in over.items():
        *path, last = k.split("__")
        d = raw
        for p in path:
            d = d.setdefault(p, {})
        d[last] = v
    return from_dict(raw)

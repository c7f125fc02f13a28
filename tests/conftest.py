"""Shared test helpers."""


def engine_run_capturing_arrays(cfg, out_root, monkeypatch):
    """fedrec.engine.run_experiment on `cfg`, also returning the final global arrays."""
    import fedrec.engine as engine_mod

    captured = {}

    class Capture(engine_mod.Engine):
        def run(self):
            out = super().run()
            captured["arrays"] = [a.copy() for a in self.strategy.global_arrays()]
            return out

    monkeypatch.setattr(engine_mod, "Engine", Capture)
    summary = engine_mod.run_experiment(cfg, output_root=out_root, progress=False, force=True)
    return summary, captured["arrays"]

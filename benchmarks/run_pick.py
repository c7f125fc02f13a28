"""One run of an experiment YAML for the benchmarks, a grid file's included.

    --run defense=union+multikrum --run attacker=lie --run seed=0

picks the grid run whose labels (its output name, `name[seed=0,defense=...,attacker=...]`)
include every KEY=VALUE given, so a paper table's cell is profiled or timed as it runs in
`fedrec reproduce`, without copying its YAML. A file without a grid needs no --run.
"""

from __future__ import annotations

import re


def run_labels(cfg) -> set:
    """The KEY=VALUE labels of a grid run (empty for a single run)."""
    m = re.search(r"\[(.*)\]", cfg.output.name or "")
    return set(m.group(1).split(",")) if m else set()


def load_run(path, overrides: list, picks: list):
    """The one run of `path` (with `overrides`) whose labels include every pick; a
    ConfigError (the scripts' one-line error) naming the labels when none or several match."""
    from fedrec import config
    from fedrec.errors import ConfigError

    cfgs = config.load(path, overrides)
    hits = [c for c in cfgs if set(picks) <= run_labels(c)]
    if len(hits) == 1:
        return hits[0]
    example = ",".join(sorted(run_labels(cfgs[0]))) or "(a single run: no --run)"
    raise ConfigError(f"{path}: --run {' --run '.join(picks) or '(none)'} matches {len(hits)} "
                      f"of its {len(cfgs)} runs; give KEY=VALUE labels that pick one, e.g. "
                      f"{example}")

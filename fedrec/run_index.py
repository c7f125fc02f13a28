"""Where a table's runs are found besides its own output folder: another table's run of the same
computation (`shared_runs`), or the results archive's (`archived_runs`, fedrec.archive).

A run is matched by `computation_digest`: its config digest without the name (and without
UNION's own settings where no UNION filter reads them), so one seed gives one result whichever
table or session made it.
"""

from __future__ import annotations

from pathlib import Path

from fedrec.errors import FedRecError

UNION_KEYS = ("union_sample_items", "union_gap_b", "union_expected_attackers", "union_device")


def computation_digest(cfg) -> str:
    """What a run computes, as a digest: its config digest with the name left out and, where no
    UNION filter runs, UNION's own settings at their defaults (nothing else reads them). Two
    runs with the same computation digest give the same results (one seed, one result), so one
    table may take another's run: UNION's Table 3 and ClusterAttack's Table 1 share their
    undefended runs."""
    from fedrec.config_load import from_dict
    from fedrec.config_schema import ServerConfig

    d = cfg.to_dict()
    d["name"] = ""
    if "union" not in cfg.server.filter_steps():
        for key in UNION_KEYS:
            d["server"][key] = getattr(ServerConfig(), key)
    if cfg.train.contrastive_alpha == 0:  # no contrastive term: its dropout reads nothing
        d["train"]["contrastive_dropout"] = 0.0
    return from_dict(d, cfg.base_dir).digest()


_RUN_DIGESTS: dict = {}  # run dir -> (summary.json mtime, computation digest or None)


def _complete_runs_by_computation(root: str) -> dict:
    """computation_digest -> run directory, over the complete runs of every table under root
    (root/TABLE/RUN), read from each run's config.yaml (each config parsed once per process,
    again when its summary changes)."""
    from fedrec.config_load import from_dict, read_yaml
    from fedrec.results import is_complete

    index: dict = {}
    for run in sorted(Path(root).glob("*/*/summary.json")):
        run = run.parent
        try:
            stamp = (run / "summary.json").stat().st_mtime_ns
        except OSError:
            continue
        cached = _RUN_DIGESTS.get(str(run))
        if cached is None or cached[0] != stamp:
            digest = None
            if (run / "config.yaml").is_file() and is_complete(run):
                try:
                    digest = computation_digest(from_dict(read_yaml(run / "config.yaml")))
                except FedRecError:  # a run of an older schema: not shared
                    digest = None
            cached = _RUN_DIGESTS[str(run)] = (stamp, digest)
        if cached[1] is not None:
            index.setdefault(cached[1], run)
    return index


def shared_runs(cfgs, dirs) -> dict:
    """{grid index: another table's complete run of the same computation} for every run of
    this grid not complete in its own directory (looked for beside the table's output dir)."""
    from fedrec.results import is_complete

    missing = [i for i, d in enumerate(dirs) if not is_complete(d)]
    if not missing:
        return {}
    index = _complete_runs_by_computation(str(Path(dirs[0]).resolve().parent.parent))
    own = Path(dirs[0]).resolve().parent
    out = {}
    for i in missing:
        hit = index.get(computation_digest(cfgs[i]))
        if hit is not None and hit.resolve().parent != own:
            out[i] = hit
    return out


def archived_runs(cfgs, dirs, archive) -> dict:
    """{grid index: the archive's run of the same computation} for every run of this grid not
    complete in `dirs` (archive: the folder `fedrec archive` writes; None: none)."""
    from fedrec.results import is_complete

    if archive is None or not Path(archive).is_dir():
        return {}
    missing = [i for i, d in enumerate(dirs) if not is_complete(d)]
    if not missing:
        return {}
    index = _complete_runs_by_computation(str(archive))
    return {i: index[k] for i in missing if (k := computation_digest(cfgs[i])) in index}

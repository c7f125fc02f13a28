"""Device partitions: what one device may know, written per user, and loaded without the data set.

`fedrec partition export EXPERIMENT.yaml OUT_DIR` prepares the experiment's data once (on the
operator's machine) and writes:

- `OUT_DIR/user-<u>.json`, one per user, exactly what device `u` may know (format
  `fedrec-partition/1`):

      {"format": "fedrec-partition/1", "experiment": "<name>", "digest": "<config digest>",
       "user": u, "train": [item ids, history order], "val": [0 or 1 id], "test": [ids],
       "attacker_pool": bool, "malicious": bool,
       "item_popularity": [counts]}   # only in a malicious user's file (the attacker's
                                      # public side information: interaction counts)

  Item ids are the experiment's remapped ids (0..n_items-1), as the server's item table uses.
- `OUT_DIR/public.json`: the public experiment description the server needs instead of the
  data set: the config digest, the number of users (= SuperNodes) and items, the data summary
  of `fedrec.data.prepare.PreparedData.summary` (counts only), the experiment name.

A SuperNode started with `--node-config "partition-id=u num-partitions=N data-path=.../user-u.json"`
builds its client from that file alone (`device_data`): its view of the experiment holds no
other user's interactions, held-out items or role. The number of items comes from the server
(the `n_items` every fit and evaluate message carries), the experiment from the FAB (the run
config's `experiment`), the number of users from `num-partitions`. The ServerApp started with
the run config `public-info=".../public.json"` builds its strategy from that file and never
loads the data set either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from fedrec.data.prepare import PreparedData
from fedrec.errors import ConfigError

FORMAT = "fedrec-partition/1"
PUBLIC = "public.json"


def user_file(out_dir, user: int) -> Path:
    return Path(out_dir) / f"user-{int(user)}.json"


def user_record(cfg, data: PreparedData, user: int, malicious: bool) -> dict:
    """Device `user`'s file: its own interactions, held-out items and role, nothing else."""
    val = int(data.val_item[user])
    rec = {
        "format": FORMAT, "experiment": cfg.name, "digest": cfg.digest(), "user": int(user),
        "train": [int(i) for i in data.train_of(user)],
        "val": [val] if val >= 0 else [],
        "test": [int(i) for i in data.test_of(user)],
        "attacker_pool": bool(data.pool_mask[user]), "malicious": bool(malicious),
    }
    if malicious:  # public side information of the threat model, not another user's data
        rec["item_popularity"] = [int(c) for c in data.item_popularity]
    return rec


def public_record(cfg, data: PreparedData) -> dict:
    return {"format": FORMAT, "experiment": cfg.name, "digest": cfg.digest(),
            "n_users": int(data.n_users), "n_items": int(data.n_items),
            "data": data.summary()}


def export_partitions(cfg, out_dir, progress=None) -> dict:
    """Write every user's file and public.json under `out_dir`; returns public.json's record."""
    from fedrec.build import build_env, malicious_set

    env = build_env(cfg)
    data = env.data
    bad = malicious_set(env)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for u in range(data.n_users):
        _write_json(user_file(out, u), user_record(cfg, data, u, u in bad))
        if progress is not None and (u + 1) % 1000 == 0:
            progress(u + 1, data.n_users)
    public = public_record(cfg, data)
    _write_json(out / PUBLIC, public)
    return public


def _write_json(path: Path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":")))
    os.replace(tmp, path)


def _read_json(path, what: str) -> dict:
    p = Path(os.path.expandvars(os.path.expanduser(str(path))))
    try:
        rec = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {p}: no such file (write it with `fedrec partition export`)")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what} {p}: not readable as JSON ({e})")
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise ConfigError(f"{what} {p}: not a {FORMAT} file")
    return rec


def _ids(rec: dict, key: str, n_items: int, path) -> np.ndarray:
    ids = np.asarray(rec.get(key, []), dtype=np.int64).reshape(-1)
    if len(ids) and (ids.min() < 0 or ids.max() >= n_items):
        raise ConfigError(f"{path}: {key} holds item ids outside [0, {n_items}): exported from "
                          "another data set?")
    return ids


def read_user(path, cfg, user: int) -> dict:
    """A device's file, checked against the experiment it runs and its partition-id."""
    rec = _read_json(path, "data-path")
    if rec.get("digest") != cfg.digest():
        raise ConfigError(f"data-path {path}: exported for experiment digest {rec.get('digest')}, "
                          f"but this run's is {cfg.digest()} (re-export with the run's YAML and "
                          "overrides)")
    if int(rec.get("user", -1)) != int(user):
        raise ConfigError(f"data-path {path}: holds user {rec.get('user')}, but this SuperNode "
                          f"is partition-id {user}")
    return rec


def device_data(rec: dict, n_users: int, n_items: int, path="") -> PreparedData:
    """The experiment's data as one device sees it: its own rows; every other user has no
    interactions, no held-out items and is outside the attacker pool (their arrays exist only
    so the client code indexes them as it does in a simulation)."""
    user = int(rec["user"])
    if not 0 <= user < n_users:
        raise ConfigError(f"data-path {path}: user {user} is outside [0, {n_users})")
    train = _ids(rec, "train", n_items, path)
    val = _ids(rec, "val", n_items, path)
    test = _ids(rec, "test", n_items, path)
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    indptr[user + 1:] = len(train)
    val_item = np.full(n_users, -1, dtype=np.int64)
    test_item = np.full(n_users, -1, dtype=np.int64)
    if len(val):
        val_item[user] = val[0]
    if len(test):
        test_item[user] = test[0]
    test_indptr = test_items = None
    if len(test) > 1:  # a fixed split with every test item kept
        test_indptr = np.zeros(n_users + 1, dtype=np.int64)
        test_indptr[user + 1:] = len(test)
        test_items = test
    popularity = np.asarray(rec.get("item_popularity", np.zeros(n_items)), dtype=np.int64)
    if len(popularity) != n_items:
        raise ConfigError(f"data-path {path}: item_popularity has {len(popularity)} entries, "
                          f"the server's table {n_items} rows")
    pool = np.array([user] if rec.get("attacker_pool") else [], dtype=np.int64)
    return PreparedData(
        n_users=int(n_users), n_items=int(n_items), train_indptr=indptr, train_items=train,
        val_item=val_item, test_item=test_item, attacker_pool=pool, item_popularity=popularity,
        split_kind="device", name=str(rec.get("experiment", "device")),
        test_indptr=test_indptr, test_items=test_items)


def read_public(path, cfg) -> dict:
    rec = _read_json(path, "public-info")
    if rec.get("digest") != cfg.digest():
        raise ConfigError(f"public-info {path}: exported for experiment digest "
                          f"{rec.get('digest')}, but this run's is {cfg.digest()}")
    return rec


class PublicData:
    """What the server of a deployment knows of the data: counts, from public.json."""

    def __init__(self, rec: dict):
        self.n_users = int(rec["n_users"])
        self.n_items = int(rec["n_items"])
        self._summary = dict(rec.get("data", {}))

    def summary(self) -> dict:
        return dict(self._summary)

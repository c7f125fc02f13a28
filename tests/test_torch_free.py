"""MF's and NCF's client training path runs without torch: a deployment's ClientApp is a fresh process per message,
and importing torch there cost 1.5-3.5 s of CPU per message. The numpy path gives the same bits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _torch_segment_sum(index, rows, n):
    import torch

    total = torch.zeros((n, rows.shape[1]), dtype=torch.float32)
    total.index_add_(0, torch.from_numpy(index), torch.from_numpy(rows))
    return total.numpy()


@pytest.mark.parametrize("n_rows,n_segments", [(0, 3), (1, 1), (7, 2), (500, 40), (3000, 2900)])
def test_numpy_segment_add_is_torch_index_add_bit_for_bit(n_rows, n_segments):
    from fedrec.models.base import _segment_add_numpy

    rng = np.random.default_rng(n_rows)
    index = rng.integers(0, n_segments, n_rows).astype(np.int64)
    # float32 sums depend on the order: large and small magnitudes, and signed zeros
    rows = (rng.standard_normal((n_rows, 5)) * 10.0 ** rng.integers(-6, 6, (n_rows, 1)))
    rows = rows.astype(np.float32)
    rows[::7] = -0.0
    expected = _torch_segment_sum(index, rows, n_segments)
    got = np.zeros((n_segments, 5), np.float32)
    _segment_add_numpy(got, index, rows)
    assert got.tobytes() == expected.tobytes()  # bits, signed zeros included


def test_numpy_segment_add_depends_on_the_order():
    """The layered adds keep j order within a segment: a reversed order changes the bits."""
    from fedrec.models.base import _segment_add_numpy

    rows = np.array([[1e8], [1.0], [-1e8], [1.0]], np.float32)
    index = np.zeros(4, np.int64)
    got = np.zeros((1, 1), np.float32)
    _segment_add_numpy(got, index, rows)
    assert got[0, 0] == np.float32(1.0)  # ((1e8 + 1) - 1e8) + 1 in float32
    rev = np.zeros((1, 1), np.float32)
    _segment_add_numpy(rev, index, rows[::-1].copy())
    assert rev[0, 0] == np.float32(0.0)  # ((1 - 1e8) + 1) + 1e8


_FIT = r"""
import json, sys
if sys.argv[1] == "torch":
    import torch  # noqa: F401  (the in-process engine's situation: torch loaded)
import numpy as np
from fedrec.runtime import configure_threads
configure_threads()  # as the ClientApp does before it builds anything
from clients.benign import BenignClient
from clients.state import DictStore
from fedrec.build import build_env, initial_arrays
from fedrec.config import from_dict

cfg = from_dict({"data": {"synthetic": {"n_users": 40, "n_items": 90, "mean_history": 14},
                          "cache_dir": sys.argv[2], "neg_ratio": 2},
                 "model": {"name": sys.argv[3], "dim": 8, "dropout": 0.2, "mlp_layers": [16, 8]},
                 "train": {"weight_decay": 1e-3}})
env = build_env(cfg)
arrays = initial_arrays(cfg, env.model)
out = []
for user in range(6):
    store = DictStore()
    for rnd in (1, 2):
        up, n, metrics = BenignClient(user, env, store).fit(arrays, {"round": rnd})
        out.append([a.tobytes().hex() for a in up] + [n])
print(json.dumps({"torch_loaded": "torch" in sys.modules, "uploads": out}))
"""


@pytest.mark.parametrize("model", ["mf", "ncf"])
def test_a_client_fits_without_torch_and_uploads_the_same_bits(tmp_path, model):
    runs = {}
    for mode in ("numpy", "torch"):
        res = subprocess.run([sys.executable, "-c", _FIT, mode, str(tmp_path / "cache"), model],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        runs[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    assert runs["numpy"]["torch_loaded"] is False  # the client path never imported torch
    assert runs["torch"]["torch_loaded"] is True
    assert runs["numpy"]["uploads"] == runs["torch"]["uploads"]
    assert len(runs["numpy"]["uploads"]) == 12


def test_thread_settings_reach_torch_without_importing_it():
    """configure_threads before torch is loaded: torch, imported later, takes one thread."""
    code = ("import sys\nfrom fedrec.runtime import configure_threads\nconfigure_threads()\n"
            "loaded = 'torch' in sys.modules\nimport torch\n"
            "print(loaded, torch.get_num_threads())")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={k: v for k, v in os.environ.items()
                                           if k not in ("OMP_NUM_THREADS", "FEDREC_TORCH_THREADS")})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["False", "1"]

"""PipAttack's crafting parameters: the optimiser (a hand-computed first step) and alpha's
scale (the paper's joint objective)."""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.errors import ConfigError
from test_pipattack import _attack_env


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_crafting_optimizer_first_step_on_a_hand_computed_case(optimizer):
    """MF, L_exp only, one step from g~ = 0: the gradient of -log sigmoid(u . (v - eta g~)) at 0
    is eta (1 - sigmoid(u . v)) u; SGD steps -lr times it, Adam's first step is -lr * sign (so
    the lookahead row v - eta g~ moves along u: the target's score rises)."""
    from types import SimpleNamespace

    from clients.malicious.pipattack import craft

    u = np.array([0.5, -1.0, 2.0], np.float32)
    V = np.array([[0.2, 0.1, -0.3], [1.0, 0.0, 0.0]], np.float32)  # row 1: the target
    g0 = np.zeros((2, 3), np.float32)
    g0[0] = [0.01, 0.02, 0.03]
    lr, eta = 0.01, 0.5
    rows, _ = craft(SimpleNamespace(name="mf"), u, V, [], g0, [], [1], None, 0.0, 0.0, True,
                    False, False, eta, 1, lr, optimizer=optimizer)
    grad = eta * (1 - 1 / (1 + np.exp(-u @ V[1]))) * u
    want = -lr * grad if optimizer == "sgd" else -lr * np.sign(grad)
    np.testing.assert_allclose(rows[1], want, rtol=1e-4)
    assert np.array_equal(rows[0], g0[0])  # not a target: the honest row


def test_unknown_crafting_optimizer_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="attack.params.optimizer"):
        _attack_env(tmp_path, "pipattack", attack__params={"optimizer": "lbfgs"})



def test_joint_alpha_scale_divides_alpha_by_the_number_of_malicious_users(tmp_path):
    """The paper's L_exp sums over all |U_mal| malicious users, L_pop is one term: a client's
    share of alpha L_pop is alpha / |U_mal|."""
    from fedrec.build import build_client
    from fedrec.roles import n_malicious
    from clients.state import DictStore

    cfg, env, user = _attack_env(tmp_path, "pipattack", attack__params={"alpha": 60.0})
    cfg_j, env_j, _ = _attack_env(tmp_path, "pipattack",
                                  attack__params={"alpha": 60.0, "alpha_scale": "joint"})
    m = n_malicious(cfg_j, env_j.data.n_users)
    assert m > 1
    a = build_client(env, user, DictStore()).weights()
    b = build_client(env_j, user, DictStore()).weights()
    assert a[0] == 60.0 and b[0] == pytest.approx(60.0 / m) and a[1:] == b[1:]
    with pytest.raises(ConfigError, match="attack.params.alpha_scale"):
        _attack_env(tmp_path, "pipattack", attack__params={"alpha_scale": "sum"})

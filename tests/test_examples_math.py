"""The closed forms of examples/quadratic_lr_regimes.py and
examples/saddle_escape.py, checked against short keras_ssam runs.

    KERAS_BACKEND=jax python -m pytest tests/test_examples_math.py -q   # or tensorflow, torch
"""

import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))

import quadratic_lr_regimes as quad  # noqa: E402
import saddle_escape as saddle  # noqa: E402

EIG = (2.0, 1.0, 0.5)
RHO = 0.5
W0 = np.ones(3)


# -- Closed forms alone (numpy). --


def test_closed_forms():
    assert quad.gd_edge(EIG) == pytest.approx(1.0)
    assert quad.usam_edge(EIG, RHO) == pytest.approx(2.0 / (2.0 * (1 + RHO * 2.0)))
    assert quad.usam_edge(EIG, 0.0) == pytest.approx(quad.gd_edge(EIG))
    # SAM's cycle +a -> -a -> +a is a fixed point of the two-step update map.
    lam, rho = 2.0, 0.5
    for lr_lambda in (0.3, 1.0, 1.8):
        lr = lr_lambda / lam
        a = quad.sam_cycle_amplitude(lr, lam, rho)
        w1 = quad.reference_step([a], (lam,), lr, rho, "SAM")
        w2 = quad.reference_step(w1, (lam,), lr, rho, "SAM")
        np.testing.assert_allclose(w1, [-a], rtol=1e-12)
        np.testing.assert_allclose(w2, [a], rtol=1e-12)
    assert saddle.gd_escape_steps(0.2) == math.ceil(math.log(1e3) / math.log(1.2))
    assert saddle.usam_escape_steps(0.2, 0.0) == saddle.gd_escape_steps(0.2)
    assert saddle.usam_escape_steps(0.2, 1.0) is None
    assert saddle.usam_escape_steps(0.2, 1.5) is None


# -- keras_ssam runs (one compiled model per method, reused across learning rates). --


@pytest.mark.parametrize("method", quad.METHODS)
def test_quadratic_update_map_and_stability_edge(method):
    problem = quad.QuadraticProblem(method, EIG, RHO)
    # The first steps, by keras_ssam, equal the numpy update map.
    lr = 0.3
    path = problem.trajectory(W0, lr, 6)
    w = W0.copy()
    for t in range(1, 7):
        w = quad.reference_step(w, EIG, lr, RHO, method)
        np.testing.assert_allclose(path[t], w, rtol=2e-5, atol=1e-7, err_msg=f"step {t}")
    # Below the predicted edge: converges (SAM: settles in its 2-cycle).
    edge = quad.predicted_edge(method, EIG, RHO)
    last, below = problem.run(W0, 0.9 * edge, 60)
    assert below == ("2-cycle" if method == "SAM" else "converges")
    if method == "SAM":
        for lr_top in (0.9 * edge, 0.5 * edge):  # lr * lambda_max = 1.8, 1.0
            if lr_top != 0.9 * edge:
                last, outcome = problem.run(W0, lr_top, 60)
                assert outcome == "2-cycle"
            a = quad.sam_cycle_amplitude(lr_top, max(EIG), RHO)
            top = [w[0] for w in last]
            np.testing.assert_allclose(np.abs(top), a, rtol=0.02)
            assert top[0] * top[1] < 0 and top[1] * top[2] < 0
    # Above it: diverges.
    assert problem.run(W0, 1.1 * edge, 60)[1] == "diverges"
    if method in ("SSAM", "SSAM-norm"):
        # GD's edge is 1.8x USAM's here: SSAM converges where USAM diverges.
        assert quad.usam_edge(EIG, RHO) < 0.9 * edge


def test_one_dimensional_ssam_is_gradient_descent():
    lr, lam, steps = 0.3, 2.0, 15
    gd = quad.QuadraticProblem("SGD", (lam,), RHO).trajectory([1.0], lr, steps)[:, 0]
    np.testing.assert_allclose(gd, (1 - lr * lam) ** np.arange(steps + 1), rtol=1e-5)
    for method in ("SSAM", "SSAM-norm"):
        path = quad.QuadraticProblem(method, (lam,), RHO).trajectory([1.0], lr, steps)
        np.testing.assert_allclose(path[:, 0], gd, rtol=1e-4, err_msg=method)


def test_saddle_escape_times():
    lr = 0.2
    steps_gd, _ = saddle.escape_run("SGD", 0.0, lr=lr, max_steps=60)
    assert abs(steps_gd - saddle.gd_escape_steps(lr)) <= 1
    steps_usam, path = saddle.escape_run("USAM", 0.5, lr=lr, max_steps=100)
    assert abs(steps_usam - saddle.usam_escape_steps(lr, 0.5)) <= 1
    # y <- (1 + lr (1 - rho)) y exactly, whatever x does
    t = np.arange(steps_usam)
    np.testing.assert_allclose(path[:steps_usam, 1], 1e-3 * 1.1**t, rtol=1e-4)
    # SSAM escapes faster than USAM, never faster than GD
    steps_ssam, _ = saddle.escape_run("SSAM", 0.5, lr=lr, max_steps=80)
    assert steps_gd <= steps_ssam < steps_usam


def test_saddle_traps():
    lr = 0.2
    # rho > 1 / |lambda_min|: the saddle attracts SSAM as it does USAM
    stuck, path = saddle.escape_run("SSAM", 1.5, lr=lr, max_steps=80)
    assert stuck is None and abs(path[-1, 1]) < 1e-3
    # SAM is captured in the period-2 cycle |x| = lr rho / (2 - lr) next to the saddle
    stuck, path = saddle.escape_run("SAM", 0.5, lr=lr, max_steps=80)
    assert stuck is None and abs(path[-1, 1]) < 1e-6
    amplitude = saddle.sam_cycle_amplitude(lr, 0.5)
    np.testing.assert_allclose(np.abs(path[-2:, 0]), amplitude, rtol=0.02)
    assert path[-1, 0] * path[-2, 0] < 0

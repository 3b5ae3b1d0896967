"""MomentumSAM, RandomSAM and the step policies (EveryK, LatePhase,
AdaptiveSteps) on every backend, against the float64 NumPy reference in
`plain_cost_reference.py` (a tanh MLP 4-5-2 with Keras "mse", gradients by
hand, `reference.TanhMLP`; Keras SGD and Adam spelled out):

1. MomentumSAM over 8 steps: the direction from Keras SGD's momentum, from
   Adam's first moment, from its own moving average (SGD without momentum;
   beta differs from every momentum in play, so a wrong source fails), with
   EveryK and LatePhase; weights after every step, the logged loss and
   norms. The SGD-momentum run against the authors' MSAM (their `w`).
2. RandomSAM with the noise fed in (`draw_noise` overridden by a table of
   normals indexed by the iteration): RWP (filter-wise, per last axis),
   m-RWP (mix=0.5), ARWP (F and its scaling, also with mix) over 8 steps.
   The default seeded noise: reproducible per seed, standard normal, and
   the noise of an actual step recovered from the update of a linear model.
3. AdaptiveSteps with SSAM and LookSAM (and RandomSAM with mix): the
   decisions and the statistics mu, var after every step; EveryK and
   LatePhase against their definitions, directly and in training (two-pass
   SSAM, single-pass MomentumSAM).
4. rho=0 / sigma=0 is the base optimizer alone, bitwise (the one-pass forms
   everywhere; the two-pass m-RWP on TensorFlow and torch, 1 ulp on JAX).
5. Forward passes per step: one (MomentumSAM, RandomSAM), two (mix).
6. BatchNorm statistics: updated once per step, by the step's pass.
7. model.save / load_model mid-training resumes exactly (the base momentum,
   the own average, ARWP's F, AdaptiveSteps' statistics).
8. Bad arguments; refused combinations (num_batch_splits, AdaptiveSteps on a
   single-pass variant), which leave the model intact (raised before the
   step: on JAX `fit` has moved the weights into the step's state by then).
9. get_config / from_config round trips.
10. mixed_float16: finite, no step skipped, within float16 rounding of the
    reference that the float32 runs match.
"""

import keras
import numpy as np
import plain_cost_reference as pref
import pytest
import reference as ref
from efficient_reference import EfficientSAM
from keras import ops
from test_efficient import _PASSES, PassCounter
from test_variants import N_HIDDEN, N_IN, N_OUT, _batches, _inner, _problem

import keras_ssam
from keras_ssam.schedules import AdaptiveSteps, EveryK, LatePhase

BACKEND = keras.backend.backend()
LR, MOMENTUM = 0.1, 0.9
SHAPES = [(N_IN, N_HIDDEN), (N_HIDDEN,), (N_HIDDEN, N_OUT), (N_OUT,)]


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def _sam_model(params, optimizer, *, diagnostics=True, float32_head=False, inner=None, **kwargs):
    inner = _inner(params, float32_head=float32_head) if inner is None else inner
    model = keras_ssam.SAMModel(inner, diagnostics=diagnostics, **kwargs)
    model.compile(optimizer=optimizer, loss="mse")
    return model, inner


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _weights(inner):
    return [np.asarray(_np(v), np.float64) for v in inner.trainable_weights]


def _train_steps(model, inner, batches, after_step=None):
    """One `train_on_batch` per batch; the weights and logs after each, and
    `after_step()`'s values."""
    weights, logs, seen = [], [], []
    for xb, yb in batches:
        model.reset_metrics()
        logs.append(model.train_on_batch(xb.astype("float32"), yb.astype("float32"), return_dict=True))
        weights.append(_weights(inner))
        if after_step is not None:
            seen.append(after_step())
    return weights, logs, seen


def _check_trajectory(got, want, rtol=1e-5, atol=1e-6, what=""):
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        for i, (a, b) in enumerate(zip(g, w)):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"{what} weight {i} after step {step}")


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(p) - np.asarray(q)))) for p, q in zip(a, b))


def _assert_differs(a, b, atol, what):
    """Guard that a wrong behaviour would be detected at the test's tolerance."""
    diff = _max_diff(a, b)
    assert diff > 10 * atol, f"test cannot discriminate: {what} differs from the expectation by only {diff}"


def _own_state(optimizer):
    """The SAM optimizer's own variables (the average, F), as float64."""
    return [_np(v).astype(np.float64) for v in optimizer.state_variables()]


def _decision_stats(optimizer):
    """AdaptiveSteps' statistics `[mu, var]` in the SAM optimizer."""
    return [float(_np(v)) for v in optimizer._decision_variables]


def _fractions(logs):
    return [log["sam_step_fraction"] for log in logs]


def _normal_table(seed, steps=16):
    """`steps` rows of float32 standard normals, one row per iteration, as
    many as the MLP has weights (split in the weights' order)."""
    size = sum(int(np.prod(s)) for s in SHAPES)
    return np.random.default_rng(seed).standard_normal((steps, size)).astype(np.float32)


def _table_normals(table):
    """The reference's `normals(t)`: row `t % len(table)`, split and
    reshaped as the MLP's weights."""

    def normals(t):
        row = table[t % len(table)].astype(np.float64)
        out, start = [], 0
        for shape in SHAPES:
            size = int(np.prod(shape))
            out.append(row[start:start + size].reshape(shape))
            start += size
        return out

    return normals


class FedNoiseRandomSAM(keras_ssam.RandomSAM):
    """RandomSAM whose normals are row `iterations % len(table)` of a fixed
    table (split in the weights' order): keras.ops only, so the row index
    may be a traced value (JAX's jit, tf.function)."""

    def __init__(self, *args, table, **kwargs):
        super().__init__(*args, **kwargs)
        self.table = np.asarray(table, np.float32)

    def draw_noise(self, weights):
        table = ops.convert_to_tensor(self.table)
        index = ops.mod(ops.cast(self.iterations, "int32"), self.table.shape[0])
        row = ops.take(table, index, axis=0)
        out, start = [], 0
        for w in weights:
            shape = tuple(w.shape)
            size = int(np.prod(shape))
            out.append(ops.reshape(row[start:start + size], shape))
            start += size
        assert start == self.table.shape[1], "the table is for the MLP's weights"
        return out


# ---------------------------------------------------------------------------
# 0. Reference self-checks (NumPy only).
# ---------------------------------------------------------------------------


def test_reference_momentum_sam_is_the_authors_msam():
    """Reference self-check: Momentum-SAM with Keras SGD's momentum (`v =
    -m / lr` up to the factor) and the authors' MSAM, at a constant learning
    rate, give the same `w` (to float64 rounding; the two epsilons differ by
    the factor lr, 1e-12 against norms of O(1))."""
    params, x, y = _problem(seed=40)
    batches = _batches(x, y)
    ours, _ = pref.run(pref.MomentumSAM(ref.TanhMLP.loss_and_grads, pref.SGD(LR, MOMENTUM), 0.3), params, batches)
    official = pref.run_official(ref.TanhMLP.loss_and_grads, params, batches, lr=LR, momentum=MOMENTUM, rho=0.3)
    _check_trajectory(ours, official, rtol=1e-10, atol=1e-12)
    plain, _ = pref.run(pref.MomentumSAM(ref.TanhMLP.loss_and_grads, pref.SGD(LR, MOMENTUM), 0.0), params, batches)
    _assert_differs(plain[-1], official[-1], 1e-6, "plain SGD")


def test_reference_adaptive_steps_statistics():
    """Reference self-check: AE-SAM's statistics are the exponential moving
    mean and variance of `n_t`, the variance around the new mean."""
    policy = pref.AdaptiveSteps(total_steps=4, delta=0.5, c_start=1.0, c_end=-1.0)
    decision, n, threshold = policy.decide(0, 2.0)
    assert (n, policy.mean, policy.variance) == (4.0, 2.0, 2.0)
    assert threshold == 2.0 + np.sqrt(2.0) and decision
    decision, n, threshold = policy.decide(2, 1.0)  # c_2 = 0
    assert (policy.mean, policy.variance, threshold) == (1.5, 1.0 + 0.5 * 0.25, 1.5) and not decision
    policy.decide(100, 1.0)
    assert policy.threshold_scale(100) == -1.0


# ---------------------------------------------------------------------------
# 1. MomentumSAM against the reference.
# ---------------------------------------------------------------------------

MSAM_CASES = {
    # name: (keras base, keras kwargs, reference base, reference kwargs, wrong reference kwargs)
    "sgd-momentum": (
        lambda: keras.optimizers.SGD(LR, momentum=MOMENTUM), dict(rho=0.3, beta=0.5),
        lambda: pref.SGD(LR, MOMENTUM), dict(rho=0.3),
        dict(rho=0.3, source="own", beta=0.5),
    ),
    "adam": (
        lambda: keras.optimizers.Adam(0.02, beta_1=0.8), dict(rho=0.3, beta=0.5),
        lambda: pref.Adam(0.02, beta_1=0.8), dict(rho=0.3),
        dict(rho=0.3, source="own", beta=0.5),
    ),
    "own-average": (
        lambda: keras.optimizers.SGD(LR), dict(rho=0.3, beta=0.5),
        lambda: pref.SGD(LR), dict(rho=0.3, source="own", beta=0.5),
        dict(rho=0.3, source="own", beta=0.9),
    ),
    "sgd-momentum-every-3": (
        lambda: keras.optimizers.SGD(LR, momentum=MOMENTUM), dict(rho=0.3, sam_probability=EveryK(3, offset=1)),
        lambda: pref.SGD(LR, MOMENTUM), dict(rho=0.3, schedule=pref.every_k(3, 1)),
        dict(rho=0.3),
    ),
    "own-average-late-phase": (
        lambda: keras.optimizers.SGD(LR), dict(rho=0.3, beta=0.5, sam_probability=LatePhase(3)),
        lambda: pref.SGD(LR), dict(rho=0.3, source="own", beta=0.5, schedule=pref.late_phase(3)),
        dict(rho=0.3, source="own", beta=0.5),
    ),
}


def test_momentum_sam_against_reference():
    """Each case over 8 steps (2 epochs of 4 batches): the weights after
    every step within float32 rounding (rtol 1e-5, atol 1e-6) of the
    reference; per step the logged loss (at w + e, the step's only pass),
    `grad_norm` (the direction's norm), `perturbed_grad_norm` (||g(w + e)||)
    and `sam_step_fraction` (the schedule's decision); `direction` names
    the source. The wrong source (an own average where the base has a
    momentum, the default beta where beta=0.5 was asked for, the
    perturbation on every step where a schedule skips some) differs by far
    more than the tolerance (checked). The SGD-momentum run is also the
    authors' MSAM's `w`."""
    params, x, y = _problem(seed=41)
    batches = _batches(x, y)
    directions = {"sgd-momentum": "SGD's momentum", "adam": "Adam's first moment",
                  "own-average": "own moving average"}
    for case, (base, kwargs, ref_base, ref_kwargs, wrong_kwargs) in MSAM_CASES.items():
        opt = keras_ssam.MomentumSAM(base(), **kwargs)
        if case in directions:
            assert directions[case] in opt.direction, (case, opt.direction)
        model, inner = _sam_model(params, opt)
        got, logs, _ = _train_steps(model, inner, batches)
        want, records = pref.run(pref.MomentumSAM(ref.TanhMLP.loss_and_grads, ref_base(), **ref_kwargs),
                                 params, batches)
        _check_trajectory(got, want, what=case)
        assert _fractions(logs) == [float(r["perturbed"]) for r in records], case
        for step, (log, rec) in enumerate(zip(logs, records)):
            np.testing.assert_allclose(log["loss"], rec["loss"], rtol=1e-5, err_msg=f"{case} loss {step}")
            if rec["perturbed"]:
                np.testing.assert_allclose(log["grad_norm"], rec["direction_norm"], rtol=1e-5, atol=1e-7,
                                           err_msg=f"{case} grad_norm {step}")
                np.testing.assert_allclose(log["perturbed_grad_norm"], rec["perturbed_grad_norm"], rtol=1e-5,
                                           err_msg=f"{case} perturbed_grad_norm {step}")
        assert records[0]["direction_norm"] == 0.0  # the first step is plain
        if "schedule" in ref_kwargs:
            assert 0 < sum(r["perturbed"] for r in records) < len(records), "setup"
        wrong, _ = pref.run(pref.MomentumSAM(ref.TanhMLP.loss_and_grads, ref_base(), **wrong_kwargs), params, batches)
        _assert_differs(wrong[-1], want[-1], 1e-6, f"{case}: {wrong_kwargs}")
        if case == "sgd-momentum":
            official = pref.run_official(ref.TanhMLP.loss_and_grads, params, batches, lr=LR, momentum=MOMENTUM,
                                         rho=0.3)
            _check_trajectory(got, official, what="the authors' MSAM")
            plain, _ = pref.run(pref.MomentumSAM(ref.TanhMLP.loss_and_grads, ref_base(), rho=0.0), params, batches)
            _assert_differs(plain[-1], official[-1], 1e-6, "plain SGD")


# ---------------------------------------------------------------------------
# 2. RandomSAM against the reference, and its default noise.
# ---------------------------------------------------------------------------

RWP_CASES = {
    # name: (kwargs, wrong reference kwargs)
    "rwp": (dict(sigma=0.1), dict(sigma=0.1, unit_axis=0)),
    "m-rwp": (dict(sigma=0.1, mix=0.5), dict(sigma=0.1)),
    "arwp": (dict(sigma=0.1, adaptive=True, eta=2.0, beta=0.8), dict(sigma=0.1)),
    "arwp-mix": (dict(sigma=0.1, mix=0.7, adaptive=True), dict(sigma=0.1, mix=0.7, adaptive=True, eta=0.0)),
}


def test_random_sam_against_reference():
    """The normals fed in (a table indexed by the iteration), 8 steps with
    SGD(momentum=0.9): the weights after every step (rtol 1e-5, atol 1e-6),
    the logged loss and norms (`grad_norm` is ||eps|| for the one-pass form,
    the clean ||g|| with mix), `sharpness` with mix, and ARWP's F after
    every step. Filter-wise noise per output unit on the first axis (the
    torch layout), m-RWP's mix left out, ARWP without its scaling differ
    (checked)."""
    params, x, y = _problem(seed=42)
    batches = _batches(x, y)
    table = _normal_table(7)
    for case, (kwargs, wrong_kwargs) in RWP_CASES.items():
        opt = FedNoiseRandomSAM(keras.optimizers.SGD(LR, momentum=MOMENTUM), table=table, **kwargs)
        model, inner = _sam_model(params, opt)
        got, logs, seen = _train_steps(model, inner, batches,
                                       (lambda: _own_state(opt)) if kwargs.get("adaptive") else None)
        want, records = pref.run(pref.RandomSAM(ref.TanhMLP.loss_and_grads, pref.SGD(LR, MOMENTUM),
                                                normals=_table_normals(table), **kwargs), params, batches)
        _check_trajectory(got, want, what=case)
        assert _fractions(logs) == [1.0] * len(batches)
        for step, (log, rec) in enumerate(zip(logs, records)):
            np.testing.assert_allclose(log["loss"], rec["loss"], rtol=1e-5, err_msg=f"{case} loss {step}")
            if kwargs.get("mix") is None:
                expected = {"grad_norm": pref.norm(rec["eps"]), "perturbed_grad_norm": pref.norm(rec["grads_eps"])}
            else:
                expected = {"grad_norm": pref.norm(rec["clean_grads"]),
                            "perturbed_grad_norm": pref.norm(rec["grads_eps"]), "sharpness": rec["sharpness"]}
            for key, value in expected.items():
                np.testing.assert_allclose(log[key], value, rtol=1e-4, atol=1e-6, err_msg=f"{case} {key} {step}")
        if kwargs.get("adaptive"):
            assert len(seen[-1]) == 4
            for step, (f_got, rec) in enumerate(zip(seen, records)):
                _check_trajectory([f_got], [rec["fisher"]], rtol=1e-5, atol=1e-8, what=f"{case} F step {step}")
        wrong, _ = pref.run(pref.RandomSAM(ref.TanhMLP.loss_and_grads, pref.SGD(LR, MOMENTUM),
                                           normals=_table_normals(table), **wrong_kwargs), params, batches)
        _assert_differs(wrong[-1], want[-1], 1e-6, f"{case}: {wrong_kwargs}")


def test_random_sam_default_noise_is_seeded():
    """The default noise is a function of (seed, iteration): two runs with
    seed 7 end bitwise equal, seed 8 ends elsewhere; the draws of one
    iteration repeat, the next iteration's differ, and over 10^4 values
    (two weights) they are standard normal (mean within 0.04, std within
    0.03, about 4 standard errors) with no repeated stream between the
    weights."""
    params, x, y = _problem(seed=43)
    batches = _batches(x, y, epochs=1)
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        opt = keras_ssam.RandomSAM(keras.optimizers.SGD(LR, momentum=MOMENTUM), sigma=0.1, seed=seed)
        assert opt.seed == seed
        model, inner = _sam_model(params, opt, diagnostics=False)
        runs[name] = _train_steps(model, inner, batches)[0][-1]
    for a, b in zip(runs["a"], runs["b"]):
        np.testing.assert_array_equal(a, b)
    _assert_differs(runs["a"], runs["c"], 1e-6, "another seed")

    opt = keras_ssam.RandomSAM(keras.optimizers.SGD(0.1), seed=3)
    weights = [ops.zeros((100, 60)), ops.zeros((4000,))]
    first = [_np(z) for z in opt.draw_noise(weights)]
    again = [_np(z) for z in opt.draw_noise(weights)]
    assert [z.shape for z in first] == [(100, 60), (4000,)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    values = np.concatenate([z.ravel() for z in first]).astype(np.float64)
    assert abs(values.mean()) < 0.04 and abs(values.std() - 1.0) < 0.03, (values.mean(), values.std())
    assert not np.any(np.isin(first[1][:50], first[0])), "the two weights share a stream"
    opt.iterations.assign(1)
    later = [_np(z) for z in opt.draw_noise(weights)]
    assert not np.allclose(later[0], first[0])
    other = [_np(z) for z in keras_ssam.RandomSAM(keras.optimizers.SGD(0.1), seed=4).draw_noise(weights)]
    assert not np.allclose(other[0], first[0])


def test_random_sam_step_noise_recovered():
    """A single RWP step of a linear model `y = x W` (W 8 x 16, no bias,
    "mse", SGD lr 1) moves W by `g(W + eps)`, which is affine in eps:
    `g(W + eps) - g(W) = 2 / (N * out) X^T X eps`. Solving for eps gives the
    step's noise: it equals `sigma ||W[:, j]|| z[:, j]` with `z` the
    optimizer's own `draw_noise` at iteration 0 (per column, the output
    unit), to the float32 rounding of the update amplified by the solve
    (atol 2e-4 on O(0.1) values)."""
    rng = np.random.default_rng(44)
    n, d_in, d_out, sigma = 64, 8, 16, 0.1
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    y = rng.standard_normal((n, d_out)).astype(np.float32)
    w0 = (rng.standard_normal((d_in, d_out)) * rng.uniform(0.2, 2.0, d_out)).astype(np.float32)
    inp = keras.Input((d_in,))
    inner = keras.Model(inp, keras.layers.Dense(d_out, use_bias=False)(inp))
    inner.set_weights([w0])
    opt = keras_ssam.RandomSAM(keras.optimizers.SGD(1.0), sigma=sigma, seed=11)
    z = _np(opt.draw_noise([ops.convert_to_tensor(w0)])[0]).astype(np.float64)
    model, _ = _sam_model(None, opt, inner=inner, diagnostics=False)
    model.train_on_batch(x, y)
    w1 = _np(inner.trainable_weights[0]).astype(np.float64)
    xd, yd, wd = x.astype(np.float64), y.astype(np.float64), w0.astype(np.float64)
    scale = 2.0 / (n * d_out)
    g_eps = wd - w1
    g_w = scale * xd.T @ (xd @ wd - yd)
    eps = np.linalg.solve(scale * xd.T @ xd, g_eps - g_w)
    want = sigma * np.linalg.norm(wd, axis=0, keepdims=True) * z
    np.testing.assert_allclose(eps, want, rtol=0, atol=2e-4)
    assert np.max(np.abs(want)) > 0.1, "setup"
    # Per row (the first axis) instead would be far off.
    assert np.max(np.abs(sigma * np.linalg.norm(wd, axis=1, keepdims=True) * z - want)) > 0.05


# ---------------------------------------------------------------------------
# 3. Step policies: AdaptiveSteps, EveryK, LatePhase.
# ---------------------------------------------------------------------------

ADAPTIVE = dict(total_steps=8, delta=0.5, c_start=1.0, c_end=-1.0)


def _adaptive_reference(params, batches, rho, k=None):
    sam = (EfficientSAM(ref.TanhMLP.loss_and_grads, rho=rho, normalize=False, stable=True) if k is None
           else EfficientSAM(ref.TanhMLP.loss_and_grads, rho=rho, k=k, alpha=0.7))
    return pref.run_adaptive(pref.AdaptiveSteps(**ADAPTIVE), sam, params, batches, pref.SGD(LR, MOMENTUM), k=k)


def test_adaptive_steps_against_reference():
    """AdaptiveSteps(total_steps=8, delta=0.5) over 8 steps, with SSAM
    (rho 0.1) and with LookSAM (k=2, alpha 0.7): per step the decision
    (`sam_step_fraction`: AE-SAM's, and for LookSAM also t % 2 == 0), the
    statistics mu and var in the optimizer's `_decision_variables` (rtol
    1e-5), and the weights. Both decisions occur, each n_t at least 1% away
    from its threshold (float32 cannot flip one). Statistics from the old
    mean, or SSAM on every step, differ (checked)."""
    params, x, y = _problem(seed=45)
    batches = _batches(x, y)
    for name, make, k in (
        ("SSAM", lambda p: keras_ssam.SSAM(keras.optimizers.SGD(LR, momentum=MOMENTUM), rho=0.1,
                                           sam_probability=p), None),
        ("LookSAM", lambda p: keras_ssam.LookSAM(keras.optimizers.SGD(LR, momentum=MOMENTUM), rho=0.1, k=2,
                                                 alpha=0.7, sam_probability=p), 2),
    ):
        opt = make(AdaptiveSteps(**ADAPTIVE))
        model, inner = _sam_model(params, opt)
        got, logs, seen = _train_steps(model, inner, batches, lambda: _decision_stats(opt))
        want, records = _adaptive_reference(params, batches, 0.1, k)
        decisions = [r["decision"] for r in records]
        assert any(decisions) and not all(decisions), (name, decisions)
        for r in records:
            assert abs(r["n"] - r["threshold"]) > 0.01 * r["n"], (name, r["t"], r["n"], r["threshold"])
        assert _fractions(logs) == [float(r["perturbed"]) for r in records], name
        if k is not None:
            assert [r["perturbed"] for r in records] == [d and t % k == 0 for t, d in enumerate(decisions)]
        np.testing.assert_allclose(seen, [[r["mean"], r["variance"]] for r in records], rtol=1e-5, atol=1e-9,
                                   err_msg=f"{name} statistics")
        _check_trajectory(got, want, what=name)
    # The guards, on SSAM's reference.
    want, records = _adaptive_reference(params, batches, 0.1)
    sam = EfficientSAM(ref.TanhMLP.loss_and_grads, rho=0.1, normalize=False, stable=True)
    every, _ = pref.run_adaptive(pref.AdaptiveSteps(total_steps=8, delta=0.5, c_start=-1e9, c_end=-1e9), sam,
                                 params, batches, pref.SGD(LR, MOMENTUM))
    _assert_differs(every[-1], want[-1], 1e-6, "SSAM on every step")

    # The variance around the old mean (a wrong order) ends far from it.
    mean = variance = 0.0
    for r in records:
        previous, mean = mean, 0.5 * mean + 0.5 * r["n"]
        variance = 0.5 * variance + 0.5 * (r["n"] - previous) ** 2
    assert abs(variance - records[-1]["variance"]) > 1e-3 * records[-1]["variance"], "variance around the old mean"


def test_adaptive_steps_with_mixed_random_sam():
    """RandomSAM(mix=0.5) runs two passes, so AdaptiveSteps applies: the
    decisions over 8 steps are AE-SAM's on the clean gradient at the
    weights each step starts from (the Keras trajectory, NumPy gradients),
    and the statistics follow."""
    params, x, y = _problem(seed=46)
    batches = _batches(x, y)
    opt = keras_ssam.RandomSAM(keras.optimizers.SGD(LR, momentum=MOMENTUM), sigma=0.1, mix=0.5, seed=2,
                               sam_probability=AdaptiveSteps(**ADAPTIVE))
    model, inner = _sam_model(params, opt)
    got, logs, seen = _train_steps(model, inner, batches, lambda: _decision_stats(opt))
    policy = pref.AdaptiveSteps(**ADAPTIVE)
    starts = [params] + got[:-1]
    decisions = []
    for t, (w, (xb, yb)) in enumerate(zip(starts, batches)):
        _, g = ref.TanhMLP.loss_and_grads(w, xb, yb)
        decision, n, threshold = policy.decide(t, pref.norm(g))
        assert abs(n - threshold) > 0.01 * n, "setup: a decision float32 could flip"
        decisions.append(decision)
        np.testing.assert_allclose(seen[t], [policy.mean, policy.variance], rtol=1e-5, atol=1e-9)
    assert any(decisions) and not all(decisions), decisions
    assert _fractions(logs) == [float(d) for d in decisions]


def test_every_k_and_late_phase():
    """The schedules' values against their definitions (t % k == offset,
    t >= start_step) over 12 iterations, as tensors; and in training: SSAM
    (two passes) with EveryK(3, offset=1) and LatePhase(5) over 8 steps
    against the reference with those steps perturbed (decisions and
    weights)."""
    for t in range(12):
        assert float(_np(EveryK(3, offset=1)(t))) == float(t % 3 == 1)
        assert float(_np(EveryK(1)(t))) == 1.0
        assert float(_np(LatePhase(5)(t))) == float(t >= 5)
        assert float(_np(LatePhase(0)(t))) == 1.0
    params, x, y = _problem(seed=47)
    batches = _batches(x, y)
    for schedule, mask in ((EveryK(3, offset=1), pref.every_k(3, 1)), (LatePhase(5), pref.late_phase(5))):
        opt = keras_ssam.SSAM(keras.optimizers.SGD(LR, momentum=MOMENTUM), rho=0.1, sam_probability=schedule)
        model, inner = _sam_model(params, opt)
        got, logs, _ = _train_steps(model, inner, batches)
        assert _fractions(logs) == [float(mask(t)) for t in range(len(batches))], type(schedule).__name__
        sam = EfficientSAM(ref.TanhMLP.loss_and_grads, rho=0.1, normalize=False, stable=True, mask=mask)
        want = _run_masked(sam, params, batches)
        _check_trajectory(got, want, what=type(schedule).__name__)


def _run_masked(sam, params, batches):
    """EfficientSAM (its own `mask`) with Keras SGD(LR, MOMENTUM)."""
    optimizer = pref.SGD(LR, MOMENTUM)
    w = [np.array(p, np.float64) for p in params]
    trajectory = []
    for xb, yb in batches:
        update, _ = sam.step(w, xb, yb, optimizer.t)
        w = optimizer.apply(w, update)
        trajectory.append(w)
    return trajectory


# ---------------------------------------------------------------------------
# 4. rho=0 / sigma=0 is the base optimizer.
# ---------------------------------------------------------------------------


def test_zero_radius_is_the_base_optimizer():
    """MomentumSAM(rho=0) and RandomSAM(sigma=0) (one pass, mix=0.5, ARWP)
    train exactly as a plain keras.Model compiled with the same base
    optimizer: weights bitwise equal after each of 8 steps, with SGD
    momentum (MomentumSAM reads it) and with RMSprop (MomentumSAM keeps its
    own average, ARWP its F, which then have no effect). Exception: on JAX
    the two-pass m-RWP is within 1e-6 (1 ulp seen), not bitwise."""
    params, x, y = _problem(seed=48)
    batches = _batches(x, y)
    for base, variants in (
        (lambda: keras.optimizers.SGD(LR, momentum=MOMENTUM), {
            "MomentumSAM(rho=0)": lambda b: keras_ssam.MomentumSAM(b, rho=0.0),
            "RandomSAM(sigma=0)": lambda b: keras_ssam.RandomSAM(b, sigma=0.0, seed=1),
            "RandomSAM(sigma=0, mix=0.5)": lambda b: keras_ssam.RandomSAM(b, sigma=0.0, mix=0.5, seed=1),
        }),
        (lambda: keras.optimizers.RMSprop(0.01), {
            "MomentumSAM(rho=0), own average": lambda b: keras_ssam.MomentumSAM(b, rho=0.0),
            "RandomSAM(sigma=0, adaptive)": lambda b: keras_ssam.RandomSAM(b, sigma=0.0, adaptive=True, seed=1),
        }),
    ):
        plain = _inner(params)
        plain.compile(optimizer=base(), loss="mse")
        want = _train_steps(plain, plain, batches)[0]
        assert _max_diff(want[-1], params) > 0.01, "setup: training moved the weights"
        for name, make in variants.items():
            opt = make(base())
            model, inner = _sam_model(params, opt, diagnostics=False)
            got = _train_steps(model, inner, batches)[0]
            if BACKEND == "jax" and not opt.single_pass:
                # XLA compiles the two-pass step (the update fed by the second
                # pass's gradient) with other fusions than Keras's plain step:
                # 1 ulp apart after a few steps, as SAM(rho=0) is (see
                # test_reference.py), while g(w + 0) is bitwise g(w).
                _check_trajectory(got, want, rtol=1e-6, atol=1e-7, what=name)
                continue
            for step, (g, w) in enumerate(zip(got, want)):
                for i, (a, b) in enumerate(zip(g, w)):
                    np.testing.assert_array_equal(a, b, err_msg=f"{name}: weight {i} after step {step}")


# ---------------------------------------------------------------------------
# 5. Forward passes per step.
# ---------------------------------------------------------------------------

def _counted_passes(params, optimizer, x, y):
    """Forward passes of the inner model over the 6 steps of one epoch of
    `fit` (batch 2)."""
    inp = keras.Input((N_IN,))
    out = keras.layers.Dense(N_HIDDEN, activation="tanh")(PassCounter()(inp))
    inner = keras.Model(inp, keras.layers.Dense(N_OUT)(out))
    inner.set_weights([p.astype("float32") for p in params])
    compile_kwargs = {"run_eagerly": True} if BACKEND == "tensorflow" else {}
    model = inner if optimizer is None else keras_ssam.SAMModel(inner, diagnostics=True)
    model.compile(optimizer=keras.optimizers.SGD(LR) if optimizer is None else optimizer, loss="mse",
                  **compile_kwargs)
    _PASSES[0] = 0
    hist = model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0).history
    if BACKEND == "jax":
        import jax

        jax.effects_barrier()
    return _PASSES[0], hist


def test_forward_passes_per_step():
    """6 steps: a plain model runs 6 forward passes plus B (symbolic build
    calls); MomentumSAM (also with EveryK) and RandomSAM run 6 + B, one per
    step; RandomSAM(mix=0.5) 12 + B; SSAM with AdaptiveSteps 6 + (the
    perturbed steps) + B."""
    params, x, y = _problem(seed=49, n=12)
    plain, _ = _counted_passes(params, None, x, y)
    base = plain - 6
    assert base >= 0, f"a plain model ran {plain} passes in 6 steps"
    sgd = lambda: keras.optimizers.SGD(LR, momentum=MOMENTUM)  # noqa: E731
    cases = {
        "MomentumSAM": (keras_ssam.MomentumSAM(sgd(), rho=0.3), 6),
        "MomentumSAM-EveryK": (keras_ssam.MomentumSAM(sgd(), rho=0.3, sam_probability=EveryK(2)), 6),
        "RandomSAM": (keras_ssam.RandomSAM(sgd(), sigma=0.1, seed=1), 6),
        "RandomSAM-mix": (keras_ssam.RandomSAM(sgd(), sigma=0.1, mix=0.5, seed=1), 12),
        "SSAM-AdaptiveSteps": (keras_ssam.SSAM(sgd(), rho=0.1, sam_probability=AdaptiveSteps(6, delta=0.5)), None),
    }
    got, want = {}, {}
    for name, (opt, passes) in cases.items():
        got[name], hist = _counted_passes(params, opt, x, y)
        if passes is None:
            perturbed = round(hist["sam_step_fraction"][0] * 6)
            assert 0 < perturbed < 6, ("setup", perturbed)
            passes = 6 + perturbed
        else:
            assert hist["sam_step_fraction"] == [0.5 if "EveryK" in name else 1.0]
        want[name] = passes + base
    assert got == want, f"plain model: {plain} passes"


# ---------------------------------------------------------------------------
# 6. BatchNorm statistics.
# ---------------------------------------------------------------------------

BN_MOMENTUM = 0.8


class ZeroTap(keras.layers.Layer):
    """`y + 0 * sum(stop_gradient(tap))`: the tap's layers run in every
    forward pass, and the loss and its gradient are exactly the MLP's."""

    def call(self, inputs):
        y, tap = inputs
        return y + 0.0 * ops.sum(ops.stop_gradient(tap), axis=-1, keepdims=True)


def _bn_inner(params):
    """The MLP, with a BatchNormalization (no trainable weights, momentum
    0.8) on the hidden pre-activation `x W1 + b1` tapped at zero weight."""
    inp = keras.Input((N_IN,))
    z = keras.layers.Dense(N_HIDDEN, name="hidden")(inp)
    out = keras.layers.Dense(N_OUT, name="out")(keras.layers.Activation("tanh")(z))
    bn = keras.layers.BatchNormalization(center=False, scale=False, momentum=BN_MOMENTUM, name="bn")(z)
    inner = keras.Model(inp, ZeroTap()([out, bn]))
    inner.get_layer("hidden").set_weights([p.astype(np.float32) for p in params[:2]])
    inner.get_layer("out").set_weights([p.astype(np.float32) for p in params[2:]])
    return inner


def _bn_statistics(points, batches):
    """The moving mean and variance after each step, the statistics updated
    once per step from the pass at `points[t]` (biased batch variance)."""
    mean, var = np.zeros(N_HIDDEN), np.ones(N_HIDDEN)
    out = []
    for point, (xb, _) in zip(points, batches):
        z = xb @ point[0] + point[1]
        mean = BN_MOMENTUM * mean + (1 - BN_MOMENTUM) * z.mean(axis=0)
        var = BN_MOMENTUM * var + (1 - BN_MOMENTUM) * z.var(axis=0)
        out.append([mean, var])
    return out


def test_batch_norm_statistics_once_per_step():
    """8 steps: the BatchNorm moving mean and variance after every step
    equal NumPy's with one update per step from the step's pass: at w + e
    for MomentumSAM and RandomSAM (their only pass), at w for m-RWP (Keras's
    stateful clean pass; the perturbed pass writes nothing). The weights
    follow the reference (the tap changes no gradient). Statistics from the
    other point, or updated by both, differ (checked)."""
    params, x, y = _problem(seed=50)
    batches = _batches(x, y)
    table = _normal_table(8)
    sgd = lambda: keras.optimizers.SGD(LR, momentum=MOMENTUM)  # noqa: E731
    cases = {
        "MomentumSAM": (keras_ssam.MomentumSAM(sgd(), rho=0.3),
                        pref.MomentumSAM(ref.TanhMLP.loss_and_grads, pref.SGD(LR, MOMENTUM), 0.3)),
        "RandomSAM": (FedNoiseRandomSAM(sgd(), sigma=0.1, table=table),
                      pref.RandomSAM(ref.TanhMLP.loss_and_grads, pref.SGD(LR, MOMENTUM), 0.1, _table_normals(table))),
        "RandomSAM-mix": (FedNoiseRandomSAM(sgd(), sigma=0.1, mix=0.5, table=table),
                          pref.RandomSAM(ref.TanhMLP.loss_and_grads, pref.SGD(LR, MOMENTUM), 0.1,
                                         _table_normals(table), mix=0.5)),
    }
    for name, (opt, method) in cases.items():
        inner = _bn_inner(params)
        model, _ = _sam_model(params, opt, inner=inner, diagnostics=False)
        bn = inner.get_layer("bn")
        got, _, stats = _train_steps(model, inner, batches,
                                     lambda: [_np(bn.moving_mean).astype(np.float64),
                                              _np(bn.moving_variance).astype(np.float64)])
        want, records = pref.run(method, params, batches)
        _check_trajectory(got, want, what=name)
        starts = [params] + want[:-1]
        points = [r["point"] for r in records]
        right, wrong = (starts, points) if name.endswith("mix") else (points, starts)
        expected = _bn_statistics(right, batches)
        _check_trajectory(stats, expected, what=f"{name} BatchNorm statistics")
        _assert_differs(_bn_statistics(wrong, batches)[-1], expected[-1], 1e-6, f"{name}: the other point")
        both = [p for pair in zip(starts, points) for p in pair]
        twice = _bn_statistics(both, [b for b in batches for _ in range(2)])[1::2]
        _assert_differs(twice[-1], expected[-1], 1e-6, f"{name}: updated twice")


# ---------------------------------------------------------------------------
# 7. Save and load mid-training.
# ---------------------------------------------------------------------------

SAVE_CASES = {
    "MomentumSAM-momentum": lambda: keras_ssam.MomentumSAM(keras.optimizers.SGD(LR, momentum=MOMENTUM), rho=0.3),
    "MomentumSAM-own-average": lambda: keras_ssam.MomentumSAM(keras.optimizers.SGD(LR), rho=0.3, beta=0.5),
    "RandomSAM-adaptive": lambda: keras_ssam.RandomSAM(keras.optimizers.SGD(LR, momentum=MOMENTUM), sigma=0.1,
                                                       adaptive=True, eta=2.0, beta=0.8, seed=5),
    "SSAM-AdaptiveSteps": lambda: keras_ssam.SSAM(keras.optimizers.SGD(LR, momentum=MOMENTUM), rho=0.1,
                                                  sam_probability=AdaptiveSteps(**ADAPTIVE)),
}


def test_save_load_resumes_exactly(tmp_path):
    """3 steps, model.save, 5 more steps; keras.models.load_model of the
    saved file has the optimizer's class, config and iteration count, every
    optimizer variable (the base momentum, MomentumSAM's own average, ARWP's
    F, AdaptiveSteps' mu and var, all non-zero) as saved, and its 5 steps
    give the uninterrupted run's weights (rtol 1e-6, atol 1e-7)."""
    params, x, y = _problem(seed=51)
    batches = _batches(x, y)
    for case, make in SAVE_CASES.items():
        opt = make()
        model, inner = _sam_model(params, opt, diagnostics=False)
        _train_steps(model, inner, batches[:3])
        saved = [_np(v).copy() for v in opt.variables]
        state = [_np(v) for v in opt.variables if not v.path.endswith(("iteration", "learning_rate"))]
        assert len(state) >= 4 and all(np.any(v != 0) for v in state), (case, "setup: the state")
        if case != "MomentumSAM-momentum":
            assert opt.own_variables(), case
        path = str(tmp_path / f"{case}.keras")
        model.save(path)
        straight, _, _ = _train_steps(model, inner, batches[3:])
        loaded = keras.models.load_model(path)
        assert isinstance(loaded, keras_ssam.SAMModel)
        restored = loaded.sam_optimizer()
        assert type(restored) is type(opt), case
        assert restored.get_config() == opt.get_config(), case
        assert int(_np(restored.iterations)) == 3
        assert len(restored.variables) == len(saved), case
        for i, (a, b) in enumerate(zip(restored.variables, saved)):
            np.testing.assert_array_equal(_np(a), b, err_msg=f"{case}: optimizer variable {i} ({a.path})")
        resumed, _, _ = _train_steps(loaded, loaded.model, batches[3:])
        _check_trajectory(resumed, straight, rtol=1e-6, atol=1e-7, what=f"{case} resumed vs straight")


# ---------------------------------------------------------------------------
# 8. Bad arguments and refused combinations.
# ---------------------------------------------------------------------------

BAD = [
    (keras_ssam.MomentumSAM, dict(stable=True), "stable", True),
    (keras_ssam.MomentumSAM, dict(beta=1.0), "beta", 1.0),
    (keras_ssam.MomentumSAM, dict(beta=-0.5), "beta", -0.5),
    (keras_ssam.MomentumSAM, dict(rho=-1), "rho", -1),
    (keras_ssam.RandomSAM, dict(sigma=-1), "sigma", -1),
    (keras_ssam.RandomSAM, dict(mix=0), "mix", 0),
    (keras_ssam.RandomSAM, dict(mix=1.5), "mix", 1.5),
    (keras_ssam.RandomSAM, dict(eta=2.0), "eta", 2.0),
    (keras_ssam.RandomSAM, dict(beta=0.5), "beta", 0.5),
    (keras_ssam.RandomSAM, dict(adaptive=True, beta=1), "beta", 1),
    (keras_ssam.RandomSAM, dict(adaptive=True, eta=-1.0), "eta", -1.0),
    (keras_ssam.RandomSAM, dict(adaptive="yes"), "adaptive", "yes"),
    (EveryK, dict(k=0), "k", 0),
    (EveryK, dict(k=2.5), "k", 2.5),
    (EveryK, dict(k=3, offset=3), "offset", 3),
    (EveryK, dict(k=3, offset=-1), "offset", -1),
    (LatePhase, dict(start_step=-1), "start_step", -1),
    (AdaptiveSteps, dict(total_steps=0), "total_steps", 0),
    (AdaptiveSteps, dict(total_steps=10, delta=1), "delta", 1),
    (AdaptiveSteps, dict(total_steps=10, delta=-0.1), "delta", -0.1),
    (AdaptiveSteps, dict(total_steps=10, c_end=float("nan")), "c_end", float("nan")),
]


@pytest.mark.parametrize("cls,kwargs,arg,value", BAD,
                         ids=[f"{c.__name__}-{'-'.join(f'{k}={v!r}' for k, v in kw.items())}" for c, kw, _, _ in BAD])
def test_bad_arguments_raise(cls, kwargs, arg, value):
    with pytest.raises(ValueError) as info:
        if cls in (keras_ssam.MomentumSAM, keras_ssam.RandomSAM):
            cls(keras.optimizers.SGD(0.1), **kwargs)
        else:
            cls(**kwargs)
    message = str(info.value)
    assert f"`{arg}`" in message, message
    assert f"{arg}={value!r}" in message, message


def test_good_edge_arguments_accepted():
    """The ends of the ranges are valid."""
    sgd = keras.optimizers.SGD
    assert keras_ssam.MomentumSAM(sgd(0.1), rho=0.0, beta=0.0).beta == 0.0
    opt = keras_ssam.RandomSAM(sgd(0.1), sigma=0.0, mix=1.0, adaptive=True, eta=0.0, beta=0.0)
    assert (opt.sigma, opt.mix, opt.noise_eta, opt.noise_beta) == (0.0, 1.0, 0.0, 0.0)
    assert (EveryK(1).k, EveryK(4, offset=3).offset, LatePhase(0).start_step) == (1, 3, 0)
    assert AdaptiveSteps(1, delta=0.0).delta == 0.0


def _refused_cases():
    """`(optimizer, SAMModel kwargs, words the error names)`, each refused
    at the first step."""
    sgd = lambda: keras.optimizers.SGD(LR, momentum=MOMENTUM)  # noqa: E731
    return [
        (keras_ssam.MomentumSAM(sgd()), dict(num_batch_splits=2), ("MomentumSAM", "num_batch_splits")),
        (keras_ssam.RandomSAM(sgd(), seed=1), dict(num_batch_splits=2), ("RandomSAM", "num_batch_splits")),
        (keras_ssam.MomentumSAM(sgd(), sam_probability=AdaptiveSteps(10)), {}, ("MomentumSAM", "AdaptiveSteps")),
        (keras_ssam.RandomSAM(sgd(), seed=1, sam_probability=AdaptiveSteps(10)), {}, ("RandomSAM", "AdaptiveSteps")),
    ]


def test_refused_combinations():
    """At fit: MomentumSAM and RandomSAM with num_batch_splits=2 raise
    NotImplementedError naming the optimizer and num_batch_splits;
    AdaptiveSteps with MomentumSAM or RandomSAM (one pass) raises
    NotImplementedError naming the optimizer and AdaptiveSteps."""
    params, x, y = _problem(seed=52, n=8)
    for opt, kwargs, words in _refused_cases():
        model, _ = _sam_model(params, opt, **kwargs)
        with pytest.raises(NotImplementedError) as info:
            model.fit(x, y, batch_size=4, epochs=1, verbose=0)
        message = str(info.value)
        assert all(word in message for word in words), (words, message)


def test_refusals_leave_the_model_intact():
    """After each refusal above the model is as before: the same weights,
    and predict runs (the contract the other configuration errors keep,
    test_perturb.py and test_validation.py)."""
    params, x, y = _problem(seed=52, n=8)
    for opt, kwargs, words in _refused_cases():
        model, inner = _sam_model(params, opt, **kwargs)
        with pytest.raises(NotImplementedError):
            model.fit(x, y, batch_size=4, epochs=1, verbose=0)
        try:
            weights = _weights(inner)
        except Exception as error:  # noqa: BLE001
            raise AssertionError(f"{words}: the weights cannot be read after the refusal: {error!r}") from error
        _check_trajectory([weights], [params], rtol=0, atol=0, what=f"{words}: after the refusal")
        want = np.tanh(x @ params[0] + params[1]) @ params[2] + params[3]
        np.testing.assert_allclose(model.predict(x, verbose=0), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# 9. Config round trips.
# ---------------------------------------------------------------------------

CONFIG_CASES = {
    "MomentumSAM": (keras_ssam.MomentumSAM, dict(rho=0.4, beta=0.7, epsilon=1e-10, sam_probability=EveryK(3, offset=2),
                                                 seed=9, perturb="no_norm", name="my_msam")),
    "MomentumSAM-rho-schedule": (keras_ssam.MomentumSAM, dict(
        rho=keras.optimizers.schedules.ExponentialDecay(0.3, 100, 0.5), sam_probability=LatePhase(10), seed=1)),
    "MomentumSAM-probability": (keras_ssam.MomentumSAM, dict(rho=0.2, sam_probability=0.5, seed=4)),
    "RandomSAM": (keras_ssam.RandomSAM, dict(sigma=0.02, mix=0.5, adaptive=True, eta=2.0, beta=0.8,
                                             sam_probability=LatePhase(4), seed=3, perturb="no_norm", name="my_rwp")),
    "RandomSAM-one-pass": (keras_ssam.RandomSAM, dict(sigma=0.015, mix=None, adaptive=False, seed=12,
                                                      sam_probability=EveryK(2))),
    "RandomSAM-sigma-schedule": (keras_ssam.RandomSAM, dict(
        sigma=keras.optimizers.schedules.PolynomialDecay(0.02, 100, 0.01), seed=6)),
    "SSAM-AdaptiveSteps": (keras_ssam.SSAM, dict(rho=0.3, seed=4, sam_probability=AdaptiveSteps(
        100, delta=0.8, c_start=0.5, c_end=-0.5))),
    "LookSAM-EveryK": (keras_ssam.LookSAM, dict(rho=0.05, k=4, seed=2, sam_probability=EveryK(4, offset=1))),
}
# RandomSAM's ARWP arguments are stored under other attribute names.
ATTRIBUTES = {(keras_ssam.RandomSAM, "adaptive"): "adaptive_noise", (keras_ssam.RandomSAM, "eta"): "noise_eta",
              (keras_ssam.RandomSAM, "beta"): "noise_beta"}


def _same(a, b):
    """Equal values, or schedule objects of the same class and config."""
    if hasattr(a, "get_config"):
        return type(a) is type(b) and a.get_config() == b.get_config()
    return a == b


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_round_trip(case):
    cls, kwargs = CONFIG_CASES[case]
    opt = cls(keras.optimizers.SGD(0.05, momentum=0.9), **kwargs)
    config = opt.get_config()
    for key, value in kwargs.items():
        want = keras.saving.serialize_keras_object(value) if hasattr(value, "get_config") else value
        assert config[key] == want, key
    if cls is keras_ssam.MomentumSAM:
        assert "stable" not in config and "normalize" not in config
    if cls is keras_ssam.RandomSAM:
        assert "rho" not in config and "epsilon" not in config
        assert isinstance(config["seed"], int)
    again = cls.from_config(config)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(opt))
    for other in (again, restored):
        assert type(other) is cls
        assert other.get_config() == config
        assert other.base_optimizer.get_config() == opt.base_optimizer.get_config()
        for key, value in kwargs.items():
            if key != "name":
                got = getattr(other, ATTRIBUTES.get((cls, key), key))
                assert _same(got, value), (key, got, value)
    if cls is keras_ssam.MomentumSAM:
        assert restored.direction == opt.direction


# ---------------------------------------------------------------------------
# 10. Mixed precision.
# ---------------------------------------------------------------------------


def test_mixed_float16():
    """Under mixed_float16 (compile wraps the SAM optimizer in a
    LossScaleOptimizer, scale 2^15; the Dense layers compute in float16, a
    float32 head), 8 steps of MomentumSAM (base momentum, own average) and
    RandomSAM (ARWP, m-RWP; the noise fed in) stay finite, skip no step (the
    scale stays 2^15) and stay within float16 rounding (atol 5e-3 on O(0.5)
    weights) of the float64 reference, which the float32 run of the same
    case matches to 1e-6 (sections 1 and 2); ARWP's F within 2e-2 of the
    reference's (a loss scale left in it would be 2^30 off), and the
    trajectory far from plain SGD's. The problem keeps every gradient below
    1.5 (checked), so that no step overflows float16 at scale 2^15 (a
    gradient over 2 would, and the LossScaleOptimizer would skip it); sigma
    is 0.05, as with 0.1 the float16 backward pass of m-RWP's noisy pass
    overflows on JAX at step 2 (inf times a saturated tanh's 0: NaN), which
    the LossScaleOptimizer rightly skips."""
    params, x, y = _problem(seed=54, n=12)
    batches = _batches(x, y)
    table = _normal_table(9)
    sgd = lambda: keras.optimizers.SGD(LR, momentum=MOMENTUM)  # noqa: E731
    loss = ref.TanhMLP.loss_and_grads
    cases = {
        "MomentumSAM": (lambda: keras_ssam.MomentumSAM(sgd(), rho=0.3),
                        lambda: pref.MomentumSAM(loss, pref.SGD(LR, MOMENTUM), 0.3)),
        "MomentumSAM-own-average": (lambda: keras_ssam.MomentumSAM(keras.optimizers.SGD(LR), rho=0.3, beta=0.5),
                                    lambda: pref.MomentumSAM(loss, pref.SGD(LR), 0.3, source="own", beta=0.5)),
        "ARWP": (lambda: FedNoiseRandomSAM(sgd(), sigma=0.05, adaptive=True, eta=2.0, beta=0.8, table=table),
                 lambda: pref.RandomSAM(loss, pref.SGD(LR, MOMENTUM), 0.05, _table_normals(table), adaptive=True,
                                        eta=2.0, beta=0.8)),
        "m-RWP": (lambda: FedNoiseRandomSAM(sgd(), sigma=0.05, mix=0.5, table=table),
                  lambda: pref.RandomSAM(loss, pref.SGD(LR, MOMENTUM), 0.05, _table_normals(table), mix=0.5)),
    }
    plain, _ = pref.run(pref.MomentumSAM(loss, pref.SGD(LR, MOMENTUM), 0.0), params, batches)
    keras.config.set_dtype_policy("mixed_float16")
    try:
        for name, (make, method) in cases.items():
            opt = make()
            model, inner = _sam_model(params, opt, float32_head=True)
            assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
            assert inner.get_layer("hidden").compute_dtype == "float16"
            got, logs, _ = _train_steps(model, inner, batches)
            assert float(_np(model.optimizer.dynamic_scale)) == 2.0**15, name  # no step skipped
            assert all(np.all(np.isfinite(w)) for step in got for w in step), name
            assert all(np.isfinite(log["loss"]) for log in logs), name
            want, records = pref.run(method(), params, batches)
            largest = max(float(np.max(np.abs(g))) for r in records for g in r.get("grads", r.get("grads_eps")))
            assert largest < 1.5, f"setup: gradients of {largest} may overflow float16 at scale 2^15 (max 2)"
            _check_trajectory(got, want, rtol=0.0, atol=5e-3, what=f"{name} mixed vs reference")
            if name == "ARWP":
                for a, b in zip(_own_state(opt), records[-1]["fisher"]):
                    np.testing.assert_allclose(a, b, rtol=2e-2, atol=1e-6, err_msg="F")
            if name.startswith("MomentumSAM"):
                _assert_differs(want[-1], plain[-1], 5e-3, f"{name}: plain SGD")
    finally:
        keras.config.set_dtype_policy("float32")

"""Efficient SAM (issue 10): `sam_probability`/`seed` on every SAM optimizer,
`keras_ssam.LookSAM`, and the diagnostics over the steps that ran the
perturbed pass, on every backend.

Every numeric test compares with the independent float64 NumPy reference in
`efficient_reference.py` (linear `Dense` + Keras "mse", gradients by hand,
Keras SGD spelled out in `test_features.NumpyOptimizer`):

a. LookSAM (k=3, 8 steps, SGD with momentum), global and layerwise g_v,
   normalize and stable, weights after every step and the diagnostics; the
   clean-gradient fallback keeps g_v; steps_per_execution, jit_compile and
   mixed_float16.
b. (torch) layerwise LookSAM against `pytorch_optimizer.LookSAM`.
c. `sam_probability`: 0 is the base optimizer bit for bit, 1 is SAM bit for
   bit, 0.5 with a seed runs the perturbed pass exactly on the steps NumPy's
   draw picks (the same steps on every backend), a callable, a schedule.
d. `model.save` / `load_model` in the middle of a LookSAM cycle resumes
   exactly (g_v, the iteration count and the seed are saved).
e. The perturbed forward pass is skipped, not computed and discarded: a layer
   counts its executed forward passes.
f. Bad arguments raise ValueError naming the argument and the value.
g. `get_config` / `from_config` round trips.
"""

import random

import keras
import numpy as np
import pytest
from efficient_reference import EfficientSAM, epoch_diagnostics, relu_linear_mse, run, step_draws
from test_features import (
    DIAGNOSTICS,
    NumpyOptimizer,
    _assert_differs,
    _assert_params_close,
    _inner,
    _np,
    _problem,
    _sam_model,
    _weights,
    chunked_sam_reference,
    linear_mse,
)

import keras_ssam

BACKEND = keras.backend.backend()


def _batches(x, y, batch_size, epochs=1):
    """The batches `fit(shuffle=False)` sees, in order."""
    return [
        (x[s:s + batch_size].astype(np.float64), y[s:s + batch_size].astype(np.float64))
        for _ in range(epochs)
        for s in range(0, len(x), batch_size)
    ]


def _train_steps(model, inner, batches):
    """One `train_on_batch` per batch; the weights and logs after each."""
    weights, logs = [], []
    for xb, yb in batches:
        model.reset_metrics()  # train_on_batch does it itself since Keras 3.15 only
        logs.append(model.train_on_batch(xb.astype("float32"), yb.astype("float32"), return_dict=True))
        weights.append(_weights(inner))
    return weights, logs


# g_v = g_s - (<g, g_s> / ||g||^2) g is a difference of nearly parallel
# vectors (here ||g_v|| ~ 0.03-0.2 ||g_s||), and the reuse rescales it to
# alpha ||g||: float32's ~6e-8 relative rounding in g, g_s comes back 5-30x
# larger. Over 8 steps Keras and pytorch_optimizer in float32 are both
# ~1.5e-6 (absolute, weights O(1)) from the float64 reference; hence atol 5e-6
# for LookSAM trajectories. Every wrong variant checked against differs by
# > 1e-2.
LOOKSAM_ATOL = 5e-6


def _check_trajectory(got, want, rtol=1e-5, atol=1e-6):
    for step, (g, w) in enumerate(zip(got, want)):
        for a, b in zip(g, w):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"after step {step}")


def _check_step_logs(logs, records):
    """Per train_on_batch call: `sam_step_fraction` is 1 on the steps that ran
    the perturbed pass and 0 on the others; on the former the diagnostics
    equal the reference's. (Keras float32 weights drift from the float64
    trajectory by ~1e-7 relative per step; `sharpness` is a difference of
    losses, hence atol 1e-6.)"""
    assert [log["sam_step_fraction"] for log in logs] == [float(r["perturbed"]) for r in records]
    for step, (log, rec) in enumerate(zip(logs, records)):
        np.testing.assert_allclose(log["loss"], rec["loss"], rtol=1e-5, err_msg=f"loss, step {step}")
        if rec["perturbed"]:
            for key in DIAGNOSTICS:
                np.testing.assert_allclose(
                    log[key], rec[key], rtol=1e-4, atol=1e-6, err_msg=f"{key}, step {step}"
                )


# ---------------------------------------------------------------------------
# The draw.
# ---------------------------------------------------------------------------


def test_reference_draw_equals_sam_step_draws():
    """The reference's u_t (written from the spec) equals the library's
    NumPy helper, across the 65536-entry table's wrap-around."""
    its = list(range(300)) + [65535, 65536, 65537, 131071, 131072, 10**6, 2**32 - 1, 2**32]
    for seed in (0, 7, 123456789):
        want = step_draws(seed, its)
        got = keras_ssam.optimizers.sam_step_draws(seed, its)
        assert np.asarray(got).dtype == np.float32
        np.testing.assert_array_equal(got, want)
    assert np.all((want >= 0) & (want < 1))
    # Not trivially periodic in 65536: t and t + 65536 differ.
    assert want[its.index(65536)] != want[its.index(0)]


def test_seed_none_comes_from_python_random():
    """`seed=None` draws `random.randint(1, 10**9)`, which
    `keras.utils.set_random_seed` seeds; the seed is in the config."""
    keras.utils.set_random_seed(42)
    a = keras_ssam.SAM(keras.optimizers.SGD(0.1), sam_probability=0.5)
    keras.utils.set_random_seed(42)
    b = keras_ssam.LookSAM(keras.optimizers.SGD(0.1), sam_probability=0.5)
    want = random.Random(42).randint(1, 10**9)
    assert a.get_config()["seed"] == want
    assert b.get_config()["seed"] == want
    c = keras_ssam.SAM(keras.optimizers.SGD(0.1), sam_probability=0.5)
    assert c.get_config()["seed"] != want  # the next draw
    assert keras_ssam.SSAM(keras.optimizers.SGD(0.1), seed=5).get_config()["seed"] == 5


def test_default_probability_takes_nothing_from_python_random():
    """With `sam_probability` 1.0 (the default) or 0.0 no step is random: no
    seed is drawn (config `seed` None), so creating the optimizer leaves
    Python's `random`, and the initial weights of layers built after it, as
    a plain optimizer would."""
    keras.utils.set_random_seed(42)
    want = random.random()
    for make in (
        lambda: keras_ssam.SAM(keras.optimizers.SGD(0.1)),
        lambda: keras_ssam.LookSAM(keras.optimizers.SGD(0.1), k=3),
        lambda: keras_ssam.SSAM(keras.optimizers.SGD(0.1), sam_probability=0.0),
    ):
        keras.utils.set_random_seed(42)
        assert make().get_config()["seed"] is None
        assert random.random() == want


# ---------------------------------------------------------------------------
# a. LookSAM against the reference.
# ---------------------------------------------------------------------------

LOOKSAM_CASES = {
    "global": dict(layerwise=False, normalize=True, stable=False),
    "layerwise": dict(layerwise=True, normalize=True, stable=False),
    "global-unnormalized-stable": dict(layerwise=False, normalize=False, stable=True),
    "layerwise-unnormalized": dict(layerwise=True, normalize=False, stable=False),
    "layerwise-stable": dict(layerwise=True, normalize=True, stable=True),
    "global-stable-max_scale": dict(layerwise=False, normalize=True, stable=True, max_scale=0.9),
}


@pytest.mark.parametrize("case", list(LOOKSAM_CASES))
def test_looksam_matches_reference(case):
    """LookSAM(k=3, alpha=0.7) over 8 steps (2 epochs of 4 batches), SGD with
    momentum 0.9: the perturbed pass runs at t = 0, 3, 6; the other steps
    reuse g_v. The weights after every step match the float64 reference;
    `sam_step_fraction` is 1 exactly on t = 0, 3, 6 and the diagnostics of
    those steps match. It would fail for SAM on every step, for no reuse
    (alpha=0), and for the other choice of `layerwise` (checked below)."""
    kwargs = LOOKSAM_CASES[case]
    rho, lr, k, alpha = 0.3, 0.1, 3, 0.7
    x, y, params = _problem(n=16, d_in=3, d_out=2, seed=21)
    batches = _batches(x, y, 4, epochs=2)
    opt = keras_ssam.LookSAM(keras.optimizers.SGD(lr, momentum=0.9), rho=rho, k=k, alpha=alpha, **kwargs)
    model, inner = _sam_model(params, opt, diagnostics=True)
    got, logs = _train_steps(model, inner, batches)

    def reference(**over):
        ref = EfficientSAM(linear_mse, rho=rho, **{"k": k, "alpha": alpha, **kwargs, **over})
        return run(ref, params, batches, NumpyOptimizer(lr, momentum=0.9))

    want, records = reference()
    assert [r["perturbed"] for r in records] == [t % 3 == 0 for t in range(8)]
    _check_trajectory(got, want, atol=LOOKSAM_ATOL)
    _check_step_logs(logs, records)
    assert int(_np(model.optimizer.iterations)) == 8

    every, _ = reference(k=1)
    _assert_differs(every[-1], want[-1], 1e-5, "SAM on every step")
    no_reuse, _ = reference(alpha=0.0)
    _assert_differs(no_reuse[-1], want[-1], 1e-5, "LookSAM without g_v reuse (alpha=0)")
    other, _ = reference(layerwise=not kwargs["layerwise"])
    _assert_differs(other[-1], want[-1], 1e-5, "the other `layerwise`")
    if kwargs["stable"]:
        unstable, _ = reference(stable=False, max_scale=None)
        _assert_differs(unstable[-1], want[-1], 1e-5, "stable=False")


def test_looksam_fit_epoch_diagnostics():
    """fit, 2 epochs of 4 steps, LookSAM k=3: epoch 1 runs the perturbed pass
    at t = 0, 3 (sam_step_fraction 0.5), epoch 2 at t = 6 (0.25); the other
    diagnostics are means over those steps only, the loss over all."""
    rho, lr = 0.3, 0.1
    x, y, params = _problem(n=16, d_in=3, d_out=2, seed=22)
    opt = keras_ssam.LookSAM(keras.optimizers.SGD(lr, momentum=0.9), rho=rho, k=3, stable=True)
    model, inner = _sam_model(params, opt, diagnostics=True)
    hist = model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0).history
    ref = EfficientSAM(linear_mse, rho=rho, k=3, stable=True)
    want, records = run(ref, params, _batches(x, y, 4, epochs=2), NumpyOptimizer(lr, momentum=0.9))
    _assert_params_close(_weights(inner), want[-1], atol=LOOKSAM_ATOL)
    assert hist["sam_step_fraction"] == [0.5, 0.25]
    for epoch in range(2):
        expect = epoch_diagnostics(records[4 * epoch:4 * epoch + 4])
        for key in DIAGNOSTICS + ("loss",):
            np.testing.assert_allclose(
                hist[key][epoch], expect[key], rtol=1e-4, atol=1e-6, err_msg=f"{key}, epoch {epoch}"
            )
    # Means over all steps (reused steps counted with the clean gradient's
    # norm) would differ.
    all_steps = np.mean([r["grad_norm"] for r in records[:4]])
    assert abs(all_steps - epoch_diagnostics(records[:4])["grad_norm"]) > 1e-3


def test_looksam_clean_fallback_keeps_previous_g_v():
    """A LookSAM step whose g_s is exactly 0 while g is not takes g and keeps
    the g_v of the previous perturbed step. `relu(x W + b)` with targets
    above the predictions: the ascent lowers every pre-activation; with
    rho = 50 from t = 2 (PiecewiseConstantDecay) they all fall below 0 and
    g_s = 0. k=2: t = 0 stores g_v, t = 1 reuses it, t = 2 falls back
    (clean_fallback 1), t = 3 reuses t = 0's g_v. Storing the projection of
    the vanished g_s (g_v = 0) at t = 2 would differ (checked)."""
    rs = np.random.RandomState(0)
    x = rs.uniform(0.5, 1.5, size=(16, 3)).astype("float32")
    y = (3 + rs.normal(size=(16, 1))).astype("float32")
    params = [rs.uniform(0.0, 0.4, size=(3, 1)).astype("float32").astype(np.float64), np.array([0.1])]
    batches = _batches(x, y, 4)
    inp = keras.Input((3,))
    inner = keras.Model(inp, keras.layers.Dense(1, activation="relu", name="lin")(inp))
    inner.get_layer("lin").set_weights([p.astype("float32") for p in params])
    rho = keras.optimizers.schedules.PiecewiseConstantDecay([1], [0.05, 50.0])
    model = keras_ssam.SAMModel(inner, diagnostics=True)
    model.compile(optimizer=keras_ssam.LookSAM(keras.optimizers.SGD(0.1), rho=rho, k=2), loss="mse")
    got, logs = _train_steps(model, inner, batches)

    def reference(**over):
        ref = EfficientSAM(relu_linear_mse, rho=lambda t: 0.05 if t < 2 else 50.0, k=2, **over)
        return run(ref, params, batches, NumpyOptimizer(0.1))

    want, records = reference()
    assert [(r["perturbed"], r.get("clean_fallback")) for r in records] == [
        (True, 0.0), (False, None), (True, 1.0), (False, None)
    ]
    _check_trajectory(got, want, atol=LOOKSAM_ATOL)
    _check_step_logs(logs, records)
    overwritten, _ = reference(fallback_overwrites_g_v=True)
    _assert_differs(overwritten[-1], want[-1], LOOKSAM_ATOL, "g_v overwritten on the fallback step")


@pytest.mark.skipif(
    BACKEND == "torch",
    reason="Keras's torch backend needs steps_per_execution=1; jit_compile there is torch.compile",
)
@pytest.mark.parametrize("compile_kwargs", [{"steps_per_execution": 3}, {"jit_compile": True}],
                         ids=["steps_per_execution", "jit_compile"])
def test_looksam_with_probability_compiled(compile_kwargs):
    """LookSAM(k=2, sam_probability=0.6, seed=5) under steps_per_execution=3
    (the step count and the draw advance inside one compiled loop) or
    jit_compile=True: 8 steps of fit equal the reference (perturbed pass at
    t = 0, 4, 6)."""
    rho, lr = 0.3, 0.1
    x, y, params = _problem(n=16, d_in=3, d_out=2, seed=32)
    opt = keras_ssam.LookSAM(keras.optimizers.SGD(lr, momentum=0.9), rho=rho, k=2,
                             sam_probability=0.6, seed=5)
    model, inner = _sam_model(params, opt, diagnostics=True, **compile_kwargs)
    hist = model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0).history
    ref = EfficientSAM(linear_mse, rho=rho, k=2, probability=0.6, seed=5)
    want, records = run(ref, params, _batches(x, y, 2), NumpyOptimizer(lr, momentum=0.9))
    assert [t for t, r in enumerate(records) if r["perturbed"]] == [0, 4, 6]
    _assert_params_close(_weights(inner), want[-1], atol=LOOKSAM_ATOL)
    np.testing.assert_allclose(hist["sam_step_fraction"], [3 / 8], rtol=1e-6)
    expect = epoch_diagnostics(records)
    for key in DIAGNOSTICS + ("loss",):
        np.testing.assert_allclose(hist[key][0], expect[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_looksam_mixed_float16():
    """LookSAM(k=3) under mixed_float16 (compile wraps it in a
    LossScaleOptimizer, whose stateless_apply on JAX hands the SAM
    optimizer its variables, g_v included): 8 steps without overflow match
    the float64 reference. Tolerance: float16 gradients carry ~1e-3
    relative error, g_v's cancellation amplifies it (see LOOKSAM_ATOL):
    measured 6e-4, atol 5e-3; no reuse (alpha=0) is 0.13 away."""
    x, y, params = _problem(n=16, d_in=3, d_out=1, seed=1, x_scale=0.3, w_scale=0.5)
    y = (0.3 * y).astype("float32")
    batches = _batches(x, y, 4, epochs=2)
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model, inner = _sam_model(
            params, keras_ssam.LookSAM(keras.optimizers.SGD(0.1), rho=0.1, k=3),
            diagnostics=True, float32_head=True,
        )
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        got, logs = _train_steps(model, inner, batches)
        assert float(_np(model.optimizer.dynamic_scale)) == 2.0**15  # no step skipped
    finally:
        keras.config.set_dtype_policy("float32")
    want, records = run(EfficientSAM(linear_mse, rho=0.1, k=3), params, batches, NumpyOptimizer(0.1))
    assert [log["sam_step_fraction"] for log in logs] == [float(r["perturbed"]) for r in records]
    _check_trajectory(got, want, rtol=0.0, atol=5e-3)
    no_reuse, _ = run(EfficientSAM(linear_mse, rho=0.1, k=3, alpha=0.0), params, batches, NumpyOptimizer(0.1))
    _assert_differs(no_reuse[-1], want[-1], 5e-3, "no reuse (alpha=0)")


# ---------------------------------------------------------------------------
# b. pytorch_optimizer.LookSAM (torch).
# ---------------------------------------------------------------------------


@pytest.mark.skipif(BACKEND != "torch", reason="compares with pytorch_optimizer, a torch library")
def test_layerwise_looksam_matches_pytorch_optimizer():
    """`LookSAM(layerwise=True, normalize=True)` equals
    `pytorch_optimizer.LookSAM` (driven as its `step(closure)` does:
    gradient at w, `first_step`, gradient again, `second_step`) on the same
    `Linear(3, 2)`, data and SGD(lr), over 8 steps with k=3, within float32
    rounding. Its step counter starts at 0 with a full step, as
    `iterations` does.

    Where pytorch_optimizer differs from our definition (none of it matters
    here): the reuse divides by `||g_v|| + 1e-8` (ours: `||g_v||`, a g_v of
    norm 0 contributing 0); the projection clamps `||g||`, `||g_s||` below at
    `perturb_eps`; its g_v is always per tensor (our `layerwise=False` is
    global), its ascent always normalized; it has no `stable`, no
    `sam_probability`, and no clean-gradient fallback when `g_s == 0`. The
    float64 reference is checked against it too, and a global g_v would
    differ (checked)."""
    import torch
    from pytorch_optimizer import LookSAM as TorchLookSAM

    rho, lr, k, alpha = 0.3, 0.1, 3, 0.7
    x, y, params = _problem(n=16, d_in=3, d_out=2, seed=23)
    batches = _batches(x, y, 4, epochs=2)

    def torch_run(dtype):
        lin = torch.nn.Linear(3, 2).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(params[0].T, dtype=dtype))
            lin.bias.copy_(torch.tensor(params[1], dtype=dtype))
        opt = TorchLookSAM(lin.parameters(), torch.optim.SGD, rho=rho, k=k, alpha=alpha, lr=lr)
        traj = []
        for xb, yb in batches:
            xt, yt = torch.tensor(xb, dtype=dtype), torch.tensor(yb, dtype=dtype)

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(lin(xt), yt)
                loss.backward()
                return loss

            closure()
            opt.first_step()
            closure()  # at w + e on a full step, at w otherwise
            opt.second_step()
            traj.append([
                lin.weight.detach().cpu().numpy().T.astype(np.float64),
                lin.bias.detach().cpu().numpy().astype(np.float64),
            ])
        return traj

    torch32 = torch_run(torch.float32)
    opt = keras_ssam.LookSAM(
        keras.optimizers.SGD(lr), rho=rho, k=k, alpha=alpha, layerwise=True, normalize=True
    )
    model, inner = _sam_model(params, opt)
    got, _ = _train_steps(model, inner, batches)
    # Two float32 implementations, 8 steps: ~1e-6 apart (pytorch_optimizer
    # alone is 1.3e-6 from the float64 reference here).
    _check_trajectory(got, torch32, rtol=1e-5, atol=LOOKSAM_ATOL)

    # The float64 reference with pytorch_optimizer's `||g_v|| + 1e-8` equals
    # pytorch_optimizer in float64 up to its float32 ascent norm
    # (`get_global_gradient_norm` returns float32): 4e-9 here; without the
    # 1e-8 they differ by 2e-7.
    def reference(**over):
        kwargs = {"layerwise": True, "normalize": True, **over}
        ref = EfficientSAM(linear_mse, rho=rho, k=k, alpha=alpha, **kwargs)
        return run(ref, params, batches, NumpyOptimizer(lr))[0]

    _check_trajectory(torch_run(torch.float64), reference(reuse_epsilon=1e-8), rtol=1e-7, atol=2e-8)
    _check_trajectory(got, reference(), rtol=1e-5, atol=LOOKSAM_ATOL)
    _assert_differs(reference(layerwise=False)[-1], torch32[-1], LOOKSAM_ATOL, "a global g_v")


# ---------------------------------------------------------------------------
# c. sam_probability.
# ---------------------------------------------------------------------------

P0_CASES = {
    "SAM": lambda base: keras_ssam.SAM(base, rho=0.3, sam_probability=0.0),
    "SSAM": lambda base: keras_ssam.SSAM(base, rho=0.3, sam_probability=0.0),
    "LookSAM": lambda base: keras_ssam.LookSAM(base, rho=0.3, k=2, sam_probability=0.0),
}


@pytest.mark.parametrize("variant", list(P0_CASES))
def test_probability_zero_is_the_base_optimizer_exactly(variant):
    """`sam_probability=0.0`: 8 steps equal a plain `keras.Model` compiled
    with the same base optimizer bit for bit (LookSAM's g_v stays 0, so its
    reuse adds nothing), and the loss history too."""
    x, y, params = _problem(n=16, d_in=3, d_out=2, seed=24)
    plain = _inner(params)
    plain.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    h_plain = plain.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0).history
    model, inner = _sam_model(params, P0_CASES[variant](keras.optimizers.SGD(0.1, momentum=0.9)),
                              diagnostics=True)
    h_sam = model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0).history
    for a, b in zip(_weights(inner), _weights(plain)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(h_sam["loss"], h_plain["loss"])
    assert h_sam["sam_step_fraction"] == [0.0, 0.0]
    sam, _ = run(EfficientSAM(linear_mse, rho=0.3), params, _batches(x, y, 4, 2),
                 NumpyOptimizer(0.1, momentum=0.9))
    _assert_differs(sam[-1], _weights(plain), 1e-5, "SAM on every step")


@pytest.mark.parametrize("variant", ["SAM", "SSAM", "LookSAM"])
def test_probability_one_is_sam_exactly(variant):
    """`sam_probability=1.0` (any seed) is the optimizer without the argument,
    bit for bit: weights, loss and diagnostics."""
    cls = getattr(keras_ssam, variant)
    extra = {"k": 2} if variant == "LookSAM" else {}
    x, y, params = _problem(n=16, d_in=3, d_out=2, seed=25)
    runs = []
    for kwargs in ({}, {"sam_probability": 1.0, "seed": 3}):
        model, inner = _sam_model(
            params, cls(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.3, **extra, **kwargs),
            diagnostics=True,
        )
        hist = model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0).history
        runs.append((_weights(inner), hist))
    (w0, h0), (w1, h1) = runs
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)
    for key in ("loss", "sam_step_fraction") + DIAGNOSTICS:
        np.testing.assert_array_equal(h0[key], h1[key], err_msg=key)
    _assert_differs(w0, params, 1e-5, "untrained weights")


PROBABILITY_CASES = {
    # name: (optimizer class kwargs, seed, probability, NumPy probability)
    "SAM-p0.5-seed7": (dict(cls=keras_ssam.SAM), 7, 0.5),
    "SSAM-p0.5-seed7": (dict(cls=keras_ssam.SSAM), 7, 0.5),
    "LookSAM-k2-p0.6-seed5": (dict(cls=keras_ssam.LookSAM, k=2), 5, 0.6),
}


@pytest.mark.parametrize("case", list(PROBABILITY_CASES))
def test_probability_draw_picks_the_numpy_steps(case):
    """`sam_probability=p, seed=s`, 8 `train_on_batch` steps: the steps that
    run the perturbed pass (`sam_step_fraction` 1 for the step, 0 else) are
    those with u_t < p for NumPy's u_t, an assertion that is the same on
    every backend, so every backend picks the same steps; the weights after
    every step match the reference that runs the perturbed pass on exactly
    those steps, and would not match SAM on every step or on none.
    (seed 7: only t = 7; LookSAM k=2, seed 5: t = 0, 4, 6, not t = 2.)"""
    spec, seed, p = PROBABILITY_CASES[case]
    spec = dict(spec)
    cls = spec.pop("cls")
    k = spec.get("k")
    stable = cls is keras_ssam.SSAM
    normalize = cls is not keras_ssam.SSAM
    rho, lr = 0.3, 0.1
    x, y, params = _problem(n=16, d_in=3, d_out=2, seed=26)
    batches = _batches(x, y, 4, epochs=2)
    u = step_draws(seed, range(8))
    assert np.min(np.abs(u - p)) > 1e-3, "setup: no draw at the threshold"
    mask = [bool(u[t] < p) and (k is None or t % k == 0) for t in range(8)]
    assert 0 < sum(mask) < (8 if k is None else 4), f"setup: the pattern {mask} is trivial"

    opt = cls(keras.optimizers.SGD(lr, momentum=0.9), rho=rho, sam_probability=p, seed=seed, **spec)
    model, inner = _sam_model(params, opt, diagnostics=True)
    got, logs = _train_steps(model, inner, batches)

    def reference(**over):
        ref = EfficientSAM(linear_mse, rho=rho, normalize=normalize, stable=stable, k=k,
                           probability=p, seed=seed, **over)
        return run(ref, params, batches, NumpyOptimizer(lr, momentum=0.9))

    want, records = reference()
    assert [r["perturbed"] for r in records] == mask
    assert [log["sam_step_fraction"] for log in logs] == [float(m) for m in mask]
    _check_trajectory(got, want, atol=1e-6 if k is None else LOOKSAM_ATOL)
    _check_step_logs(logs, records)
    every, _ = reference(mask=lambda t: k is None or t % k == 0)
    _assert_differs(every[-1], want[-1], 1e-5, "the perturbed pass on every (k-th) step")
    never, _ = reference(mask=lambda t: False)
    _assert_differs(never[-1], want[-1], 1e-5, "no perturbed pass")


def test_probability_draw_across_the_table_wrap():
    """The draw at t = 65532 .. 65539 (the 65536-entry table wraps, the
    second term T[t // 65536] changes from T[0] to T[1]): SAM(p=0.5, seed=6)
    after `iterations` is set to 65532 runs the perturbed pass on the steps
    NumPy's u_t picks, which differ from those of `t % 65536` alone."""
    rho, lr, seed = 0.3, 0.1, 6
    its = range(65532, 65540)
    mask = (step_draws(seed, its) < 0.5).tolist()
    assert np.min(np.abs(step_draws(seed, its) - 0.5)) > 1e-3, "setup"
    assert mask != (step_draws(seed, [t % 65536 for t in its]) < 0.5).tolist(), "setup"
    x, y, params = _problem(n=36, d_in=3, d_out=2, seed=33)
    batches = _batches(x, y, 4)
    opt = keras_ssam.SAM(keras.optimizers.SGD(lr, momentum=0.9), rho=rho, sam_probability=0.5, seed=seed)
    model, inner = _sam_model(params, opt, diagnostics=True)
    first, _ = _train_steps(model, inner, batches[:1])
    model.optimizer.iterations.assign(65532)
    got, logs = _train_steps(model, inner, batches[1:])
    assert int(_np(model.optimizer.iterations)) == 65540
    assert [log["sam_step_fraction"] for log in logs] == [float(m) for m in mask]

    ref = EfficientSAM(linear_mse, rho=rho, probability=0.5, seed=seed)
    base = NumpyOptimizer(lr, momentum=0.9)  # its update does not depend on t
    want, _ = run(ref, params, batches[:1], base)
    base.t = 65532
    rest, records = run(ref, want[-1], batches[1:], base)
    assert [r["perturbed"] for r in records] == mask
    _check_trajectory(first + got, want + rest)


def test_probability_with_num_batch_splits():
    """SAM(p=0.6, seed=5) with num_batch_splits=2, 8 steps: on the drawn
    steps each half-batch its own SAM gradient (m-sharpness, as
    `test_features.chunked_sam_reference`), on the others the clean
    gradient of the whole batch."""
    rho, lr, seed = 0.3, 0.1, 5
    x, y, params = _problem(n=16, d_in=3, d_out=2, seed=34)
    batches = _batches(x, y, 4, epochs=2)
    mask = (step_draws(seed, range(8)) < 0.6).tolist()
    assert 0 < sum(mask) < 8, "setup"
    opt = keras_ssam.SAM(keras.optimizers.SGD(lr, momentum=0.9), rho=rho, sam_probability=0.6, seed=seed)
    model, inner = _sam_model(params, opt, diagnostics=True, num_batch_splits=2)
    got, logs = _train_steps(model, inner, batches)
    assert [log["sam_step_fraction"] for log in logs] == [float(m) for m in mask]

    base, w, want = NumpyOptimizer(lr, momentum=0.9), params, []
    for t, (xb, yb) in enumerate(batches):
        if mask[t]:
            rec = chunked_sam_reference(w, xb, yb, rho, 2, normalize=True, stable=False)
            np.testing.assert_allclose(logs[t]["grad_norm"], rec["grad_norm"], rtol=1e-4, err_msg=f"step {t}")
            update = rec["update"]
        else:
            update = linear_mse(w, xb, yb)[1]
        w = base.apply(w, update)
        want.append(w)
    _check_trajectory(got, want)
    whole, _ = run(EfficientSAM(linear_mse, rho=rho, probability=0.6, seed=seed), params, batches,
                   NumpyOptimizer(lr, momentum=0.9))
    _assert_differs(whole[-1], want[-1], 1e-5, "no batch splitting")


def test_probability_callable():
    """`sam_probability=lambda it: it % 3 == 0` (a bool): SSAM runs the
    perturbed pass at t = 0, 3, 6 of 8 steps (fit, 1 epoch):
    sam_step_fraction 3/8, diagnostics the means over those three steps."""
    rho, lr = 0.3, 0.1
    x, y, params = _problem(n=16, d_in=3, d_out=2, seed=27)
    opt = keras_ssam.SSAM(keras.optimizers.SGD(lr, momentum=0.9), rho=rho,
                          sam_probability=lambda it: it % 3 == 0, seed=1)
    model, inner = _sam_model(params, opt, diagnostics=True)
    hist = model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0).history
    ref = EfficientSAM(linear_mse, rho=rho, normalize=False, stable=True,
                       probability=lambda t: t % 3 == 0, seed=1)
    want, records = run(ref, params, _batches(x, y, 2), NumpyOptimizer(lr, momentum=0.9))
    assert [r["perturbed"] for r in records] == [t % 3 == 0 for t in range(8)]
    _assert_params_close(_weights(inner), want[-1])
    np.testing.assert_allclose(hist["sam_step_fraction"], [3 / 8], rtol=1e-6)
    expect = epoch_diagnostics(records)
    for key in DIAGNOSTICS + ("loss",):
        np.testing.assert_allclose(hist[key][0], expect[key], rtol=1e-4, atol=1e-6, err_msg=key)
    every, _ = run(EfficientSAM(linear_mse, rho=rho, normalize=False, stable=True),
                   params, _batches(x, y, 2), NumpyOptimizer(lr, momentum=0.9))
    _assert_differs(every[-1], want[-1], 1e-5, "SAM on every step")


def test_probability_schedule():
    """`sam_probability=ExponentialDecay(1.0, 1, 0.7)`, p_t = 0.7^t, seed 3:
    the perturbed pass runs at t = 0 and 3 of 8 (u_t < p_t)."""
    rho, lr, seed = 0.3, 0.1, 3
    x, y, params = _problem(n=16, d_in=3, d_out=2, seed=28)
    batches = _batches(x, y, 4, epochs=2)
    p_fn = lambda t: 0.7**t  # noqa: E731
    u = step_draws(seed, range(8))
    assert np.min(np.abs(u - 0.7 ** np.arange(8))) > 1e-3, "setup"
    schedule = keras.optimizers.schedules.ExponentialDecay(1.0, decay_steps=1, decay_rate=0.7)
    opt = keras_ssam.SAM(keras.optimizers.SGD(lr, momentum=0.9), rho=rho, sam_probability=schedule, seed=seed)
    model, inner = _sam_model(params, opt, diagnostics=True)
    got, logs = _train_steps(model, inner, batches)
    ref = EfficientSAM(linear_mse, rho=rho, probability=p_fn, seed=seed)
    want, records = run(ref, params, batches, NumpyOptimizer(lr, momentum=0.9))
    assert [t for t, r in enumerate(records) if r["perturbed"]] == [0, 3]
    _check_trajectory(got, want)
    _check_step_logs(logs, records)
    # p = 0.7 fixed would pick other steps.
    fixed = EfficientSAM(linear_mse, rho=rho, probability=0.7, seed=seed)
    assert [fixed.perturbed_at(t) for t in range(8)] != [r["perturbed"] for r in records]


# ---------------------------------------------------------------------------
# d. Save and load mid-cycle.
# ---------------------------------------------------------------------------

RESUME_CASES = {
    "LookSAM-k4": dict(k=4),
    "LookSAM-k2-layerwise-stable-p0.6": dict(k=2, layerwise=True, stable=True, sam_probability=0.6, seed=5),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_save_load_mid_cycle_resumes_exactly(case, tmp_path):
    """2 steps, `model.save`, `keras.models.load_model`, 3 more steps equal
    5 uninterrupted steps (to 1e-6) and the reference: g_v, the iteration
    count (t % k), momentum and the seed are restored. With k=4 steps 2 and
    3 reuse the g_v of step 0; losing it (g_v = 0 after loading) would
    differ (checked)."""
    kwargs = RESUME_CASES[case]
    rho, lr = 0.3, 0.1
    x, y, params = _problem(n=20, d_in=3, d_out=2, seed=29)
    batches = _batches(x, y, 4)
    assert len(batches) == 5

    def make():
        return _sam_model(params, keras_ssam.LookSAM(keras.optimizers.SGD(lr, momentum=0.9), rho=rho, **kwargs))

    model, inner = make()
    straight, _ = _train_steps(model, inner, batches)

    model, inner = make()
    first, _ = _train_steps(model, inner, batches[:2])
    path = str(tmp_path / "looksam.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, keras_ssam.SAMModel)
    assert type(loaded.optimizer) is keras_ssam.LookSAM
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert int(_np(loaded.optimizer.iterations)) == 2
    rest, _ = _train_steps(loaded, loaded.model, batches[2:])
    _check_trajectory(first + rest, straight, rtol=1e-6, atol=1e-7)

    ref_kwargs = {key: kwargs[key] for key in ("k", "layerwise", "stable") if key in kwargs}
    ref_kwargs.update(probability=kwargs.get("sam_probability", 1.0), seed=kwargs.get("seed", 0))
    ref = EfficientSAM(linear_mse, rho=rho, **ref_kwargs)
    opt = NumpyOptimizer(lr, momentum=0.9)
    want, records = run(ref, params, batches, opt)
    _check_trajectory(straight, want, atol=LOOKSAM_ATOL)
    assert not records[2]["perturbed"]  # the first step after loading reuses g_v

    # g_v lost at loading:
    ref = EfficientSAM(linear_mse, rho=rho, **ref_kwargs)
    opt = NumpyOptimizer(lr, momentum=0.9)
    lost, _ = run(ref, params, batches[:2], opt)
    ref.g_v = None
    lost_rest, _ = run(ref, lost[-1], batches[2:], opt)
    _assert_differs(lost_rest[-1], want[-1], 1e-6, "g_v reset at loading")


# ---------------------------------------------------------------------------
# e. Forward passes actually executed.
# ---------------------------------------------------------------------------

_PASSES = [0]


def _count_pass():
    _PASSES[0] += 1


class PassCounter(keras.layers.Layer):
    """Identity that counts its executed forward passes: a Python counter
    (torch; TensorFlow run eagerly), or a `jax.debug.callback` that fires
    only when the compiled step executes this call (not while tracing, and
    not in a `lax.cond` branch that is not taken)."""

    def call(self, x):
        if BACKEND == "jax":
            import jax

            jax.debug.callback(_count_pass)
        else:
            _count_pass()
        return x


def _counted_passes(params, optimizer, x, y):
    """Forward passes of the inner model over 6 steps of fit (batch 2)."""
    d_in, d_out = params[0].shape
    inp = keras.Input((d_in,))
    out = keras.layers.Dense(d_out, name="lin")(PassCounter()(inp))
    inner = keras.Model(inp, out)
    inner.get_layer("lin").set_weights([p.astype("float32") for p in params])
    compile_kwargs = {"run_eagerly": True} if BACKEND == "tensorflow" else {}
    if optimizer is None:
        model = inner
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", **compile_kwargs)
    else:
        model = keras_ssam.SAMModel(inner, diagnostics=True)
        model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    _PASSES[0] = 0
    hist = model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0).history
    if BACKEND == "jax":
        import jax

        jax.effects_barrier()
    return _PASSES[0], hist


def test_skipped_steps_skip_the_perturbed_forward_pass():
    """6 steps: a plain model runs 6 forward passes (plus any symbolic build
    calls, the baseline B); SAMModel with SAM runs 12 + B, with LookSAM(k=3)
    8 + B (perturbed passes at t = 0 and 3 only), with
    `sam_probability=0.0` 6 + B (clean passes only), with
    `sam_probability=0.6, seed=5` 6 + 5 + B (the draw picks 5 of 6 steps). A perturbed pass that
    is computed and then discarded (a select instead of a branch) counts."""
    x, y, params = _problem(n=12, d_in=3, d_out=2, seed=30)
    plain, _ = _counted_passes(params, None, x, y)
    sam, h_sam = _counted_passes(params, keras_ssam.SAM(keras.optimizers.SGD(0.1), rho=0.3), x, y)
    look, h_look = _counted_passes(params, keras_ssam.LookSAM(keras.optimizers.SGD(0.1), rho=0.3, k=3), x, y)
    never, h_never = _counted_passes(
        params, keras_ssam.SAM(keras.optimizers.SGD(0.1), rho=0.3, sam_probability=0.0), x, y
    )
    drawn, h_drawn = _counted_passes(
        params, keras_ssam.SAM(keras.optimizers.SGD(0.1), rho=0.3, sam_probability=0.6, seed=5), x, y
    )
    n_drawn = int(np.sum(step_draws(5, range(6)) < 0.6))
    assert 0 < n_drawn < 6, "setup"
    np.testing.assert_allclose(h_drawn["sam_step_fraction"], [n_drawn / 6])
    assert h_sam["sam_step_fraction"] == [1.0]
    np.testing.assert_allclose(h_look["sam_step_fraction"], [2 / 6])
    assert h_never["sam_step_fraction"] == [0.0]
    base = plain - 6
    assert base >= 0, f"a plain model ran {plain} passes in 6 steps"
    assert sam - never == 6, (sam, never)
    got = {"SAM": sam - 12, "LookSAM": look - 8, "p=0": never - 6, "p=0.6": drawn - 6 - n_drawn}
    assert got == dict.fromkeys(got, base), (
        f"plain {plain}, SAM {sam}, LookSAM {look}, p=0 {never}, p=0.6 {drawn} ({n_drawn} drawn)"
    )


# ---------------------------------------------------------------------------
# f. Bad arguments.
# ---------------------------------------------------------------------------

BAD = [
    ("LookSAM", "k", 0),
    ("LookSAM", "k", -2),
    ("LookSAM", "k", 2.5),
    ("LookSAM", "k", "3"),
    ("LookSAM", "k", True),
    ("LookSAM", "alpha", -0.1),
    ("LookSAM", "alpha", 1.5),
    ("LookSAM", "alpha", "0.5"),
    ("LookSAM", "layerwise", "yes"),
    ("LookSAM", "layerwise", 1),
    ("SAM", "sam_probability", 1.5),
    ("USAM", "sam_probability", -0.1),
    ("SSAM", "sam_probability", "half"),
    ("LookSAM", "sam_probability", float("nan")),
    ("SAM", "sam_probability", None),
    ("SAM", "seed", -1),
    ("SSAM", "seed", 1.5),
    ("LookSAM", "seed", "7"),
    ("USAM", "seed", True),
]


@pytest.mark.parametrize("cls_name,arg,value", BAD, ids=[f"{c}-{a}={v!r}" for c, a, v in BAD])
def test_bad_arguments_raise(cls_name, arg, value):
    cls = getattr(keras_ssam, cls_name)
    with pytest.raises(ValueError) as info:
        cls(keras.optimizers.SGD(0.1), **{arg: value})
    message = str(info.value)
    assert f"`{arg}`" in message, message
    assert repr(value) in message or str(value) in message, message


@pytest.mark.parametrize("cls_name", ["SAM", "USAM", "SSAM", "LookSAM"])
def test_good_edge_arguments_accepted(cls_name):
    """The ends of the ranges are valid."""
    cls = getattr(keras_ssam, cls_name)
    for p in (0.0, 1.0, 0, 1, lambda it: 0.5):
        assert cls(keras.optimizers.SGD(0.1), sam_probability=p, seed=0).sam_probability is p
    if cls_name == "LookSAM":
        for alpha in (0.0, 1.0):
            opt = cls(keras.optimizers.SGD(0.1), k=1, alpha=alpha, layerwise=True)
            assert (opt.k, opt.alpha, opt.layerwise) == (1, alpha, True)


# ---------------------------------------------------------------------------
# g. Config round trips.
# ---------------------------------------------------------------------------


def test_looksam_config_round_trip():
    opt = keras_ssam.LookSAM(
        keras.optimizers.SGD(0.05, momentum=0.9), rho=0.2, k=4, alpha=0.5, layerwise=True,
        normalize=False, stable=True, max_scale=2.0, epsilon=1e-10, sam_probability=0.6,
        seed=11, name="my_looksam",
    )
    config = opt.get_config()
    for key, value in dict(rho=0.2, k=4, alpha=0.5, layerwise=True, normalize=False, stable=True,
                           max_scale=2.0, epsilon=1e-10, sam_probability=0.6, seed=11,
                           name="my_looksam").items():
        assert config[key] == value, key
    again = keras_ssam.LookSAM.from_config(config)
    assert type(again) is keras_ssam.LookSAM
    assert again.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(opt))
    assert type(restored) is keras_ssam.LookSAM
    assert restored.get_config() == config
    assert restored.base_optimizer.get_config() == opt.base_optimizer.get_config()


@pytest.mark.parametrize("probability", ["float", "schedule"])
def test_sam_probability_config_round_trip(probability):
    if probability == "float":
        p = 0.25
    else:
        p = keras.optimizers.schedules.ExponentialDecay(1.0, decay_steps=1, decay_rate=0.7)
    keras.utils.set_random_seed(7)
    opt = keras_ssam.SSAM(keras.optimizers.SGD(0.1), rho=0.2, sam_probability=p)
    config = opt.get_config()
    seed = config["seed"]
    assert isinstance(seed, int) and 1 <= seed <= 10**9
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(opt))
    assert type(restored) is keras_ssam.SSAM
    assert restored.get_config() == config
    assert restored.get_config()["seed"] == seed
    again = keras_ssam.SSAM.from_config(config)
    assert again.get_config() == config
    if probability == "schedule":
        assert isinstance(again.sam_probability, keras.optimizers.schedules.ExponentialDecay)
        assert again.sam_probability.get_config() == p.get_config()
    else:
        assert again.sam_probability == 0.25


def test_probability_survives_a_retrace_on_a_partial_last_batch():
    """40 examples in batches of 16: the last batch (8) retraces the step on
    TensorFlow and JAX (JAX used to reuse a tracer of the first trace). The
    logged fraction of SAM steps is the NumPy draw's over the 3 steps."""
    rs = np.random.RandomState(0)
    x = rs.rand(40, 8).astype("float32")
    y = rs.randint(0, 3, 40)
    model = keras_ssam.SAMModel(keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)]), diagnostics=True)
    model.compile(
        optimizer=keras_ssam.SAM(keras.optimizers.SGD(0.1), sam_probability=0.5, seed=0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    drawn = step_draws(0, range(6)) < 0.5
    np.testing.assert_allclose(history["sam_step_fraction"], [drawn[:3].mean(), drawn[3:].mean()], rtol=1e-6)


def _conv_sam_model(optimizer):
    keras.utils.set_random_seed(5)
    inner = keras.Sequential([
        keras.Input((8, 8, 2)),
        keras.layers.Conv2D(4, 3, padding="same", activation="tanh"),
        keras.layers.Conv2D(3, 3, strides=2, activation="tanh"),
        keras.layers.Flatten(),
        keras.layers.Dense(2),
    ])
    model = keras_ssam.SAMModel(inner)
    model.compile(optimizer=optimizer, loss="mse")
    return model, inner


def test_conditional_perturbed_pass_on_a_conv_net_equals_sam():
    """A convolutional network whose perturbed pass runs inside the compiled
    conditional (`sam_probability` a callable that is always 1: the choice is
    a tensor) trains exactly as SAM without one. On JAX the conditional's
    branches are rewritten so XLA:CPU runs their convolutions fast
    (`backend/jax_conv_layout.py`): the rewrite must not change a number."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 8, 8, 2)).astype("float32")
    y = rng.standard_normal((16, 2)).astype("float32")
    results = []
    for probability in (1.0, keras.ops.ones_like):
        model, inner = _conv_sam_model(
            keras_ssam.SAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.1,
                           sam_probability=probability, seed=0))
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
        results.append([keras.ops.convert_to_numpy(v) for v in inner.weights])
    _assert_params_close(results[1], results[0])
    # Not vacuous: plain SGD (sam_probability 0) ends elsewhere.
    model, inner = _conv_sam_model(
        keras_ssam.SAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.1, sam_probability=0.0))
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    _assert_differs([keras.ops.convert_to_numpy(v) for v in inner.weights], results[0], 1e-5, "plain SGD")


@pytest.mark.skipif(BACKEND != "jax", reason="XLA:CPU's convolution layouts inside lax.cond are a JAX matter")
def test_jax_conditional_branches_hold_only_canonical_convolutions():
    """The rewrite's contract: the branch's gradient convolutions all read
    NHWC inputs and HWIO kernels (the layout XLA:CPU calls Eigen for), and
    the values equal the unrewritten function's."""
    import jax

    from keras_ssam.backend.jax_conv_layout import canonical_convolutions

    rng = np.random.default_rng(1)
    x = jax.numpy.asarray(rng.standard_normal((4, 8, 8, 3)), "float32")
    k = jax.numpy.asarray(rng.standard_normal((3, 3, 3, 5)), "float32")

    def loss(kernel):
        out = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.numpy.sum(jax.numpy.tanh(out) ** 2)

    def branch():
        return jax.grad(loss)(k)

    def conv_specs(fn):
        jaxpr = jax.make_jaxpr(fn)()
        found = []

        def walk(j):
            for e in j.eqns:
                if e.primitive is jax.lax.conv_general_dilated_p:
                    dn = e.params["dimension_numbers"]
                    found.append((tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)))
                for p in e.params.values():
                    inner = getattr(p, "jaxpr", p)
                    if hasattr(inner, "eqns"):
                        walk(inner)

        walk(jaxpr.jaxpr)
        return found

    canonical = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    assert any(spec != canonical for spec in conv_specs(branch))  # the weight gradient is not
    assert conv_specs(canonical_convolutions(branch)) and all(
        spec == canonical for spec in conv_specs(canonical_convolutions(branch)))
    np.testing.assert_allclose(np.asarray(canonical_convolutions(branch)()), np.asarray(branch()),
                               rtol=1e-5, atol=1e-5)

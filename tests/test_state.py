"""State handling of `SAMModel`'s two-pass train step, on every backend.

What is checked (each against an independent NumPy computation or a plain
Keras model trained the same way):

1. BatchNormalization moving statistics move once per step, from the clean
   pass at `w` (not from the perturbed pass at `w + e`, not twice).
2. Dropout: the perturbed pass sees the clean pass's mask and leaves no trace
   in the seed / RNG state (seeded Dropout, unseeded Dropout, and torch's
   global-generator fast path).
3. The logged loss, compiled metrics and per-output losses come from the clean
   pass and are counted once.
4. Weights are never left at `w + e`: each step is the base optimizer's update
   from `w`; non-finite perturbed passes do not leave `w + e` behind; under
   `mixed_float16` an overflowing perturbed pass skips the step.
5. `jit_compile=True` gives the same result as `jit_compile=False`.
6. The default `compile`/`fit` (no `jit_compile` argument) trains correctly.

All models are tiny and run a handful of steps.
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_ssam

BACKEND = keras.backend.backend()

EPS = 1e-12  # keras_ssam's default epsilon


# ---------------------------------------------------------------------------
# NumPy reference helpers (float64).
# ---------------------------------------------------------------------------


def _np(v):
    return np.asarray(ops.convert_to_numpy(v), dtype=np.float64)


def _global_norm(arrays):
    return float(np.sqrt(sum(np.sum(np.square(a)) for a in arrays)))


def _sam_gradient(params, grad_fn, rho, *, normalize, stable):
    """Clean loss at `params`, the gradient handed to the base optimizer, and
    the perturbed point `w + e`.

    `grad_fn(params) -> (loss, grads)`.
    """
    loss, grads = grad_fn(params)
    norm = _global_norm(grads)
    if normalize:
        factor = rho / (norm + EPS) if norm > 0 else 0.0
    else:
        factor = rho
    perturbed = [p + factor * g for p, g in zip(params, grads)]
    _, perturbed_grads = grad_fn(perturbed)
    if stable:
        pnorm = _global_norm(perturbed_grads)
        gamma = norm / (pnorm + EPS) if pnorm + EPS > 0 else 1.0
        perturbed_grads = [gamma * g for g in perturbed_grads]
    return loss, perturbed_grads, perturbed


class _NumpySGD:
    """keras.optimizers.SGD's update rule (no nesterov)."""

    def __init__(self, lr, momentum=0.0):
        self.lr = lr
        self.momentum = momentum
        self.m = None

    def step(self, params, grads):
        if self.momentum == 0.0:
            return [p - self.lr * g for p, g in zip(params, grads)]
        if self.m is None:
            self.m = [np.zeros_like(p) for p in params]
        self.m = [m * self.momentum - self.lr * g for m, g in zip(self.m, grads)]
        return [p + m for p, m in zip(params, self.m)]


def _linear_mse_grad_fn(x, y):
    """Loss and gradients of `mean((x @ W + b - y)^2)` (keras "mse")."""

    def grad_fn(params):
        kernel, bias = params
        r = x @ kernel + bias - y
        n = r.size
        return float(np.mean(r**2)), [2.0 * x.T @ r / n, 2.0 * r.sum(0) / n]

    return grad_fn


def _batches(n, batch_size):
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _data(n, d_in, d_out=1, seed=0):
    rs = np.random.RandomState(seed)
    x = rs.normal(size=(n, d_in)).astype("float32")
    y = rs.normal(size=(n, d_out)).astype("float32")
    return x, y


def _linear_model(d_in=3, d_out=1, name="lin"):
    inp = keras.Input((d_in,))
    out = keras.layers.Dense(
        d_out, kernel_initializer="glorot_normal", bias_initializer="random_normal",
        name=name,
    )(inp)
    return keras.Model(inp, out)


def _assert_differs(a, b, atol, what):
    """Guard that an alternative (wrong) behaviour would be detected."""
    diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))
    assert diff > 20 * atol, (
        f"test cannot discriminate: {what} differs from the expectation by only {diff}"
    )


# ---------------------------------------------------------------------------
# 1. BatchNormalization statistics.
# ---------------------------------------------------------------------------


def _bn_forward_backward(params, x, y, bn_eps):
    """Dense -> BatchNormalization (training) -> Dense, mse loss.

    Returns loss, grads, and the batch mean/variance of the BN input.
    """
    w1, b1, gamma, beta, w2, b2 = params
    n = x.shape[0]
    h = x @ w1 + b1
    mu = h.mean(0)
    var = h.var(0)  # population variance, as ops.moments
    inv = 1.0 / np.sqrt(var + bn_eps)
    xhat = (h - mu) * inv
    z = gamma * xhat + beta
    yp = z @ w2 + b2
    r = yp - y
    loss = float(np.mean(r**2))
    dyp = 2.0 * r / r.size
    dw2 = z.T @ dyp
    db2 = dyp.sum(0)
    dz = dyp @ w2.T
    dgamma = (dz * xhat).sum(0)
    dbeta = dz.sum(0)
    dxhat = dz * gamma
    dh = inv / n * (n * dxhat - dxhat.sum(0) - xhat * (dxhat * xhat).sum(0))
    dw1 = x.T @ dh
    db1 = dh.sum(0)
    return loss, [dw1, db1, dgamma, dbeta, dw2, db2], (mu, var)


def test_batchnorm_statistics_from_clean_pass_once_per_step():
    """Two SAM steps (fit, 2 batches) on Dense -> BN -> Dense.

    The moving mean/variance must be the momentum average of the clean-pass
    batch statistics at the weights each step started from; the perturbed
    pass (at w + e, with a large rho so its statistics clearly differ) must
    not contribute, and the statistics must move once per step.
    """
    momentum, rho, lr = 0.5, 1.0, 0.1
    inp = keras.Input((3,))
    h = keras.layers.Dense(4, bias_initializer="random_normal", name="d1")(inp)
    h = keras.layers.BatchNormalization(momentum=momentum, name="bn")(h)
    out = keras.layers.Dense(1, bias_initializer="random_normal", name="d2")(h)
    inner = keras.Model(inp, out)
    bn = inner.get_layer("bn")
    bn_eps = bn.epsilon

    rs = np.random.RandomState(1)
    x = rs.normal(size=(16, 3)).astype("float32")
    y = rs.normal(size=(16, 1)).astype("float32")
    d1, d2 = inner.get_layer("d1"), inner.get_layer("d2")
    params = [_np(v) for v in (d1.kernel, d1.bias, bn.gamma, bn.beta, d2.kernel, d2.bias)]
    mm0, mv0 = _np(bn.moving_mean), _np(bn.moving_variance)

    model = keras_ssam.SAMModel(inner)
    model.compile(optimizer=keras_ssam.SAM(keras.optimizers.SGD(lr), rho=rho), loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)

    # NumPy replay of the two steps.
    opt = _NumpySGD(lr)
    mm, mv = mm0, mv0
    alt = {"perturbed": (mm0, mv0), "clean_then_perturbed": (mm0, mv0), "clean_twice": (mm0, mv0)}
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    for sl in _batches(16, 8):
        xb, yb = xd[sl], yd[sl]

        def grad_fn(p):
            loss, g, _ = _bn_forward_backward(p, xb, yb, bn_eps)
            return loss, g

        _, update, perturbed = _sam_gradient(params, grad_fn, rho, normalize=True, stable=False)
        _, _, (mu_c, var_c) = _bn_forward_backward(params, xb, yb, bn_eps)
        _, _, (mu_p, var_p) = _bn_forward_backward(perturbed, xb, yb, bn_eps)

        def ema(m, v, mu, var):
            return m * momentum + mu * (1 - momentum), v * momentum + var * (1 - momentum)

        mm, mv = ema(mm, mv, mu_c, var_c)
        alt["perturbed"] = ema(*alt["perturbed"], mu_p, var_p)
        alt["clean_then_perturbed"] = ema(*ema(*alt["clean_then_perturbed"], mu_c, var_c), mu_p, var_p)
        alt["clean_twice"] = ema(*ema(*alt["clean_twice"], mu_c, var_c), mu_c, var_c)
        params = opt.step(params, update)

    atol = 1e-5
    got = [_np(bn.moving_mean), _np(bn.moving_variance)]
    np.testing.assert_allclose(got[0], mm, rtol=1e-4, atol=atol)
    np.testing.assert_allclose(got[1], mv, rtol=1e-4, atol=atol)
    for what, (amm, amv) in alt.items():
        _assert_differs([mm, mv], [amm, amv], atol, what)
    # The trainable weights followed SAM from the clean weights too.
    got_params = [_np(v) for v in (d1.kernel, d1.bias, bn.gamma, bn.beta, d2.kernel, d2.bias)]
    for g, e in zip(got_params, params):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# 2. Dropout masks and RNG state.
# ---------------------------------------------------------------------------


def _dropout_model(seed):
    keras.utils.set_random_seed(42)  # same weights and seed-generator state
    inp = keras.Input((5,))
    h = keras.layers.Dense(8, activation="relu", name="d1")(inp)
    h = keras.layers.Dropout(0.5, seed=seed, name="drop")(h)
    out = keras.layers.Dense(1, name="d2")(h)
    return keras.Model(inp, out)


@pytest.mark.parametrize("seed", [17, None], ids=["seeded", "unseeded"])
def test_dropout_rho0_matches_plain_keras(seed):
    """With rho=0, w + e = w, so the SAM gradient is the clean gradient only if
    the perturbed pass used the clean pass's dropout mask; and batches after
    the first match a plain Keras model only if the seed state (or, on torch
    without a seed, the global generator) advanced exactly once per step.
    """
    x, y = _data(12, 5, seed=3)
    results = []
    for sam in (False, True):
        inner = _dropout_model(seed)
        if sam:
            model = keras_ssam.SAMModel(inner)
            opt = keras_ssam.SAM(keras.optimizers.SGD(0.1), rho=0.0)
        else:
            model = inner
            opt = keras.optimizers.SGD(0.1)
        model.compile(optimizer=opt, loss="mse", metrics=["mae"])
        keras.utils.set_random_seed(7)  # torch's global generator for unseeded dropout
        hist = model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        results.append((hist.history, [np.asarray(w) for w in inner.get_weights()]))
    (h_ref, w_ref), (h_sam, w_sam) = results
    for key in ("loss", "mae"):
        np.testing.assert_allclose(h_sam[key], h_ref[key], rtol=1e-6, atol=1e-7, err_msg=key)
    assert len(w_ref) == len(w_sam)
    for a, b in zip(w_sam, w_ref):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


class _TorchRngCapture(keras.callbacks.Callback):
    """Records torch's global generator state right before each train step
    (the batch has already been fetched when on_train_batch_begin runs)."""

    def __init__(self):
        super().__init__()
        self.states = []

    def on_train_batch_begin(self, batch, logs=None):
        import torch

        self.states.append(torch.get_rng_state())


def _replay_masks(layer, n_steps, shape, jit_compile, torch_states=None):
    """The 0/1 masks `layer` draws in its next `n_steps` training calls,
    computed on a fresh Dropout whose seed state is a copy of `layer`'s (or,
    for torch's unseeded fast path, replaying the captured global generator
    states)."""
    probe = keras.layers.Dropout(layer.rate, seed=layer.seed)
    ones = ops.ones(shape)
    keep = 1.0 - layer.rate
    if torch_states is not None:
        import torch

        saved = torch.get_rng_state()
        masks = []
        for state in torch_states[:n_steps]:
            torch.set_rng_state(state)
            masks.append(_np(probe(ones, training=True)) * keep)
        torch.set_rng_state(saved)
        return masks
    probe.seed_generator.state.assign(layer.seed_generator.state.value)
    call = lambda: probe(ones, training=True)  # noqa: E731
    if BACKEND == "tensorflow":
        import tensorflow as tf

        # XLA's stateless RNG differs from the CPU kernels: draw as fit does.
        call = tf.function(call, jit_compile=bool(jit_compile))
    return [_np(call()) * keep for _ in range(n_steps)]


@pytest.mark.parametrize("seed", [23, None], ids=["seeded", "unseeded"])
def test_dropout_mask_shared_by_perturbed_pass_ssam(seed):
    """SSAM (rho > 0) on Input -> Dropout -> Dense, 3 steps with fit.

    The masks of the 3 steps are replayed on a probe Dropout with a copy of
    the layer's seed state (torch unseeded: the global generator state
    captured before each step). A NumPy SSAM using the mask for both passes
    must reproduce the logged loss (which validates the replayed clean-pass
    masks) and the final weights. The final weights depend on the mask of the
    perturbed pass (SSAM's gradient at w + e and its norm), and steps 2 and 3
    depend on the RNG advancing once per step: the test asserts that a
    perturbed pass with the next mask (RNG advanced twice per step) would
    give visibly different weights.
    """
    rate, rho, lr = 0.5, 0.5, 0.2
    n, bs, d = 12, 4, 6
    keras.utils.set_random_seed(5)
    inp = keras.Input((d,))
    h = keras.layers.Dropout(rate, seed=seed, name="drop")(inp)
    out = keras.layers.Dense(1, bias_initializer="random_normal", name="dense")(h)
    inner = keras.Model(inp, out)
    drop, dense = inner.get_layer("drop"), inner.get_layer("dense")
    params0 = [_np(dense.kernel), _np(dense.bias)]
    x, y = _data(n, d, seed=11)

    model = keras_ssam.SAMModel(inner)
    model.compile(optimizer=keras_ssam.SSAM(keras.optimizers.SGD(lr), rho=rho), loss="mse")
    torch_unseeded = BACKEND == "torch" and seed is None
    capture = _TorchRngCapture() if torch_unseeded else None
    if not torch_unseeded:
        masks = _replay_masks(drop, 2 * n // bs, (bs, d), model.jit_compile)
    hist = model.fit(
        x, y, batch_size=bs, epochs=1, shuffle=False, verbose=0,
        callbacks=[capture] if capture else None,
    )
    if torch_unseeded:
        # Twice the steps: the "advanced twice" alternative needs the draws
        # after each captured state, replayed from the same start.
        masks = _replay_masks(drop, n // bs, (bs, d), None, capture.states)
        import torch

        saved = torch.get_rng_state()
        torch.set_rng_state(capture.states[0])
        probe = keras.layers.Dropout(rate)
        extra = [_np(probe(ops.ones((bs, d)), training=True)) * (1 - rate) for _ in range(2 * n // bs)]
        torch.set_rng_state(saved)
    else:
        extra = masks

    def simulate(clean_masks, perturbed_masks):
        params = [p.copy() for p in params0]
        sgd = _NumpySGD(lr)
        losses = []
        for k, sl in enumerate(_batches(n, bs)):
            xb, yb = x[sl].astype(np.float64), y[sl].astype(np.float64)
            xc = xb * clean_masks[k] / (1 - rate)
            xp = xb * perturbed_masks[k] / (1 - rate)
            gc = _linear_mse_grad_fn(xc, yb)
            gp = _linear_mse_grad_fn(xp, yb)
            loss, g = gc(params)
            norm = _global_norm(g)
            pert = [p + rho * gi for p, gi in zip(params, g)]
            _, ga = gp(pert)
            gamma = norm / (_global_norm(ga) + EPS)
            params = sgd.step(params, [gamma * gi for gi in ga])
            losses.append(loss)
        return float(np.mean(losses)), params

    exp_loss, exp_params = simulate(masks, masks)
    np.testing.assert_allclose(hist.history["loss"][0], exp_loss, rtol=1e-5)
    got = [_np(dense.kernel), _np(dense.bias)]
    for g, e in zip(got, exp_params):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)

    # Discrimination: the RNG advancing in the perturbed pass too would make
    # the perturbed pass of step k use draw 2k+1 and the clean pass draw 2k.
    _, twice_params = simulate(extra[0::2], extra[1::2])
    _assert_differs(exp_params, twice_params, 1e-6, "advance-twice alternative")
    # And a perturbed pass with another mask (same clean masks).
    _, other_params = simulate(masks, masks[1:] + masks[:1])
    _assert_differs(exp_params, other_params, 1e-6, "other-mask alternative")


# ---------------------------------------------------------------------------
# 3. Logged loss and metrics: from the clean pass, counted once.
# ---------------------------------------------------------------------------


def test_logged_loss_and_metric_from_clean_pass_once():
    """fit over 3 uneven batches (4, 4, 2), 2 epochs: the epoch's loss and
    "mae" are the sample-weighted means of the clean-pass values at the
    weights each batch saw (NumPy replay of SAM), not the perturbed ones and
    not an average of both passes."""
    rho, lr = 0.5, 0.1
    n, bs = 10, 4
    x, y = _data(n, 3, d_out=2, seed=4)
    inner = _linear_model(3, 2)
    layer = inner.get_layer("lin")
    params = [_np(layer.kernel), _np(layer.bias)]
    model = keras_ssam.SAMModel(inner)
    model.compile(
        optimizer=keras_ssam.SAM(keras.optimizers.SGD(lr), rho=rho),
        loss="mse",
        metrics=["mae"],
    )
    hist = model.fit(x, y, batch_size=bs, epochs=2, shuffle=False, verbose=0)

    sgd = _NumpySGD(lr)
    for epoch in range(2):
        tot = {"clean": [0.0, 0.0], "perturbed": [0.0, 0.0]}
        for sl in _batches(n, bs):
            xb, yb = x[sl].astype(np.float64), y[sl].astype(np.float64)
            m = xb.shape[0]
            loss, update, pert = _sam_gradient(
                params, _linear_mse_grad_fn(xb, yb), rho, normalize=True, stable=False
            )
            for key, p in (("clean", params), ("perturbed", pert)):
                r = xb @ p[0] + p[1] - yb
                tot[key][0] += m * np.mean(r**2)
                tot[key][1] += np.sum(np.mean(np.abs(r), axis=-1))
            params = sgd.step(params, update)
        exp = {k: (v[0] / n, v[1] / n) for k, v in tot.items()}
        got = (hist.history["loss"][epoch], hist.history["mae"][epoch])
        np.testing.assert_allclose(got, exp["clean"], rtol=1e-5, err_msg=f"epoch {epoch}")
        both = tuple((a + b) / 2 for a, b in zip(exp["clean"], exp["perturbed"]))
        _assert_differs([exp["clean"]], [exp["perturbed"]], 1e-5 * max(exp["clean"]), "perturbed logs")
        _assert_differs([exp["clean"]], [both], 1e-5 * max(exp["clean"]), "both-passes logs")
    for g, e in zip([_np(layer.kernel), _np(layer.bias)], params):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_multi_output_per_output_losses_from_clean_pass_once():
    """Functional model with outputs out_a (mse, weight 1) and out_b (mae,
    weight 0.5): "loss", "out_a_loss" and "out_b_loss" equal the clean-pass
    values (NumPy replay), counted once, over 3 batches.

    The batches are of equal size: on TensorFlow, Keras's own per-output loss
    trackers weight each batch by the static batch size, which is None inside
    `tf.function`, so plain Keras averages per-output losses over batches
    unweighted while "loss" is weighted by batch size."""
    rho, lr, wa, wb = 0.3, 0.1, 1.0, 0.5
    n, bs = 12, 4
    x, _ = _data(n, 3, seed=8)
    rs = np.random.RandomState(9)
    ya = rs.normal(size=(n, 1)).astype("float32")
    yb = rs.normal(size=(n, 1)).astype("float32")
    inp = keras.Input((3,))
    a = keras.layers.Dense(1, bias_initializer="random_normal", name="out_a")(inp)
    b = keras.layers.Dense(1, bias_initializer="random_normal", name="out_b")(inp)
    inner = keras.Model(inp, [a, b])
    la, lb = inner.get_layer("out_a"), inner.get_layer("out_b")
    params = [_np(la.kernel), _np(la.bias), _np(lb.kernel), _np(lb.bias)]
    model = keras_ssam.SAMModel(inner)
    model.compile(
        optimizer=keras_ssam.SAM(keras.optimizers.SGD(lr), rho=rho),
        loss={"out_a": "mse", "out_b": "mae"},
        loss_weights={"out_a": wa, "out_b": wb},
    )
    hist = model.fit(
        x, {"out_a": ya, "out_b": yb}, batch_size=bs, epochs=1, shuffle=False, verbose=0
    )

    def parts(p, xb, ya_b, yb_b):
        ra = xb @ p[0] + p[1] - ya_b
        rb = xb @ p[2] + p[3] - yb_b
        return ra, rb

    sgd = _NumpySGD(lr)
    sums = {"clean": np.zeros(3), "perturbed": np.zeros(3)}
    for sl in _batches(n, bs):
        xb = x[sl].astype(np.float64)
        ya_b, yb_b = ya[sl].astype(np.float64), yb[sl].astype(np.float64)
        m = xb.shape[0]

        def grad_fn(p):
            ra, rb = parts(p, xb, ya_b, yb_b)
            loss = wa * np.mean(ra**2) + wb * np.mean(np.abs(rb))
            da = wa * 2.0 * ra / m
            db = wb * np.sign(rb) / m
            return float(loss), [xb.T @ da, da.sum(0), xb.T @ db, db.sum(0)]

        _, update, pert = _sam_gradient(params, grad_fn, rho, normalize=True, stable=False)
        for key, p in (("clean", params), ("perturbed", pert)):
            ra, rb = parts(p, xb, ya_b, yb_b)
            la_v, lb_v = np.mean(ra**2), np.mean(np.abs(rb))
            sums[key] += m * np.array([wa * la_v + wb * lb_v, la_v, lb_v])
        params = sgd.step(params, update)
    exp = sums["clean"] / n
    got = [hist.history[k][0] for k in ("loss", "out_a_loss", "out_b_loss")]
    np.testing.assert_allclose(got, exp, rtol=1e-5)
    both = (sums["clean"] + sums["perturbed"]) / (2 * n)
    _assert_differs([exp], [sums["perturbed"] / n], 1e-5, "perturbed per-output losses")
    _assert_differs([exp], [both], 1e-5, "both-passes per-output losses")
    got_params = [_np(la.kernel), _np(la.bias), _np(lb.kernel), _np(lb.bias)]
    for g, e in zip(got_params, params):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# 4. Weights never left perturbed.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant,normalize,stable",
    [("SAM", True, False), ("USAM", False, False), ("SSAM", False, True)],
)
def test_each_step_is_base_update_from_w(variant, normalize, stable):
    """train_on_batch three times with SGD(momentum=0.9): after each step the
    weights equal NumPy's SGD-with-momentum update from the pre-step weights
    with the (S)SAM gradient, and are not w + e."""
    rho, lr = 0.2, 0.05
    x, y = _data(12, 3, d_out=2, seed=6)
    inner = _linear_model(3, 2)
    layer = inner.get_layer("lin")
    params = [_np(layer.kernel), _np(layer.bias)]
    model = keras_ssam.SAMModel(inner)
    opt = getattr(keras_ssam, variant)(keras.optimizers.SGD(lr, momentum=0.9), rho=rho)
    model.compile(optimizer=opt, loss="mse")
    sgd = _NumpySGD(lr, momentum=0.9)
    for sl in _batches(12, 4):
        xb, yb = x[sl].astype(np.float64), y[sl].astype(np.float64)
        loss, update, pert = _sam_gradient(
            params, _linear_mse_grad_fn(xb, yb), rho, normalize=normalize, stable=stable
        )
        model.reset_metrics()  # train_on_batch does it itself since Keras 3.15 only
        logs = model.train_on_batch(x[sl], y[sl], return_dict=True)
        params = sgd.step(params, update)
        got = [_np(layer.kernel), _np(layer.bias)]
        for g, e in zip(got, params):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
        _assert_differs(got, pert, 1e-6, "w + e")
        np.testing.assert_allclose(logs["loss"], loss, rtol=1e-5)


def test_nonfinite_perturbed_pass_does_not_leave_w_plus_e():
    """USAM with a huge rho on a two-head model: head "ex" has an exponential
    activation that overflows at w + e (float32), head "lin" is linear.

    The loss at w + e is inf, but the linear head's gradient there is finite
    (d total / d mse_lin = 1), so its weights must be exactly SGD's update
    from w with the gradient at w + e (NumPy); the exp head's weights become
    non-finite and in any case are not w + e. The logged loss is the finite
    clean loss.
    """
    rho, lr = 1e4, 0.01
    n = 8
    rs = np.random.RandomState(12)
    x = rs.uniform(0.5, 1.5, size=(n, 2)).astype("float32")
    y_lin = rs.normal(size=(n, 1)).astype("float32")
    y_ex = np.full((n, 1), 0.5, "float32")
    inp = keras.Input((2,))
    lin = keras.layers.Dense(1, name="lin")(inp)
    ex = keras.layers.Dense(1, activation="exponential", name="ex")(inp)
    inner = keras.Model(inp, [lin, ex])
    inner.get_layer("lin").set_weights([np.array([[0.3], [-0.2]], "float32"), np.array([0.1], "float32")])
    inner.get_layer("ex").set_weights([np.array([[0.1], [0.1]], "float32"), np.array([0.0], "float32")])
    model = keras_ssam.SAMModel(inner)
    model.compile(
        optimizer=keras_ssam.USAM(keras.optimizers.SGD(lr), rho=rho),
        loss={"lin": "mse", "ex": "mse"},
    )
    p = [_np(w) for w in inner.get_weights()]  # lin k, lin b, ex k, ex b
    xd = x.astype(np.float64)

    def grads(q):
        r_lin = xd @ q[0] + q[1] - y_lin
        z = xd @ q[2] + q[3]
        with np.errstate(over="ignore", invalid="ignore"):
            pred = np.exp(z)
            r_ex = pred - y_ex
            d_ex = 2.0 * r_ex * pred / n
            g = [2.0 * xd.T @ r_lin / n, 2.0 * r_lin.sum(0) / n, xd.T @ d_ex, d_ex.sum(0)]
            loss = np.mean(r_lin**2) + np.mean(r_ex**2)
        return loss, g, z

    loss, g, _ = grads(p)
    pert = [w + rho * gi for w, gi in zip(p, g)]
    _, g_pert, z_pert = grads(pert)
    assert all(np.all(np.isfinite(gi)) for gi in g) and np.isfinite(loss)
    assert np.max(z_pert) > 89, "setup: exp must overflow float32 at w + e"

    logs = model.train_on_batch(x, {"lin": y_lin, "ex": y_ex}, return_dict=True)
    got = [_np(w) for w in inner.get_weights()]
    np.testing.assert_allclose(logs["loss"], loss, rtol=1e-5)
    for k in (0, 1):
        np.testing.assert_allclose(got[k], p[k] - lr * g_pert[k], rtol=1e-5)
        _assert_differs([got[k]], [pert[k]], 1e-6, "w + e (lin head)")
    for k in (2, 3):
        assert not np.allclose(got[k], pert[k]), "exp head left at w + e"


def _mixed_exp_model():
    inp = keras.Input((2,))
    out = keras.layers.Dense(1, activation="exponential", name="ex")(inp)
    inner = keras.Model(inp, out)
    inner.get_layer("ex").set_weights([np.array([[0.1], [0.1]], "float32"), np.array([0.0], "float32")])
    return inner


@pytest.mark.parametrize("rho,overflows", [(100.0, True), (0.01, False)], ids=["overflow", "control"])
def test_mixed_precision_overflowing_perturbed_pass_skips_step(rho, overflows):
    """Under mixed_float16, compile wraps USAM in a LossScaleOptimizer. With
    rho=100 the perturbed pass's float16 exp overflows (the clean pass is
    finite): the step must be skipped, weights exactly the pre-step weights
    (finite) and the dynamic loss scale halved. The control (rho=0.01, no
    overflow) must update the weights by NumPy's USAM step (float16 tolerance)
    and keep the scale."""
    keras.config.set_dtype_policy("mixed_float16")
    try:
        lr, n = 0.1, 8
        rs = np.random.RandomState(13)
        x = rs.uniform(0.5, 1.5, size=(n, 2)).astype("float32")
        y = np.ones((n, 1), "float32")
        inner = _mixed_exp_model()
        model = keras_ssam.SAMModel(inner)
        model.compile(optimizer=keras_ssam.USAM(keras.optimizers.SGD(lr), rho=rho), loss="mse")
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        initial_scale = float(model.optimizer.initial_scale)
        before = [np.asarray(w) for w in inner.get_weights()]

        xd = x.astype(np.float64)

        def grad_fn(q):
            z = xd @ q[0] + q[1]
            pred = np.exp(z)
            r = pred - y
            d = 2.0 * r * pred / n
            return float(np.mean(r**2)), [xd.T @ d, d.sum(0)], z

        loss, g, _ = grad_fn([b.astype(np.float64) for b in before])
        pert = [b + rho * gi for b, gi in zip(before, g)]
        _, g_pert, z_pert = grad_fn(pert)
        # float16 overflows above ~11.09 = log(65504).
        assert (np.max(z_pert) > 12) == overflows, "setup"

        logs = model.train_on_batch(x, y, return_dict=True)
        after = [np.asarray(w) for w in inner.get_weights()]
        scale = float(_np(model.optimizer.dynamic_scale))
        np.testing.assert_allclose(logs["loss"], loss, rtol=1e-2)
        for a in after:
            assert a.dtype == np.float32 and np.all(np.isfinite(a))
        if overflows:
            for a, b in zip(after, before):
                np.testing.assert_array_equal(a, b)
            assert scale == initial_scale / 2
        else:
            for a, b, gp in zip(after, before, g_pert):
                np.testing.assert_allclose(a, b - lr * gp, rtol=1e-2, atol=1e-3)
                assert np.max(np.abs(a - b)) > 1e-3
            assert scale == initial_scale
    finally:
        keras.config.set_dtype_policy("float32")


# ---------------------------------------------------------------------------
# 5. jit_compile, 6. default fit.
# ---------------------------------------------------------------------------


def _bn_sam_run(jit_compile):
    keras.utils.set_random_seed(21)
    inp = keras.Input((3,))
    h = keras.layers.Dense(4, name="d1")(inp)
    h = keras.layers.BatchNormalization(momentum=0.8)(h)
    out = keras.layers.Dense(1, name="d2")(h)
    inner = keras.Model(inp, out)
    model = keras_ssam.SAMModel(inner)
    model.compile(
        optimizer=keras_ssam.SSAM(keras.optimizers.SGD(0.05, momentum=0.9), rho=0.1),
        loss="mse",
        metrics=["mae"],
        jit_compile=jit_compile,
    )
    initial = [np.asarray(w) for w in inner.get_weights()]
    x, y = _data(12, 3, seed=14)
    hist = model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    return hist.history, initial, [np.asarray(w) for w in inner.get_weights()], model


def test_jit_compile_matches_eager():
    """jit_compile=True and False give the same weights, BN statistics and
    logs after 3 SSAM steps (Dense -> BN -> Dense). Dropout is left out: on
    TensorFlow, plain Keras itself draws different dropout masks under XLA
    (XLA's stateless RNG differs from the CPU kernels)."""
    if BACKEND == "torch":
        pytest.skip("torch: jit_compile=True means torch.compile, too slow for this suite")
    h_jit, w0_jit, w_jit, m_jit = _bn_sam_run(True)
    h_eag, w0_eag, w_eag, m_eag = _bn_sam_run(False)
    for a, b in zip(w0_jit, w0_eag):
        np.testing.assert_array_equal(a, b)
    assert m_jit.jit_compile is True and m_eag.jit_compile is False
    for key in ("loss", "mae"):
        np.testing.assert_allclose(h_jit[key], h_eag[key], rtol=1e-5, atol=1e-5)
    for a, b in zip(w_jit, w_eag):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # Training moved the weights (the comparison is not between two no-ops).
    assert max(np.max(np.abs(a - b)) for a, b in zip(w_jit, w0_jit)) > 1e-3


def test_default_fit_matches_numpy():
    """compile/fit with default arguments (jit_compile="auto"): 2 epochs of
    3 uneven batches of SSAM with SGD+momentum match a NumPy replay, and the
    history's loss is the clean loss. (SAM and USAM steps are checked step by
    step in test_each_step_is_base_update_from_w.)"""
    variant, normalize, stable = "SSAM", False, True
    rho, lr, n, bs = 0.3, 0.05, 10, 4
    x, y = _data(n, 3, d_out=2, seed=15)
    inner = _linear_model(3, 2)
    layer = inner.get_layer("lin")
    params = [_np(layer.kernel), _np(layer.bias)]
    model = keras_ssam.SAMModel(inner)
    model.compile(
        optimizer=getattr(keras_ssam, variant)(keras.optimizers.SGD(lr, momentum=0.9), rho=rho),
        loss="mse",
    )
    hist = model.fit(x, y, batch_size=bs, epochs=2, shuffle=False, verbose=0)
    sgd = _NumpySGD(lr, momentum=0.9)
    for epoch in range(2):
        total = 0.0
        for sl in _batches(n, bs):
            xb, yb = x[sl].astype(np.float64), y[sl].astype(np.float64)
            loss, update, _ = _sam_gradient(
                params, _linear_mse_grad_fn(xb, yb), rho, normalize=normalize, stable=stable
            )
            total += xb.shape[0] * loss
            params = sgd.step(params, update)
        np.testing.assert_allclose(hist.history["loss"][epoch], total / n, rtol=1e-5)
    for g, e in zip([_np(layer.kernel), _np(layer.bias)], params):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)

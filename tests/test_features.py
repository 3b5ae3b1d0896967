"""`SAMModel` with the Keras features around the optimizer, on every backend.

Every test compares numbers with an independent float64 NumPy reference
(linear `Dense` models without activation and Keras's "mse", so gradients are
written by hand; the base optimizers' update rules are spelled out below):

1. Mixed precision (`mixed_float16` with the LossScaleOptimizer that `compile`
   adds, and `mixed_bfloat16`): the step, the unscaled diagnostics, and the
   skipped step on overflow.
2. The base optimizer's machinery acting on the SAM gradient: gradient
   accumulation, clipnorm / clipvalue / global_clipnorm (after SSAM's
   renormalization), decoupled weight decay (applied at `w`, not perturbed),
   EMA, a learning-rate schedule, Adam / AdamW / Lion.
3. `rho` as a LearningRateSchedule and as a callable of the iteration count.
4. `steps_per_execution` and `jit_compile`.
5. The diagnostics logs.
6. `num_batch_splits` (m-sharpness).
"""


import keras
import numpy as np
import pytest
from keras import ops

import keras_ssam

BACKEND = keras.backend.backend()

EPS = 1e-12  # keras_ssam's default epsilon
DIAGNOSTICS = ("grad_norm", "perturbed_grad_norm", "renorm_factor", "sharpness", "clean_fallback")

VARIANTS = {
    # name: (class, normalize, stable)
    "SAM": (keras_ssam.SAM, True, False),
    "USAM": (keras_ssam.USAM, False, False),
    "SSAM": (keras_ssam.SSAM, False, True),
}


# ---------------------------------------------------------------------------
# NumPy reference (float64), written out by hand.
# ---------------------------------------------------------------------------


def _np(v):
    return np.asarray(ops.convert_to_numpy(v), dtype=np.float64)


def _gnorm(arrays):
    return float(np.sqrt(sum(np.sum(np.square(a)) for a in arrays)))


def linear_mse(params, x, y):
    """Loss and gradients of Keras "mse" for `y_hat = x @ W + b`:
    `mean((x W + b - y)^2)` over all N * d_out elements."""
    kernel, bias = params
    r = x @ kernel + bias - y
    n = r.size
    return float(np.mean(r**2)), [2.0 * x.T @ r / n, 2.0 * r.sum(0) / n]


def sam_reference(
    params, x, y, rho, *, normalize, stable, adaptive=False, eta=0.0,
    max_scale=None, epsilon=EPS,
):
    """One SAM-family gradient computation, with everything it produces."""
    loss, g = linear_mse(params, x, y)
    t = [np.abs(p) + eta if adaptive else np.ones_like(p) for p in params]
    grad_norm = _gnorm([ti * gi for ti, gi in zip(t, g)])
    if normalize:
        factor = rho / (grad_norm + epsilon) if grad_norm > 0 else 0.0
    else:
        factor = rho
    e = [factor * ti * ti * gi for ti, gi in zip(t, g)]
    perturbed = [p + ei for p, ei in zip(params, e)]
    pert_loss, g_asc = linear_mse(perturbed, x, y)
    t_pert = [np.abs(p) + eta if adaptive else np.ones_like(p) for p in perturbed]
    pert_norm = _gnorm([ti * gi for ti, gi in zip(t_pert, g_asc)])
    if stable:
        gamma = grad_norm / (pert_norm + epsilon) if pert_norm + epsilon > 0 else 1.0
        if max_scale is not None:
            gamma = min(gamma, max_scale)
    else:
        gamma = 1.0
    update = [gamma * gi for gi in g_asc]
    # g_asc == 0 while g != 0: the step takes the clean gradient.
    fallback = pert_norm == 0.0 and grad_norm > 0.0
    if fallback:
        gamma, update = 1.0, g
    return {
        "loss": loss,
        "grads": g,
        "e": e,
        "perturbed": perturbed,
        "perturbed_loss": pert_loss,
        "perturbed_grads": g_asc,
        "grad_norm": grad_norm,
        "perturbed_grad_norm": pert_norm,
        "renorm_factor": gamma,
        "sharpness": pert_loss - loss,
        "clean_fallback": float(fallback),
        "update": update,
    }


def chunked_sam_reference(params, x, y, rho, splits, **kwargs):
    """m-sharpness: each of `splits` chunks (sizes differing by at most one,
    as `np.array_split`; empty ones dropped) its own SAM gradient from the
    same `params`; the update is the chunks' updates weighted by chunk size
    (their mean when the chunks are equal)."""
    pairs = [(cx, cy) for cx, cy in zip(np.array_split(x, splits), np.array_split(y, splits)) if len(cx)]
    chunks = [sam_reference(params, cx, cy, rho, **kwargs) for cx, cy in pairs]
    weights = np.array([len(cx) for cx, _ in pairs], np.float64) / len(x)
    out = {
        "update": [
            sum(w * part for w, part in zip(weights, parts))
            for parts in zip(*[c["update"] for c in chunks])
        ],
        "loss": linear_mse(params, x, y)[0],
        "chunks": chunks,
    }
    for key in DIAGNOSTICS:
        out[key] = float(np.dot(weights, [c[key] for c in chunks]))
    return out


class NumpyOptimizer:
    """Keras's base-optimizer `apply`, line by line (base_optimizer.py):
    per call, with `t` the call count before the increment and `it` the
    public `iterations` (t // k with accumulation over k micro-steps, else t):

        accumulation (k): accumulate; every k-th call use (g + acc) / k
        clip (clipnorm per weight, global_clipnorm, or clipvalue)
        decoupled weight decay: w <- w - w * wd * lr(it)
        update_step (SGD / Adam / Lion) with lr(it); Adam's step is it + 1
        EMA: avg <- m avg + (1 - m) w, with m = 0 when it == 0
        t <- t + 1
    """

    def __init__(
        self, lr=0.1, *, kind="sgd", momentum=0.0, weight_decay=None,
        clipnorm=None, clipvalue=None, global_clipnorm=None,
        accumulation=None, ema_momentum=None, beta_1=0.9, beta_2=0.999,
        epsilon=1e-7,
    ):
        self.lr = lr if callable(lr) else (lambda t, lr=lr: lr)
        self.kind = kind
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.clipnorm = clipnorm
        self.clipvalue = clipvalue
        self.global_clipnorm = global_clipnorm
        self.accumulation = accumulation
        self.ema_momentum = ema_momentum
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon
        self.t = 0
        self.m = self.v = self.acc = self.ema = None

    @property
    def iterations(self):
        return self.t // self.accumulation if self.accumulation else self.t

    def _clip(self, grads):
        if self.clipnorm:
            return [g * self.clipnorm / max(np.sqrt(np.sum(g**2)), self.clipnorm) for g in grads]
        if self.global_clipnorm:
            n = _gnorm(grads)
            return [g * self.global_clipnorm / max(n, self.global_clipnorm) for g in grads]
        if self.clipvalue:
            return [np.clip(g, -self.clipvalue, self.clipvalue) for g in grads]
        return grads

    def _update_step(self, params, grads, lr):
        if self.m is None:
            self.m = [np.zeros_like(p) for p in params]
            self.v = [np.zeros_like(p) for p in params]
        if self.kind == "sgd":
            if self.momentum == 0.0:
                return [p - lr * g for p, g in zip(params, grads)]
            self.m = [self.momentum * m - lr * g for m, g in zip(self.m, grads)]
            return [p + m for p, m in zip(params, self.m)]
        if self.kind == "adam":
            step = np.float32(self.iterations + 1)
            # Keras raises the float32-cast betas to the step in float32;
            # 1 - beta_2^t cancels (0.999 is not a float32), so this matters
            # at the 1e-5 level. The moment updates use the Python floats.
            b1_power = float(np.float32(self.beta_1) ** step)
            b2_power = float(np.float32(self.beta_2) ** step)
            alpha = lr * np.sqrt(1 - b2_power) / (1 - b1_power)
            self.m = [m + (g - m) * (1 - self.beta_1) for m, g in zip(self.m, grads)]
            self.v = [v + (g * g - v) * (1 - self.beta_2) for v, g in zip(self.v, grads)]
            return [
                p - m * alpha / (np.sqrt(v) + self.epsilon)
                for p, m, v in zip(params, self.m, self.v)
            ]
        if self.kind == "lion":
            new = [
                p - lr * np.sign(m * self.beta_1 + g * (1 - self.beta_1))
                for p, m, g in zip(params, self.m, grads)
            ]
            self.m = [m * self.beta_2 + g * (1 - self.beta_2) for m, g in zip(self.m, grads)]
            return new
        raise ValueError(self.kind)

    def apply(self, params, grads):
        lr = self.lr(self.iterations)
        new = params
        do_update = True
        if self.accumulation:
            if self.acc is None:
                self.acc = [np.zeros_like(p) for p in params]
            if (self.t + 1) % self.accumulation == 0:
                grads = [(g + a) / self.accumulation for g, a in zip(grads, self.acc)]
                self.acc = [np.zeros_like(p) for p in params]
            else:
                self.acc = [a + g for a, g in zip(self.acc, grads)]
                do_update = False
        if do_update:
            grads = self._clip(grads)
            if self.weight_decay:
                new = [p - p * self.weight_decay * lr for p in new]
            new = self._update_step(new, grads, lr)
        if self.ema_momentum is not None:
            mom = 0.0 if self.iterations == 0 else self.ema_momentum
            if self.ema is None:
                self.ema = [np.zeros_like(p) for p in params]
            self.ema = [mom * a + (1 - mom) * p for a, p in zip(self.ema, new)]
        self.t += 1
        return new


def reference_run(params, x, y, batch_size, epochs, rho, opt, splits=1, **sam_kwargs):
    """Trains `params` like `fit(shuffle=False)`; `rho` a float or a function
    of the optimizer's iteration count. Returns final params and per-step
    reference records."""
    records = []
    n = len(x)
    for _ in range(epochs):
        for start in range(0, n, batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            r = rho(opt.iterations) if callable(rho) else rho
            if splits == 1:
                rec = sam_reference(params, xb, yb, r, **sam_kwargs)
            else:
                rec = chunked_sam_reference(params, xb, yb, r, splits, **sam_kwargs)
            rec["rho"] = r
            params = opt.apply(params, rec["update"])
            records.append(rec)
    return params, records


# ---------------------------------------------------------------------------
# Keras side.
# ---------------------------------------------------------------------------


def _problem(n=8, d_in=3, d_out=2, seed=0, x_scale=1.0, w_scale=0.5):
    """float32-representable data and initial parameters (held in float64)."""
    rs = np.random.RandomState(seed)
    x = (x_scale * rs.normal(size=(n, d_in))).astype("float32")
    y = rs.normal(size=(n, d_out)).astype("float32")
    params = [
        (w_scale * rs.normal(size=(d_in, d_out))).astype("float32").astype(np.float64),
        (w_scale * rs.normal(size=(d_out,))).astype("float32").astype(np.float64),
    ]
    return x, y, params


def _inner(params, float32_head=False):
    d_in, d_out = params[0].shape
    inp = keras.Input((d_in,))
    out = keras.layers.Dense(d_out, name="lin")(inp)
    if float32_head:
        # The final layer in float32 (mixed-precision practice); `linear`
        # keeps the model `x W + b`.
        out = keras.layers.Activation("linear", dtype="float32", name="head")(out)
    inner = keras.Model(inp, out)
    inner.get_layer("lin").set_weights([p.astype("float32") for p in params])
    return inner


def _weights(inner):
    return [np.asarray(w, np.float64) for w in inner.get_layer("lin").get_weights()]


def _sam_model(params, optimizer, *, diagnostics=False, num_batch_splits=1,
               float32_head=False, **compile_kwargs):
    inner = _inner(params, float32_head=float32_head)
    model = keras_ssam.SAMModel(inner, diagnostics=diagnostics, num_batch_splits=num_batch_splits)
    model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    return model, inner


def _fit(model, x, y, batch_size, epochs=1):
    return model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0).history


def _assert_differs(a, b, atol, what):
    """Guard that a wrong behaviour would be detected at the test's tolerance."""
    diff = max(float(np.max(np.abs(np.asarray(p) - np.asarray(q)))) for p, q in zip(a, b))
    assert diff > 10 * atol, (
        f"test cannot discriminate: {what} differs from the expectation by only {diff}"
    )


def _assert_params_close(got, want, rtol=1e-5, atol=1e-6):
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------
# 1. Mixed precision.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["SAM", "USAM", "SSAM"])
def test_mixed_float16_step_matches_reference_with_unscaled_diagnostics(variant):
    """One step under mixed_float16 (Dense computes in float16, float32 head):
    compile wraps the SAM optimizer in a LossScaleOptimizer (scale 2^15). The
    weight change matches NumPy's, and grad_norm / perturbed_grad_norm /
    sharpness are the unscaled values.

    Tolerance: float16 has a 10-bit mantissa (unit roundoff 4.9e-4); the
    inputs, weights and products are rounded to it and summed over 8 samples,
    so gradients carry ~1e-3 relative error: rtol 1e-2 on the weight change
    (plus 1e-2 of its largest entry as atol), rtol 1e-2 on norms. A loss
    scale left in the gradient would be off by 32768x; USAM's `e` from the
    scaled gradient would be 32768x too large (checked against below)."""
    cls, normalize, stable = VARIANTS[variant]
    rho, lr = 0.5, 0.1
    # Small data: the scaled float16 gradients (|g| * 2^15) stay below 65504.
    x, y, params = _problem(n=8, d_in=3, d_out=1, seed=1, x_scale=0.3, w_scale=0.5)
    y = (0.3 * y).astype("float32")
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model, inner = _sam_model(
            params, cls(keras.optimizers.SGD(lr), rho=rho), diagnostics=True, float32_head=True
        )
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert isinstance(model.optimizer.inner_optimizer, cls)
        assert inner.get_layer("lin").compute_dtype == "float16"
        assert inner.get_layer("lin").kernel.dtype == "float32"
        ref = sam_reference(params, xd, yd, rho, normalize=normalize, stable=stable)
        scale = float(model.optimizer.initial_scale)
        assert scale == 2.0**15
        assert max(np.max(np.abs(g)) for g in ref["grads"]) * scale < 65504, "setup"
        hist = _fit(model, x, y, batch_size=8)
        after = _weights(inner)
    finally:
        keras.config.set_dtype_policy("float32")

    delta = [a - p for a, p in zip(after, params)]
    want = [-lr * u for u in ref["update"]]
    top = max(np.max(np.abs(w)) for w in want)
    for d, w in zip(delta, want):
        np.testing.assert_allclose(d, w, rtol=1e-2, atol=1e-2 * top)
    assert float(_np(model.optimizer.dynamic_scale)) == scale  # no overflow
    np.testing.assert_allclose(hist["loss"][0], ref["loss"], rtol=1e-2)
    np.testing.assert_allclose(hist["grad_norm"][0], ref["grad_norm"], rtol=1e-2)
    np.testing.assert_allclose(
        hist["perturbed_grad_norm"][0], ref["perturbed_grad_norm"], rtol=1e-2
    )
    np.testing.assert_allclose(hist["renorm_factor"][0], ref["renorm_factor"], rtol=1e-2)
    # sharpness = loss(w+e) - loss(w) probes e directly.
    np.testing.assert_allclose(
        hist["sharpness"][0], ref["sharpness"], rtol=5e-2, atol=2e-3
    )
    assert ref["sharpness"] > 0.02, "setup: sharpness measurable in float16"
    if not normalize:
        # USAM/SSAM with e from the loss-scaled gradient would differ hugely.
        wrong = sam_reference(params, xd, yd, rho * scale, normalize=False, stable=stable)
        _assert_differs(
            [-lr * u for u in wrong["update"]], want, 1e-2 * top, "e from the scaled gradient"
        )


@pytest.mark.parametrize("variant", ["SAM", "SSAM"])
def test_mixed_float16_overflowing_step_is_skipped(variant):
    """Large inputs: the clean pass's loss-scaled float16 gradients overflow.
    The step is skipped: weights exactly the pre-step weights (finite), the
    base optimizer's iterations and momentum untouched, the scale halved.
    A second, finite batch then trains by NumPy's step at the pre-step w."""
    cls, normalize, stable = VARIANTS[variant]
    rho, lr = 0.05, 0.01
    x, y, params = _problem(n=8, d_in=3, d_out=1, seed=2, x_scale=30.0, w_scale=0.5)
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model, inner = _sam_model(
            params, cls(keras.optimizers.SGD(lr, momentum=0.9), rho=rho), float32_head=True
        )
        _, g = linear_mse(params, x.astype(np.float64), y.astype(np.float64))
        assert max(np.max(np.abs(gi)) for gi in g) * 2.0**15 > 4 * 65504, "setup: overflow"
        logs = model.train_on_batch(x, y, return_dict=True)
        after = [np.asarray(w) for w in inner.get_layer("lin").get_weights()]
        for a, p in zip(after, params):
            assert a.dtype == np.float32 and np.all(np.isfinite(a))
            np.testing.assert_array_equal(a, p.astype("float32"))
        assert np.isfinite(logs["loss"])
        assert float(_np(model.optimizer.dynamic_scale)) == 2.0**14
        sam = model.optimizer.inner_optimizer
        assert int(_np(sam.iterations)) == 0
        for v in sam.base_optimizer.momentums:
            np.testing.assert_array_equal(_np(v), 0.0)

        # A finite batch afterwards: the step is SAM's from the unchanged w.
        x2, y2, _ = _problem(n=8, d_in=3, d_out=1, seed=3, x_scale=0.3)
        y2 = (0.3 * y2).astype("float32")
        model.train_on_batch(x2, y2)
        after2 = _weights(inner)
    finally:
        keras.config.set_dtype_policy("float32")
    ref = sam_reference(
        params, x2.astype(np.float64), y2.astype(np.float64), rho,
        normalize=normalize, stable=stable,
    )
    want = [-lr * u for u in ref["update"]]  # first momentum step: v = -lr g
    top = max(np.max(np.abs(w)) for w in want)
    for a, p, w in zip(after2, params, want):
        np.testing.assert_allclose(a - p, w, rtol=1e-2, atol=1e-2 * top)
    assert int(_np(model.optimizer.inner_optimizer.iterations)) == 1


@pytest.mark.parametrize("variant", ["SAM", "SSAM"])
def test_mixed_bfloat16_matches_reference_loosely(variant):
    """mixed_bfloat16 (no loss scaling) trains two steps close to NumPy's
    SAM. bfloat16 has an 8-bit significand (unit roundoff 3.9e-3): rtol 5e-2
    on the weight change."""
    cls, normalize, stable = VARIANTS[variant]
    rho, lr = 0.2, 0.1
    x, y, params = _problem(n=8, d_in=3, d_out=2, seed=4)
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model, inner = _sam_model(
            params, cls(keras.optimizers.SGD(lr), rho=rho), diagnostics=True, float32_head=True
        )
        assert not isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert inner.get_layer("lin").compute_dtype == "bfloat16"
        hist = _fit(model, x, y, batch_size=4)
        after = _weights(inner)
    finally:
        keras.config.set_dtype_policy("float32")
    want, records = reference_run(
        params, xd, yd, 4, 1, rho, NumpyOptimizer(lr), normalize=normalize, stable=stable
    )
    delta_want = [w - p for w, p in zip(want, params)]
    top = max(np.max(np.abs(d)) for d in delta_want)
    for a, p, d in zip(after, params, delta_want):
        np.testing.assert_allclose(a - p, d, rtol=5e-2, atol=5e-2 * top)
    np.testing.assert_allclose(
        hist["grad_norm"][0], np.mean([r["grad_norm"] for r in records]), rtol=5e-2
    )


# ---------------------------------------------------------------------------
# 2. The base optimizer's machinery on the SAM gradient.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["SAM", "SSAM", "SAM-rho-callable"])
def test_gradient_accumulation_applies_mean_of_sam_gradients(variant):
    """gradient_accumulation_steps=2: each micro-batch's SAM gradient is taken
    at the same w (unchanged between micro-steps); every 2nd micro-step the
    mean of the two SAM gradients is applied (SGD with momentum). Keras's
    public `iterations` counts applied updates (micro-steps // 2), so a
    callable rho is rho(update count), constant within a window."""
    cls, normalize, stable = VARIANTS[variant.split("-")[0]]
    lr, k = 0.1, 2
    if variant.endswith("callable"):
        rho = lambda step: 0.2 * (step + 1)  # noqa: E731
    else:
        rho = 0.3
    x, y, params = _problem(n=16, d_in=3, d_out=2, seed=5)
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    base = keras.optimizers.SGD(lr, momentum=0.9, gradient_accumulation_steps=k)
    model, inner = _sam_model(params, cls(base, rho=rho))
    model.train_on_batch(x[:4], y[:4])
    # After one micro-step the weights have not moved.
    for a, p in zip(_weights(inner), params):
        np.testing.assert_array_equal(a, p.astype("float32"))
    model.train_on_batch(x[4:8], y[4:8])
    after_one_update = _weights(inner)
    rho0 = rho(0) if callable(rho) else rho
    r1 = sam_reference(params, xd[:4], yd[:4], rho0, normalize=normalize, stable=stable)
    r2 = sam_reference(params, xd[4:8], yd[4:8], rho0, normalize=normalize, stable=stable)
    want1 = [p - lr * (u1 + u2) / 2 for p, u1, u2 in zip(params, r1["update"], r2["update"])]
    _assert_params_close(after_one_update, want1)
    # Two more micro-steps: the second window, from the new w.
    model.train_on_batch(x[8:12], y[8:12])
    model.train_on_batch(x[12:16], y[12:16])
    want, _ = reference_run(
        params, xd, yd, 4, 1, rho,
        NumpyOptimizer(lr, momentum=0.9, accumulation=k), normalize=normalize, stable=stable,
    )
    _assert_params_close(_weights(inner), want)
    assert int(_np(model.optimizer.iterations)) == 2  # applied updates
    # Applying each micro-batch's gradient at once would differ.
    no_acc, _ = reference_run(
        params, xd, yd, 4, 1, rho, NumpyOptimizer(lr, momentum=0.9),
        normalize=normalize, stable=stable,
    )
    _assert_differs(no_acc, want, 1e-5, "no accumulation")


@pytest.mark.parametrize("clip", ["clipnorm", "clipvalue", "global_clipnorm"])
def test_clipping_acts_on_final_gradient(clip, variant="SSAM"):
    """Clipping is the base optimizer's, on the gradient it is handed: for
    SSAM the renormalized gamma * g_asc. Checked over 2 steps (SGD)."""
    cls, normalize, stable = VARIANTS[variant]
    rho, lr = 0.5, 0.1
    x, y, params = _problem(n=8, d_in=3, d_out=2, seed=6, x_scale=2.0)
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    ref0 = sam_reference(params, xd[:4], yd[:4], rho, normalize=normalize, stable=stable)
    u = ref0["update"]
    # Thresholds that bind on the first step's update gradient.
    value = {
        "clipnorm": 0.5 * min(np.sqrt(np.sum(ui**2)) for ui in u),
        "global_clipnorm": 0.5 * _gnorm(u),
        "clipvalue": 0.5 * max(np.max(np.abs(ui)) for ui in u),
    }[clip]
    model, inner = _sam_model(
        params, cls(keras.optimizers.SGD(lr, **{clip: value}), rho=rho)
    )
    _fit(model, x, y, batch_size=4)
    want, _ = reference_run(
        params, xd, yd, 4, 1, rho, NumpyOptimizer(lr, **{clip: value}),
        normalize=normalize, stable=stable,
    )
    _assert_params_close(_weights(inner), want)
    unclipped, _ = reference_run(
        params, xd, yd, 4, 1, rho, NumpyOptimizer(lr), normalize=normalize, stable=stable
    )
    _assert_differs(unclipped, want, 1e-5, "no clipping")
    if stable:
        assert abs(ref0["renorm_factor"] - 1.0) > 0.1, "setup: gamma far from 1"
        # Clipping g_asc before the renormalization would differ (step 1).
        clipper = NumpyOptimizer(lr, **{clip: value})
        right = [p - lr * g for p, g in zip(params, clipper._clip(ref0["update"]))]
        wrong = [
            p - lr * ref0["renorm_factor"] * g
            for p, g in zip(params, clipper._clip(ref0["perturbed_grads"]))
        ]
        _assert_differs(wrong, right, 1e-5, "clipping before renormalization")


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_decoupled_weight_decay_is_not_perturbed(base):
    """weight_decay is applied by the base optimizer at w only:
    w <- w (1 - lr wd) - lr * update, with e computed from the loss gradient
    alone. Decay in the ascent or applied at w + e would differ."""
    rho, lr, wd = 0.5, 0.1, 0.5
    x, y, params = _problem(n=8, d_in=3, d_out=2, seed=7)
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    if base == "sgd":
        lr = 0.1
        opt = keras.optimizers.SGD(lr, momentum=0.5, weight_decay=wd)
        ref_opt = lambda wd=wd: NumpyOptimizer(lr, momentum=0.5, weight_decay=wd)  # noqa: E731
    else:
        lr = 0.01
        opt = keras.optimizers.AdamW(lr, weight_decay=wd)
        ref_opt = lambda wd=wd: NumpyOptimizer(lr, kind="adam", weight_decay=wd)  # noqa: E731
    model, inner = _sam_model(params, keras_ssam.SAM(opt, rho=rho))
    _fit(model, x, y, batch_size=4)
    want, _ = reference_run(params, xd, yd, 4, 1, rho, ref_opt(), normalize=True, stable=False)
    _assert_params_close(_weights(inner), want)
    no_decay, _ = reference_run(params, xd, yd, 4, 1, rho, ref_opt(None), normalize=True, stable=False)
    _assert_differs(no_decay, want, 1e-5, "no weight decay")
    # Decay applied at w + e: w - lr wd (w + e) - ..., one step.
    ref = sam_reference(params, xd[:4], yd[:4], rho, normalize=True, stable=False)
    o1, o2 = ref_opt(), ref_opt(None)
    right = o1.apply(params, ref["update"])
    at_perturbed = o2.apply([p - p * wd * lr - ei * wd * lr for p, ei in zip(params, ref["e"])], ref["update"])
    _assert_differs(at_perturbed, right, 1e-5, "decay at w + e")


def test_ema_of_weights_matches_reference():
    """use_ema: the optimizer's moving average after 3 steps matches NumPy's
    (average of the weights after each step, momentum 0 on the first), and
    at the end of `fit` the weights are overwritten with it."""
    rho, lr, mom = 0.2, 0.1, 0.8
    x, y, params = _problem(n=12, d_in=3, d_out=2, seed=8)
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    base = keras.optimizers.SGD(lr, momentum=0.9, use_ema=True, ema_momentum=mom)
    model, inner = _sam_model(params, keras_ssam.SSAM(base, rho=rho))
    _fit(model, x, y, batch_size=4)
    opt = NumpyOptimizer(lr, momentum=0.9, ema_momentum=mom)
    final, _ = reference_run(params, xd, yd, 4, 1, rho, opt, normalize=False, stable=True)
    averages = [_np(a) for a in base._model_variables_moving_average]
    _assert_params_close(averages, opt.ema)
    # fit's finalize_variable_values: the model now holds the average.
    _assert_params_close(_weights(inner), opt.ema)
    _assert_differs(final, opt.ema, 1e-5, "weights without EMA")


def test_learning_rate_schedule_on_base_optimizer():
    """A learning-rate schedule on the base optimizer is evaluated at its
    iteration count: 3 steps with lr_t = 0.2 * 0.5^t."""
    rho = 0.2
    x, y, params = _problem(n=12, d_in=3, d_out=2, seed=9)
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.2, decay_steps=1, decay_rate=0.5)
    model, inner = _sam_model(params, keras_ssam.SAM(keras.optimizers.SGD(schedule), rho=rho))
    _fit(model, x, y, batch_size=4)
    want, _ = reference_run(
        params, xd, yd, 4, 1, rho, NumpyOptimizer(lambda t: 0.2 * 0.5**t),
        normalize=True, stable=False,
    )
    _assert_params_close(_weights(inner), want)
    const, _ = reference_run(params, xd, yd, 4, 1, rho, NumpyOptimizer(0.2), normalize=True, stable=False)
    _assert_differs(const, want, 1e-5, "constant learning rate")


@pytest.mark.parametrize("base", ["adam", "adamw", "lion"])
def test_adaptive_base_optimizers_match_reference(base):
    """Adam, AdamW and Lion as the base optimizer: two SAM steps match NumPy's
    update rules (Keras's defaults for betas and epsilon)."""
    rho = 0.1
    x, y, params = _problem(n=8, d_in=3, d_out=2, seed=10)
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    if base == "adam":
        opt, ref_opt = keras.optimizers.Adam(0.05), NumpyOptimizer(0.05, kind="adam")
    elif base == "adamw":
        opt = keras.optimizers.AdamW(0.05, weight_decay=0.1)
        ref_opt = NumpyOptimizer(0.05, kind="adam", weight_decay=0.1)
    else:
        opt = keras.optimizers.Lion(0.01)
        ref_opt = NumpyOptimizer(0.01, kind="lion", beta_1=0.9, beta_2=0.99)
    model, inner = _sam_model(params, keras_ssam.SAM(opt, rho=rho))
    hist = _fit(model, x, y, batch_size=4, epochs=2)
    want, records = reference_run(params, xd, yd, 4, 2, rho, ref_opt, normalize=True, stable=False)
    _assert_params_close(_weights(inner), want)
    # It trains: the epoch-2 loss is below epoch 1's.
    assert hist["loss"][1] < hist["loss"][0]
    np.testing.assert_allclose(
        hist["loss"], [np.mean([r["loss"] for r in records[:2]]),
                       np.mean([r["loss"] for r in records[2:]])], rtol=1e-5,
    )


# ---------------------------------------------------------------------------
# 3. rho as a schedule or a callable.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant,kind", [("SAM", "schedule"), ("USAM", "callable")])
def test_rho_schedule_uses_rho_at_step(variant, kind):
    """The perturbation at step t uses rho(t), t = base_optimizer.iterations:
    3 steps with rho_t = 0.4 * 0.5^t (ExponentialDecay) or 0.1 * (t + 1)
    (a plain callable)."""
    cls, normalize, stable = VARIANTS[variant]
    lr = 0.1
    x, y, params = _problem(n=12, d_in=3, d_out=2, seed=11)
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    if kind == "schedule":
        rho = keras.optimizers.schedules.ExponentialDecay(0.4, decay_steps=1, decay_rate=0.5)
        rho_fn = lambda t: 0.4 * 0.5**t  # noqa: E731
    else:
        rho = lambda step: 0.1 * (step + 1)  # noqa: E731
        rho_fn = lambda t: 0.1 * (t + 1)  # noqa: E731
    model, inner = _sam_model(params, cls(keras.optimizers.SGD(lr, momentum=0.9), rho=rho), diagnostics=True)
    hist = _fit(model, x, y, batch_size=4)
    want, records = reference_run(
        params, xd, yd, 4, 1, rho_fn, NumpyOptimizer(lr, momentum=0.9),
        normalize=normalize, stable=stable,
    )
    _assert_params_close(_weights(inner), want)
    np.testing.assert_allclose(
        hist["sharpness"][0], np.mean([r["sharpness"] for r in records]), rtol=1e-4, atol=1e-6
    )
    # rho fixed at rho(0) would differ.
    fixed, _ = reference_run(
        params, xd, yd, 4, 1, rho_fn(0), NumpyOptimizer(lr, momentum=0.9),
        normalize=normalize, stable=stable,
    )
    _assert_differs(fixed, want, 1e-5, "rho fixed at rho(0)")


# ---------------------------------------------------------------------------
# 4. steps_per_execution and jit_compile.
# ---------------------------------------------------------------------------


def _ssam_run(params, x, y, **compile_kwargs):
    model, inner = _sam_model(
        params,
        keras_ssam.SSAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.3),
        diagnostics=True,
        **compile_kwargs,
    )
    hist = _fit(model, x, y, batch_size=2, epochs=2)
    return hist, _weights(inner)


@pytest.mark.skipif(BACKEND == "torch", reason="Keras's torch backend needs steps_per_execution=1")
def test_steps_per_execution_matches_one():
    """steps_per_execution=2 gives the same weights and epoch logs as 1 (4
    steps per epoch, 2 epochs), and both match NumPy."""
    x, y, params = _problem(n=8, d_in=3, d_out=2, seed=12)
    h1, w1 = _ssam_run(params, x, y, steps_per_execution=1)
    h2, w2 = _ssam_run(params, x, y, steps_per_execution=2)
    _assert_params_close(w2, w1, rtol=1e-6, atol=1e-6)
    for key in ("loss",) + DIAGNOSTICS:
        np.testing.assert_allclose(h2[key], h1[key], rtol=1e-5, atol=1e-6)
    want, _ = reference_run(
        params, x.astype(np.float64), y.astype(np.float64), 2, 2, 0.3,
        NumpyOptimizer(0.1, momentum=0.9), normalize=False, stable=True,
    )
    _assert_params_close(w2, want)
    _assert_differs(w2, params, 1e-5, "untrained weights")


@pytest.mark.skipif(BACKEND != "torch", reason="torch only")
def test_steps_per_execution_raises_on_torch():
    x, y, params = _problem(n=8, d_in=3, d_out=2, seed=12)
    model, _ = _sam_model(
        params, keras_ssam.SAM(keras.optimizers.SGD(0.1)), steps_per_execution=2
    )
    with pytest.raises(ValueError, match="steps_per_execution"):
        _fit(model, x, y, batch_size=2)


@pytest.mark.skipif(BACKEND == "torch", reason="jit_compile on torch is torch.compile (not in scope)")
def test_jit_compile_matches_no_jit():
    x, y, params = _problem(n=8, d_in=3, d_out=2, seed=13)
    h1, w1 = _ssam_run(params, x, y, jit_compile=False)
    h2, w2 = _ssam_run(params, x, y, jit_compile=True)
    _assert_params_close(w2, w1, rtol=1e-5, atol=1e-5)
    for key in ("loss",) + DIAGNOSTICS:
        np.testing.assert_allclose(h2[key], h1[key], rtol=1e-5, atol=1e-5)
    _assert_differs(w2, params, 1e-5, "untrained weights")


# ---------------------------------------------------------------------------
# 5. Diagnostics.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant,extra",
    [("SAM", {}), ("USAM", {}), ("SSAM", {}),
     ("SSAM", {"normalize": True, "adaptive": True, "eta": 0.01}), ("SSAM", {"max_scale": 0.5})],
    ids=["SAM", "USAM", "SSAM", "SSAM-normalized-ASAM", "SSAM-max_scale"],
)
def test_diagnostics_after_one_step(variant, extra):
    """One step, one batch, one epoch: History's grad_norm,
    perturbed_grad_norm, renorm_factor and sharpness equal NumPy's;
    renorm_factor = grad_norm / perturbed_grad_norm for SSAM (unless capped by
    max_scale) and 1 for SAM/USAM."""
    cls, normalize, stable = VARIANTS[variant]
    kwargs = dict(extra)
    normalize = kwargs.pop("normalize", normalize)
    rho = 0.4
    x, y, params = _problem(n=6, d_in=3, d_out=2, seed=14)
    model, inner = _sam_model(params, cls(keras.optimizers.SGD(0.1), rho=rho, **extra), diagnostics=True)
    hist = _fit(model, x, y, batch_size=6)
    ref = sam_reference(
        params, x.astype(np.float64), y.astype(np.float64), rho,
        normalize=normalize, stable=stable, **kwargs,
    )
    for key in DIAGNOSTICS:
        assert len(hist[key]) == 1
        np.testing.assert_allclose(hist[key][0], ref[key], rtol=1e-5, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(hist["loss"][0], ref["loss"], rtol=1e-6)
    if stable and "max_scale" not in extra:
        np.testing.assert_allclose(
            hist["renorm_factor"][0],
            hist["grad_norm"][0] / hist["perturbed_grad_norm"][0], rtol=1e-5,
        )
        assert abs(hist["renorm_factor"][0] - 1.0) > 0.05, "setup: gamma far from 1"
    elif stable:
        assert hist["renorm_factor"][0] == pytest.approx(0.5, rel=1e-6)
        assert ref["grad_norm"] / ref["perturbed_grad_norm"] > 0.55, "setup: cap binds"
    else:
        assert hist["renorm_factor"][0] == 1.0
    _assert_params_close(_weights(inner), [p - 0.1 * u for p, u in zip(params, ref["update"])])


def test_diagnostics_are_epoch_means():
    """Two batches in one epoch: each diagnostic is the mean over the steps."""
    x, y, params = _problem(n=8, d_in=3, d_out=2, seed=15)
    model, _ = _sam_model(
        params, keras_ssam.SSAM(keras.optimizers.SGD(0.2, momentum=0.9), rho=0.4), diagnostics=True
    )
    hist = _fit(model, x, y, batch_size=4)
    _, records = reference_run(
        params, x.astype(np.float64), y.astype(np.float64), 4, 1, 0.4,
        NumpyOptimizer(0.2, momentum=0.9), normalize=False, stable=True,
    )
    for key in DIAGNOSTICS + ("loss",):
        np.testing.assert_allclose(
            hist[key][0], np.mean([r[key] for r in records]), rtol=1e-5, atol=1e-7, err_msg=key
        )
    assert abs(records[0]["grad_norm"] - records[1]["grad_norm"]) > 1e-3, "setup"


def test_no_diagnostics_keys_when_off_and_in_evaluate():
    x, y, params = _problem(n=8, d_in=3, d_out=2, seed=16)
    off, _ = _sam_model(params, keras_ssam.SSAM(keras.optimizers.SGD(0.1)), metrics=["mae"])
    hist = _fit(off, x, y, batch_size=4)
    assert set(hist) == {"loss", "mae"}
    logs = off.train_on_batch(x, y, return_dict=True)
    assert not set(DIAGNOSTICS) & set(logs)

    on, _ = _sam_model(params, keras_ssam.SSAM(keras.optimizers.SGD(0.1)), diagnostics=True, metrics=["mae"])
    hist = _fit(on, x, y, batch_size=4)
    assert set(DIAGNOSTICS) <= set(hist)
    ev = on.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    assert set(ev) == {"loss", "mae"}
    ev_hist = on.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False,
                     validation_data=(x, y)).history
    assert not any(k.startswith("val_") and k[4:] in DIAGNOSTICS for k in ev_hist)
    assert set(DIAGNOSTICS) <= set(ev_hist)
    tb = on.test_on_batch(x, y, return_dict=True)
    assert not set(DIAGNOSTICS) & set(tb)


# ---------------------------------------------------------------------------
# 6. num_batch_splits.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("splits", [2, 4])
@pytest.mark.parametrize("variant", ["SAM", "SSAM"])
def test_num_batch_splits_matches_per_chunk_reference(variant, splits):
    """Batches of 8 in `splits` chunks: each chunk its own g, e, g_asc (and
    gamma) from the pre-step w; the update is the mean of the chunks'
    updates (2 steps, SGD with momentum). The logged loss is the whole-batch
    clean loss; the diagnostics are the chunks' means."""
    cls, normalize, stable = VARIANTS[variant]
    rho, lr = 0.4, 0.1
    x, y, params = _problem(n=16, d_in=3, d_out=2, seed=17)
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    model, inner = _sam_model(
        params, cls(keras.optimizers.SGD(lr, momentum=0.9), rho=rho),
        diagnostics=True, num_batch_splits=splits,
    )
    want, records = reference_run(
        params, xd, yd, 8, 1, rho, NumpyOptimizer(lr, momentum=0.9),
        splits=splits, normalize=normalize, stable=stable,
    )
    for step in range(2):
        model.reset_metrics()  # train_on_batch does it itself since Keras 3.15 only
        logs = model.train_on_batch(x[8 * step:8 * step + 8], y[8 * step:8 * step + 8], return_dict=True)
        rec = records[step]
        np.testing.assert_allclose(logs["loss"], rec["loss"], rtol=1e-6)
        for key in DIAGNOSTICS:
            np.testing.assert_allclose(logs[key], rec[key], rtol=1e-5, atol=1e-7, err_msg=key)
    _assert_params_close(_weights(inner), want)
    assert int(_np(model.optimizer.iterations)) == 2
    # The whole-batch SAM step would differ.
    whole, whole_records = reference_run(
        params, xd, yd, 8, 1, rho, NumpyOptimizer(lr, momentum=0.9),
        normalize=normalize, stable=stable,
    )
    _assert_differs(whole, want, 1e-5, "no batch splitting")
    assert abs(whole_records[0]["grad_norm"] - records[0]["grad_norm"]) > 1e-3


def test_num_batch_splits_uneven_batch_train_on_batch():
    """6 examples, num_batch_splits=4: chunks of 2, 2, 1, 1 examples, each
    its own SAM gradient; the update weights them by size (2/6, 2/6, 1/6,
    1/6) and equals the per-chunk math in float64 NumPy. Diagnostics are
    the size-weighted means. Would fail with the old divisibility error or
    with an unweighted mean of the chunks (checked against it below)."""
    x, y, params = _problem(n=6, d_in=3, d_out=2, seed=18)
    rho, lr = 0.3, 0.1
    model, inner = _sam_model(
        params, keras_ssam.SSAM(keras.optimizers.SGD(lr), rho=rho),
        num_batch_splits=4, diagnostics=True,
    )
    logs = model.train_on_batch(x, y, return_dict=True)
    want, records = reference_run(
        params, x, y, 6, 1, rho, NumpyOptimizer(lr), splits=4, normalize=False, stable=True
    )
    _assert_params_close(_weights(inner), want)
    for key in DIAGNOSTICS:
        np.testing.assert_allclose(logs[key], records[0][key], rtol=1e-5, atol=1e-7, err_msg=key)
    unweighted = [
        p - lr * np.mean(parts, axis=0)
        for p, parts in zip(params, zip(*[c["update"] for c in records[0]["chunks"]]))
    ]
    _assert_differs(unweighted, want, 1e-6, "an unweighted mean of the chunks")


@pytest.mark.parametrize("variant", ["SAM", "SSAM"])
def test_num_batch_splits_partial_last_batch_in_fit(variant):
    """fit with 10 samples, batch_size 4, num_batch_splits=4: the last batch
    has 2 samples, split into two one-example chunks (on TensorFlow, whose
    traced step sees an unknown batch size there, into four run-time chunks,
    two of them empty with weight 0). Two epochs match the float64 reference
    step by step; nothing is NaN."""
    cls, normalize, stable = VARIANTS[variant]
    x, y, params = _problem(n=10, d_in=3, d_out=2, seed=19)
    rho, lr = 0.2, 0.1
    model, inner = _sam_model(params, cls(keras.optimizers.SGD(lr, momentum=0.9), rho=rho), num_batch_splits=4)
    history = _fit(model, x, y, batch_size=4, epochs=2)
    want, _ = reference_run(
        params, x, y, 4, 2, rho, NumpyOptimizer(lr, momentum=0.9), splits=4,
        normalize=normalize, stable=stable,
    )
    _assert_params_close(_weights(inner), want)
    assert np.all(np.isfinite(history["loss"]))
    assert int(_np(model.optimizer.iterations)) == 6


def test_diagnostics_are_nan_for_an_epoch_without_a_sam_step():
    """An epoch in which no step ran the perturbed pass logs NaN (not
    measured) for the per-SAM-step diagnostics, and 0 for
    `sam_step_fraction`; the next epoch, all SAM steps, logs finite values
    and fraction 1."""
    x, y, params = _problem(n=8, d_in=3, d_out=2, seed=41)
    late = keras_ssam.schedules.LatePhase(4)  # batches of 2: epoch 1 is steps 0-3
    model, _ = _sam_model(params, keras_ssam.SAM(keras.optimizers.SGD(0.1), rho=0.1, sam_probability=late),
                          diagnostics=True)
    hist = _fit(model, x, y, batch_size=2, epochs=2)
    assert hist["sam_step_fraction"] == [0.0, 1.0]
    for key in DIAGNOSTICS:
        assert np.isnan(hist[key][0]), (key, hist[key])
        assert np.isfinite(hist[key][1]), (key, hist[key])

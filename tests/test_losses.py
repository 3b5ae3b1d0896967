"""Both SAM passes differentiate the whole training loss.

The loss at w (clean pass) and at w + e (perturbed pass) must include weight
regularizers, activity regularizers, `sample_weight` and, for multi-output
models, every output's loss with its `loss_weights`. Each test trains a linear
model (Dense layers without activation, MSE) for one or two steps with plain
SGD under SAM / SSAM and compares the weights with a float64 NumPy reference
whose gradients are written out by hand. Each test also checks that the
reference with the term dropped from (or evaluated at the wrong point in) the
perturbed pass lies far outside the tolerance, so the comparison can fail.
"""

import keras
import numpy as np
import pytest

import keras_ssam

LR = 0.1
RHO = 0.3
EPS = 1e-12
RTOL = 1e-5
ATOL_REL = 1e-6  # atol = ATOL_REL * weight scale
N = 8  # batch size (one batch per step)

VARIANTS = ["sam", "ssam"]


# --------------------------------------------------------------------------
# NumPy reference
# --------------------------------------------------------------------------


def np_norm(arrays):
    return np.sqrt(sum(np.sum(np.square(a)) for a in arrays))


def reference_steps(params, grad_clean, grad_perturbed, variant, steps, lr=LR, rho=RHO):
    """`steps` SAM steps with SGD in float64.

    grad_clean(p) -> gradient at p.
    grad_perturbed(p_perturbed, p_clean) -> gradient used in the perturbed
    pass (normally grad_clean(p_perturbed)).
    Returns the list of parameter lists [w0, w1, ..., w_steps].
    """
    history = [[np.asarray(p, np.float64) for p in params]]
    for _ in range(steps):
        w = history[-1]
        g = grad_clean(w)
        g_norm = np_norm(g)
        if variant == "sam":
            e = [rho * gi / (g_norm + EPS) for gi in g]
        elif variant in ("usam", "ssam"):
            e = [rho * gi for gi in g]
        else:
            raise AssertionError(variant)
        w_pert = [wi + ei for wi, ei in zip(w, e)]
        g_asc = grad_perturbed(w_pert, w)
        if variant == "ssam":
            gamma = g_norm / (np_norm(g_asc) + EPS)
            g_asc = [gamma * gi for gi in g_asc]
        history.append([wi - lr * ui for wi, ui in zip(w, g_asc)])
    return history


def tolerances(ref):
    scale = max(np.max(np.abs(a)) for a in ref)
    return RTOL, ATOL_REL * scale


def assert_params_close(actual, ref, label=""):
    rtol, atol = tolerances(ref)
    assert len(actual) == len(ref)
    for i, (a, r) in enumerate(zip(actual, ref)):
        np.testing.assert_allclose(
            np.asarray(a, np.float64), r, rtol=rtol, atol=atol,
            err_msg=f"{label} parameter {i}",
        )


def assert_far_apart(ref, other, label):
    """`other` (a wrong reference) must be far outside the tolerance of `ref`."""
    rtol, atol = tolerances(ref)
    worst = 0.0
    for r, o in zip(ref, other):
        tol = atol + rtol * np.abs(r)
        worst = max(worst, float(np.max(np.abs(r - o) / tol)))
    assert worst > 100.0, (
        f"wrong reference ({label}) is within {worst:.1f}x the tolerance: the "
        "test could not tell it apart"
    )


def make_sam(variant, lr=LR, rho=RHO):
    base = keras.optimizers.SGD(learning_rate=lr)
    if variant == "sam":
        return keras_ssam.SAM(base, rho=rho)
    if variant == "usam":
        return keras_ssam.USAM(base, rho=rho)
    if variant == "ssam":
        return keras_ssam.SSAM(base, rho=rho)
    raise AssertionError(variant)


def data(seed, n_in=3, n_out=2):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(N, n_in)).astype("float32")
    y = rng.normal(size=(N, n_out)).astype("float32")
    kernel = rng.normal(scale=0.7, size=(n_in, n_out)).astype("float32")
    bias = rng.normal(scale=0.3, size=(n_out,)).astype("float32")
    return x, y, kernel, bias


def as64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


# Linear layer with MSE: pieces of the loss and their gradients w.r.t. [W, b].


def mse_residual(params, x):
    w, b = params
    return x @ w + b


def mse_loss(params, x, y, sw=None):
    r = mse_residual(params, x) - y
    per_sample = np.mean(r**2, axis=1)
    if sw is not None:
        per_sample = per_sample * sw
    return np.sum(per_sample) / len(x)  # "sum_over_batch_size"


def mse_grad(params, x, y, sw=None):
    r = mse_residual(params, x) - y
    if sw is not None:
        r = r * sw[:, None]
    d = 2.0 * r / (r.shape[0] * r.shape[1])
    return [x.T @ d, d.sum(axis=0)]


def add(g1, g2):
    return [a + b for a, b in zip(g1, g2)]


def _weights(layer):
    return [keras.ops.convert_to_numpy(v) for v in (layer.kernel, layer.bias)]


def fit_steps(model, x, y, steps, **kwargs):
    history = model.fit(
        x, y, batch_size=N, epochs=steps, shuffle=False, verbose=0, **kwargs
    )
    return history.history["loss"]


# --------------------------------------------------------------------------
# (a) weight regularizers
# --------------------------------------------------------------------------

L2_KERNEL = 0.4


@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_regularizer_in_both_passes(variant):
    x, y, kernel, bias = data(0)
    layer = keras.layers.Dense(
        2, kernel_regularizer=keras.regularizers.L2(L2_KERNEL), name="dense"
    )
    inner = keras.Sequential([keras.Input((3,)), layer])
    layer.set_weights([kernel, bias])
    model = keras_ssam.SAMModel(inner)
    model.compile(optimizer=make_sam(variant), loss="mse")
    losses = fit_steps(model, x, y, steps=2)

    x64, y64 = as64(x, y)

    def reg_grad(p):
        return [2.0 * L2_KERNEL * p[0], np.zeros_like(p[1])]

    def grad(p):
        return add(mse_grad(p, x64, y64), reg_grad(p))

    def loss(p):
        return mse_loss(p, x64, y64) + L2_KERNEL * np.sum(p[0] ** 2)

    w0 = as64(kernel, bias)
    ref = reference_steps(w0, grad, lambda pp, pc: grad(pp), variant, 2)
    assert_params_close(_weights(layer), ref[2])
    # The logged loss is the clean loss at w, regularization included.
    np.testing.assert_allclose(losses, [loss(ref[0]), loss(ref[1])], rtol=RTOL)
    assert abs(loss(ref[0]) - mse_loss(ref[0], x64, y64)) > 1e3 * RTOL * loss(ref[0])

    # Wrong references the test must be able to tell apart.
    no_reg_perturbed = reference_steps(
        w0, grad, lambda pp, pc: mse_grad(pp, x64, y64), variant, 2
    )
    assert_far_apart(ref[2], no_reg_perturbed[2], "regularizer dropped at w+e")
    reg_at_w = reference_steps(
        w0, grad, lambda pp, pc: add(mse_grad(pp, x64, y64), reg_grad(pc)), variant, 2
    )
    assert_far_apart(ref[2], reg_at_w[2], "regularizer evaluated at w, not w+e")
    no_reg_clean = reference_steps(
        w0, lambda p: mse_grad(p, x64, y64), lambda pp, pc: grad(pp), variant, 2
    )
    assert_far_apart(ref[2], no_reg_clean[2], "regularizer dropped at w")


@pytest.mark.parametrize("variant", VARIANTS)
def test_regularizers_on_two_layers_in_both_passes(variant):
    """Kernel and bias regularizers (L2 and L1L2) on a two-layer linear model,
    where the loss is not quadratic in the weights."""
    rng = np.random.RandomState(1)
    x = rng.normal(size=(N, 3)).astype("float32")
    y = rng.normal(size=(N, 1)).astype("float32")
    k1 = rng.normal(scale=0.6, size=(3, 2)).astype("float32")
    b1 = np.array([0.3, -0.2], "float32")
    k2 = rng.normal(scale=0.8, size=(2, 1)).astype("float32")
    b2 = np.array([0.1], "float32")
    l2a, l2b, l2c = 0.3, 0.2, 0.5
    d1 = keras.layers.Dense(
        2,
        kernel_regularizer=keras.regularizers.L2(l2a),
        bias_regularizer=keras.regularizers.L2(l2b),
        name="d1",
    )
    d2 = keras.layers.Dense(1, kernel_regularizer=keras.regularizers.L2(l2c), name="d2")
    inner = keras.Sequential([keras.Input((3,)), d1, d2])
    d1.set_weights([k1, b1])
    d2.set_weights([k2, b2])
    model = keras_ssam.SAMModel(inner)
    model.compile(optimizer=make_sam(variant), loss="mse")
    losses = fit_steps(model, x, y, steps=2)

    x64, y64 = as64(x, y)

    def data_grad(p):
        w1, c1, w2, c2 = p
        h = x64 @ w1 + c1
        out = h @ w2 + c2
        d = 2.0 * (out - y64) / out.size
        dh = d @ w2.T
        return [x64.T @ dh, dh.sum(0), h.T @ d, d.sum(0)]

    def reg_grad(p):
        return [2 * l2a * p[0], 2 * l2b * p[1], 2 * l2c * p[2], np.zeros_like(p[3])]

    def grad(p):
        return add(data_grad(p), reg_grad(p))

    def loss(p):
        w1, c1, w2, c2 = p
        out = (x64 @ w1 + c1) @ w2 + c2
        return (
            np.mean((out - y64) ** 2)
            + l2a * np.sum(w1**2)
            + l2b * np.sum(c1**2)
            + l2c * np.sum(w2**2)
        )

    w0 = as64(k1, b1, k2, b2)
    ref = reference_steps(w0, grad, lambda pp, pc: grad(pp), variant, 2)
    assert_params_close(_weights(d1) + _weights(d2), ref[2])
    np.testing.assert_allclose(losses, [loss(ref[0]), loss(ref[1])], rtol=RTOL)

    reg_at_w = reference_steps(
        w0, grad, lambda pp, pc: add(data_grad(pp), reg_grad(pc)), variant, 2
    )
    assert_far_apart(ref[2], reg_at_w[2], "regularizers evaluated at w, not w+e")
    no_reg = reference_steps(w0, grad, lambda pp, pc: data_grad(pp), variant, 2)
    assert_far_apart(ref[2], no_reg[2], "regularizers dropped at w+e")


# --------------------------------------------------------------------------
# (b) activity regularizers
# --------------------------------------------------------------------------

L2_ACTIVITY = 0.6


def activity_divisor(batch):
    """What Keras divides an activity penalty by: the batch size since Keras
    3.14, 1 before. Asked of Keras itself, so the reference follows the
    training loss of whichever Keras is installed."""
    probe = keras.layers.Dense(
        1, use_bias=False, kernel_initializer="ones",
        activity_regularizer=keras.regularizers.L2(1.0),
    )
    probe(np.ones((batch, 1), "float32"))  # output all ones: sum(out^2) = batch
    (penalty,) = probe.losses
    divisor = batch / float(keras.ops.convert_to_numpy(penalty))
    assert np.isclose(divisor, 1.0) or np.isclose(divisor, batch), divisor
    return divisor


@pytest.mark.parametrize("variant", VARIANTS)
def test_activity_regularizer_in_both_passes(variant):
    x, y, kernel, bias = data(2)
    layer = keras.layers.Dense(
        2, activity_regularizer=keras.regularizers.L2(L2_ACTIVITY), name="dense"
    )
    inner = keras.Sequential([keras.Input((3,)), layer])
    layer.set_weights([kernel, bias])
    model = keras_ssam.SAMModel(inner)
    model.compile(optimizer=make_sam(variant), loss="mse")
    losses = fit_steps(model, x, y, steps=2)

    x64, y64 = as64(x, y)

    # L_act = l2 * sum(out^2) / div, div = N on Keras >= 3.14, 1 before.
    div = activity_divisor(N)

    def act_grad(p):
        out = mse_residual(p, x64)
        d = 2.0 * L2_ACTIVITY * out / div
        return [x64.T @ d, d.sum(0)]

    def grad(p):
        return add(mse_grad(p, x64, y64), act_grad(p))

    def loss(p):
        out = mse_residual(p, x64)
        return mse_loss(p, x64, y64) + L2_ACTIVITY * np.sum(out**2) / div

    w0 = as64(kernel, bias)
    ref = reference_steps(w0, grad, lambda pp, pc: grad(pp), variant, 2)
    assert_params_close(_weights(layer), ref[2])
    np.testing.assert_allclose(losses, [loss(ref[0]), loss(ref[1])], rtol=RTOL)
    assert abs(loss(ref[0]) - mse_loss(ref[0], x64, y64)) > 1e3 * RTOL * loss(ref[0])

    no_act = reference_steps(
        w0, grad, lambda pp, pc: mse_grad(pp, x64, y64), variant, 2
    )
    assert_far_apart(ref[2], no_act[2], "activity penalty dropped at w+e")
    act_at_w = reference_steps(
        w0, grad, lambda pp, pc: add(mse_grad(pp, x64, y64), act_grad(pc)), variant, 2
    )
    assert_far_apart(ref[2], act_at_w[2], "activity penalty evaluated at w, not w+e")


@pytest.mark.parametrize("variant", VARIANTS)
def test_activity_and_weight_regularizer_on_functional_model(variant):
    """A functional inner model with both kinds of regularizer on one layer."""
    x, y, kernel, bias = data(3)
    inp = keras.Input((3,))
    layer = keras.layers.Dense(
        2,
        kernel_regularizer=keras.regularizers.L2(L2_KERNEL),
        activity_regularizer=keras.regularizers.L2(L2_ACTIVITY),
        name="dense",
    )
    inner = keras.Model(inp, layer(inp))
    layer.set_weights([kernel, bias])
    model = keras_ssam.SAMModel(inner)
    model.compile(optimizer=make_sam(variant), loss="mse")
    losses = fit_steps(model, x, y, steps=1)

    x64, y64 = as64(x, y)
    div = activity_divisor(N)

    def extra_grad(p):
        out = mse_residual(p, x64)
        d = 2.0 * L2_ACTIVITY * out / div
        return [x64.T @ d + 2 * L2_KERNEL * p[0], d.sum(0)]

    def grad(p):
        return add(mse_grad(p, x64, y64), extra_grad(p))

    def loss(p):
        out = mse_residual(p, x64)
        return (
            mse_loss(p, x64, y64)
            + L2_ACTIVITY * np.sum(out**2) / div
            + L2_KERNEL * np.sum(p[0] ** 2)
        )

    w0 = as64(kernel, bias)
    ref = reference_steps(w0, grad, lambda pp, pc: grad(pp), variant, 1)
    assert_params_close(_weights(layer), ref[1])
    np.testing.assert_allclose(losses, [loss(ref[0])], rtol=RTOL)

    extra_at_w = reference_steps(
        w0, grad, lambda pp, pc: add(mse_grad(pp, x64, y64), extra_grad(pc)), variant, 1
    )
    assert_far_apart(ref[1], extra_at_w[1], "penalties evaluated at w, not w+e")


# --------------------------------------------------------------------------
# (c) sample_weight
# --------------------------------------------------------------------------

SAMPLE_WEIGHT = np.array([0.1, 3.0, 0.5, 2.0, 0.0, 1.0, 4.0, 0.2], "float32")


def _sample_weight_setup(variant, seed):
    x, y, kernel, bias = data(seed)
    layer = keras.layers.Dense(2, name="dense")
    inner = keras.Sequential([keras.Input((3,)), layer])
    layer.set_weights([kernel, bias])
    model = keras_ssam.SAMModel(inner)
    model.compile(optimizer=make_sam(variant), loss="mse")
    return model, layer, x, y, kernel, bias


@pytest.mark.parametrize("variant", VARIANTS)
def test_sample_weight_in_both_passes_fit(variant):
    model, layer, x, y, kernel, bias = _sample_weight_setup(variant, 4)
    losses = fit_steps(model, x, y, steps=2, sample_weight=SAMPLE_WEIGHT)

    x64, y64, sw = as64(x, y, SAMPLE_WEIGHT)

    def grad(p):
        return mse_grad(p, x64, y64, sw)

    w0 = as64(kernel, bias)
    ref = reference_steps(w0, grad, lambda pp, pc: grad(pp), variant, 2)
    assert_params_close(_weights(layer), ref[2])
    np.testing.assert_allclose(
        losses, [mse_loss(ref[0], x64, y64, sw), mse_loss(ref[1], x64, y64, sw)],
        rtol=RTOL,
    )

    unweighted_perturbed = reference_steps(
        w0, grad, lambda pp, pc: mse_grad(pp, x64, y64), variant, 2
    )
    assert_far_apart(ref[2], unweighted_perturbed[2], "sample_weight dropped at w+e")
    unweighted_clean = reference_steps(
        w0, lambda p: mse_grad(p, x64, y64), lambda pp, pc: grad(pp), variant, 2
    )
    assert_far_apart(ref[2], unweighted_clean[2], "sample_weight dropped at w")


@pytest.mark.parametrize("variant", VARIANTS)
def test_sample_weight_in_both_passes_train_on_batch(variant):
    model, layer, x, y, kernel, bias = _sample_weight_setup(variant, 5)
    logs = model.train_on_batch(x, y, sample_weight=SAMPLE_WEIGHT, return_dict=True)

    x64, y64, sw = as64(x, y, SAMPLE_WEIGHT)

    def grad(p):
        return mse_grad(p, x64, y64, sw)

    w0 = as64(kernel, bias)
    ref = reference_steps(w0, grad, lambda pp, pc: grad(pp), variant, 1)
    assert_params_close(_weights(layer), ref[1])
    np.testing.assert_allclose(logs["loss"], mse_loss(w0, x64, y64, sw), rtol=RTOL)
    unweighted_perturbed = reference_steps(
        w0, grad, lambda pp, pc: mse_grad(pp, x64, y64), variant, 1
    )
    assert_far_apart(ref[1], unweighted_perturbed[1], "sample_weight dropped at w+e")


# --------------------------------------------------------------------------
# (d) multi-output functional model, dict losses and loss_weights
# --------------------------------------------------------------------------

LOSS_WEIGHTS = {"a": 0.3, "b": 2.0}


@pytest.mark.parametrize("variant", VARIANTS)
def test_multi_output_dict_losses_and_loss_weights(variant):
    rng = np.random.RandomState(6)
    x = rng.normal(size=(N, 3)).astype("float32")
    ya = rng.normal(size=(N, 2)).astype("float32")
    yb = rng.normal(size=(N, 1)).astype("float32")
    kt = rng.normal(scale=0.6, size=(3, 4)).astype("float32")
    bt = rng.normal(scale=0.2, size=(4,)).astype("float32")
    ka = rng.normal(scale=0.6, size=(4, 2)).astype("float32")
    ba = rng.normal(scale=0.2, size=(2,)).astype("float32")
    kb = rng.normal(scale=0.6, size=(4, 1)).astype("float32")
    bb = rng.normal(scale=0.2, size=(1,)).astype("float32")

    inp = keras.Input((3,), name="x")
    trunk = keras.layers.Dense(4, name="trunk")
    head_a = keras.layers.Dense(2, name="a")
    head_b = keras.layers.Dense(1, name="b")
    h = trunk(inp)
    inner = keras.Model(inp, {"a": head_a(h), "b": head_b(h)})
    trunk.set_weights([kt, bt])
    head_a.set_weights([ka, ba])
    head_b.set_weights([kb, bb])
    model = keras_ssam.SAMModel(inner)
    model.compile(
        optimizer=make_sam(variant),
        loss={"a": "mse", "b": "mse"},
        loss_weights=LOSS_WEIGHTS,
    )
    losses = fit_steps(model, x, {"a": ya, "b": yb}, steps=2)

    x64, ya64, yb64 = as64(x, ya, yb)

    def make_grad(wa, wb):
        def grad(p):
            wt, ct, wa_, ca, wb_, cb = p
            hh = x64 @ wt + ct
            da = wa * 2.0 * (hh @ wa_ + ca - ya64) / ya64.size
            db = wb * 2.0 * (hh @ wb_ + cb - yb64) / yb64.size
            dh = da @ wa_.T + db @ wb_.T
            return [
                x64.T @ dh, dh.sum(0), hh.T @ da, da.sum(0), hh.T @ db, db.sum(0)
            ]

        return grad

    def loss(p):
        wt, ct, wa_, ca, wb_, cb = p
        hh = x64 @ wt + ct
        return LOSS_WEIGHTS["a"] * np.mean((hh @ wa_ + ca - ya64) ** 2) + LOSS_WEIGHTS[
            "b"
        ] * np.mean((hh @ wb_ + cb - yb64) ** 2)

    grad = make_grad(LOSS_WEIGHTS["a"], LOSS_WEIGHTS["b"])
    w0 = as64(kt, bt, ka, ba, kb, bb)
    ref = reference_steps(w0, grad, lambda pp, pc: grad(pp), variant, 2)
    assert_params_close(_weights(trunk) + _weights(head_a) + _weights(head_b), ref[2])
    np.testing.assert_allclose(losses, [loss(ref[0]), loss(ref[1])], rtol=RTOL)

    unweighted = make_grad(1.0, 1.0)
    no_loss_weights = reference_steps(
        w0, grad, lambda pp, pc: unweighted(pp), variant, 2
    )
    assert_far_apart(ref[2], no_loss_weights[2], "loss_weights dropped at w+e")
    only_a = make_grad(LOSS_WEIGHTS["a"], 0.0)
    output_b_dropped = reference_steps(w0, grad, lambda pp, pc: only_a(pp), variant, 2)
    assert_far_apart(ref[2], output_b_dropped[2], "output b's loss dropped at w+e")

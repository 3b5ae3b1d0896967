"""What a new user's real Keras code hit first (issue 12), on every backend.

Each test fails without its fix: models built by their first batch (the
TensorFlow step read the variables before any pass had built them), a
perturbed gradient that vanishes (the update was 0 and training silently
stopped), a plain model compiled with a SAM optimizer (evaluate raised on
JAX and torch), and weights files exchanged with the bare model.
"""

import os
import warnings

import keras
import numpy as np
import pytest
from test_features import (
    VARIANTS,
    NumpyOptimizer,
    _assert_differs,
    _assert_params_close,
    _problem,
    reference_run,
)

import keras_ssam

BACKEND = keras.backend.backend()


def _values(arrays):
    """A Keras initializer that returns these exact (float32) values."""
    return lambda shape, dtype=None: np.asarray(arrays, "float32")


def _dense(params, **kwargs):
    kernel, bias = params
    return keras.layers.Dense(
        kernel.shape[1],
        kernel_initializer=_values(kernel),
        bias_initializer=_values(bias),
        **kwargs,
    )


class SubclassedLinear(keras.Model):
    """No `build`: Keras builds it by tracing `call` on the first batch."""

    def __init__(self, params, **kwargs):
        super().__init__(**kwargs)
        self.lin = _dense(params)

    def call(self, x):
        return self.lin(x)


def _numpy(weights):
    return [np.asarray(keras.ops.convert_to_numpy(w), np.float64) for w in weights]


# --------------------------------------------------------------------------
# Models built by their first batch.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sequential_without_input", "subclassed"])
@pytest.mark.parametrize("variant", ["SAM", "SSAM"])
def test_model_built_by_first_batch_trains_like_the_reference(kind, variant):
    """`Sequential([Dense])` without an `Input`, and a subclassed model
    never called: `fit` builds them by the first batch (on TensorFlow the
    step used to read 0 variables and crash) and two epochs match the
    float64 NumPy reference step by step."""
    cls, normalize, stable = VARIANTS[variant]
    x, y, params = _problem(n=8, d_in=3, d_out=2, seed=21)
    inner = keras.Sequential([_dense(params)]) if kind == "sequential_without_input" else SubclassedLinear(params)
    assert not inner.built
    model = keras_ssam.SAMModel(inner)
    model.compile(optimizer=cls(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.2), loss="mse")
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    want, _ = reference_run(
        params, x, y, 4, 2, 0.2, NumpyOptimizer(0.1, momentum=0.9),
        normalize=normalize, stable=stable,
    )
    assert len(model.trainable_variables) == 2
    _assert_params_close(_numpy(inner.trainable_variables), want)


def test_build_builds_a_subclassed_inner_model_without_warning():
    """`SAMModel.build(shape)` builds a subclassed model the way its first
    call would (Keras's bare `build` only marks it built and warns): its
    weights exist, with their initial values, and no warning is raised."""
    _, _, params = _problem(n=4, d_in=3, d_out=2, seed=22)
    model = keras_ssam.SAMModel(SubclassedLinear(params))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.build((None, 3))
    assert model.built and model.model.built
    got = _numpy(model.model.weights)
    assert len(got) == 2
    for g, p in zip(got, params):
        np.testing.assert_array_equal(g, p)


# --------------------------------------------------------------------------
# A perturbed gradient that vanishes.
# --------------------------------------------------------------------------

OPTIMIZERS = {
    "SAM": lambda base, rho: keras_ssam.SAM(base, rho=rho),
    "USAM": lambda base, rho: keras_ssam.USAM(base, rho=rho),
    "SSAM": lambda base, rho: keras_ssam.SSAM(base, rho=rho),
    "SSAM_normalized": lambda base, rho: keras_ssam.SSAM(base, rho=rho, normalize=True),
    "ASAM": lambda base, rho: keras_ssam.SAM(base, rho=rho, adaptive=True),
    # GSAM: u = g gives (1 + alpha) g - alpha g = g; WSAM: g + a (g - g) = g;
    # F-SAM: d = g - m_t keeps g's sign here, so w + e is past the kink too.
    "GSAM": lambda base, rho: keras_ssam.GSAM(base, rho=rho, alpha=0.4),
    "GSAM_stable": lambda base, rho: keras_ssam.GSAM(base, rho=rho, alpha=0.4, stable=True),
    "FriendlySAM": lambda base, rho: keras_ssam.FriendlySAM(base, rho=rho),
    "WSAM": lambda base, rho: keras_ssam.WSAM(base, rho=rho),
    "WSAM_coupled": lambda base, rho: keras_ssam.WSAM(base, rho=rho, decouple=False),
}


@pytest.mark.parametrize("variant", list(OPTIMIZERS))
def test_vanished_perturbed_gradient_falls_back_to_the_clean_one(variant):
    """`relu(w x)` with x = 1, target 1, mse, from w = 0.5: the ascent moves
    w below 0 (rho = 2), where relu is flat and the perturbed gradient is
    exactly 0 while the clean one, 2 (w - 1), is not. Every variant's update
    would be 0 (SSAM's gamma = ||g|| / 0), and training would stop. Each
    step takes the clean gradient instead, so SGD follows the closed form
    w <- w - lr * 2 (w - 1) for three steps, and the diagnostic
    `clean_fallback` is 1."""
    lr, rho = 0.1, 2.0
    inner = keras.Sequential(
        [keras.Input((1,)), keras.layers.Dense(1, use_bias=False, activation="relu",
                                               kernel_initializer=_values([[0.5]]))]
    )
    model = keras_ssam.SAMModel(inner, diagnostics=True)
    model.compile(optimizer=OPTIMIZERS[variant](keras.optimizers.SGD(lr), rho), loss="mse")
    x, y = np.ones((1, 1), "float32"), np.ones((1, 1), "float32")
    w = 0.5
    for _ in range(3):
        logs = model.train_on_batch(x, y, return_dict=True)
        w = w - lr * 2.0 * (w - 1.0)
        assert logs["clean_fallback"] == 1.0
        assert logs["renorm_factor"] == 1.0
        assert logs["perturbed_grad_norm"] == 0.0
        np.testing.assert_allclose(_numpy(inner.weights)[0], [[w]], rtol=1e-6)
    assert w > 0.7  # it moved: without the fallback it stays at 0.5


def test_saturated_softmax_falls_back_to_the_clean_gradient():
    """The reported case in small: a softmax classifier with
    sparse_categorical_crossentropy (probabilities, not logits) under SSAM.
    The unnormalized ascent (large rho) pushes every true-class probability
    below the loss's 1e-7 clip, so the perturbed gradient is exactly 0. The
    step equals one SGD step with the clean cross-entropy gradient,
    (p - onehot(y)) x / N, computed in float64 NumPy. TensorFlow's
    cross-entropy takes the logits back from a softmax op, so nothing is
    clipped there: the perturbed gradient does not vanish, no fallback
    happens, and the step still moves the weights (the relu test above
    checks the fallback itself on TensorFlow too)."""
    rs = np.random.RandomState(3)
    x = rs.normal(size=(6, 4)).astype("float32")
    y = np.array([0, 1, 2, 0, 1, 2])
    kernel = (0.3 * rs.normal(size=(4, 3))).astype("float32")
    bias = np.zeros(3, "float32")
    inner = keras.Sequential([keras.Input((4,)), _dense([kernel, bias], activation="softmax")])
    model = keras_ssam.SAMModel(inner, diagnostics=True)
    lr = 0.1
    model.compile(optimizer=keras_ssam.SSAM(keras.optimizers.SGD(lr), rho=200.0),
                  loss="sparse_categorical_crossentropy")
    logs = model.train_on_batch(x, y, return_dict=True)
    got = _numpy(inner.weights)
    _assert_differs(got, [kernel, bias], 1e-6, "the weights before the step")
    if BACKEND == "tensorflow":
        assert logs["clean_fallback"] == 0.0 and logs["perturbed_grad_norm"] > 0
        assert all(np.all(np.isfinite(g)) for g in got)
        return
    assert logs["clean_fallback"] == 1.0

    x64, k64 = x.astype(np.float64), kernel.astype(np.float64)
    logits = x64 @ k64
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    residual = (p - np.eye(3)[y]) / len(y)
    want = [k64 - lr * x64.T @ residual, -lr * residual.sum(0)]
    _assert_params_close(got, want)


# --------------------------------------------------------------------------
# A plain model compiled with a SAM optimizer.
# --------------------------------------------------------------------------


def test_plain_model_with_sam_optimizer_evaluates_and_predicts_but_refuses_to_train():
    """evaluate and predict work on every backend (JAX and torch used to
    raise, as they build the compiled optimizer for evaluate); fit and
    train_on_batch raise, before and after an evaluate, and leave the
    weights as they were. The evaluated loss is the NumPy mse."""
    x, y, params = _problem(n=8, d_in=3, d_out=2, seed=23)
    inner = keras.Sequential([keras.Input((3,)), _dense(params)])
    inner.compile(optimizer=keras_ssam.SSAM(keras.optimizers.SGD(0.1), rho=0.1), loss="mse")
    kernel, bias = params
    want_loss = np.mean((x.astype(np.float64) @ kernel + bias - y) ** 2)
    np.testing.assert_allclose(inner.evaluate(x, y, verbose=0), want_loss, rtol=1e-6)
    np.testing.assert_allclose(inner.predict(x, verbose=0), x @ kernel + bias, rtol=1e-5, atol=1e-6)
    for train in (
        lambda: inner.fit(x, y, epochs=1, verbose=0),
        lambda: inner.train_on_batch(x, y),
    ):
        with pytest.raises(RuntimeError, match="SAMModel"):
            train()
        for got, want in zip(_numpy(inner.weights), params):
            np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(inner.evaluate(x, y, verbose=0), want_loss, rtol=1e-6)


# --------------------------------------------------------------------------
# Weights files and the bare model.
# --------------------------------------------------------------------------


def test_weights_files_exchange_with_the_bare_model_through_model_attribute(tmp_path):
    """The supported path: `sam_model.model.save_weights` writes a file the
    bare model loads, and `sam_model.model.load_weights` reads the bare
    model's file; values round-trip exactly. (`SAMModel.save_weights` also
    holds the optimizer state, with the wrapped model under its own path.)"""
    x, y, params = _problem(n=8, d_in=3, d_out=2, seed=24)

    def bare():
        return keras.Sequential([keras.Input((3,)), _dense(params), keras.layers.BatchNormalization()])

    trained = keras_ssam.SAMModel(bare())
    trained.compile(optimizer=keras_ssam.SAM(keras.optimizers.SGD(0.1), rho=0.1), loss="mse")
    trained.fit(x, y, batch_size=4, epochs=1, verbose=0)
    saved = _numpy(trained.model.weights)
    _assert_differs(saved[:2], params, 1e-6, "the initial weights")

    path = os.path.join(tmp_path, "inner.weights.h5")
    trained.model.save_weights(path)
    plain = bare()
    plain.load_weights(path)
    for got, want in zip(_numpy(plain.weights), saved):
        np.testing.assert_array_equal(got, want)

    path = os.path.join(tmp_path, "bare.weights.h5")
    plain.save_weights(path)
    wrapped = keras_ssam.SAMModel(bare())
    wrapped.model.load_weights(path)
    for got, want in zip(_numpy(wrapped.weights), saved):
        np.testing.assert_array_equal(got, want)

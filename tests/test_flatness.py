"""keras_ssam.flatness against Hessians known in closed form.

Linear least squares: a bias-free `Dense(k)` on inputs X (n x d) with the
mean squared error L = 1/(n k) sum_ij ((X W)_ij - Y_ij)^2 has the Hessian
I_k (x) (2 / (n k)) X^T X (one identical block per output unit), whatever
W is. Logistic regression: `Dense(1, sigmoid)` with the binary
cross-entropy has the Hessian (1/n) X^T diag(p (1 - p)) X at W, p the
predicted probabilities.
"""

import keras
import numpy as np
import pytest

from keras_ssam import flatness

N, D, K = 40, 6, 3
# Eigenvalues of (2 / (n k)) X^T X: a gap of 0.4 between the top two makes
# power iteration converge like 0.4^(2t).
SPECTRUM = np.array([5.0, 2.0, 1.0, 0.5, 0.25, 0.1])


def _design(spectrum=SPECTRUM, n=N, k=K, seed=0, diagonal=False):
    """X (n x d) with (2 / (n k)) X^T X = V diag(spectrum) V^T."""
    rng = np.random.default_rng(seed)
    d = len(spectrum)
    u, _ = np.linalg.qr(rng.standard_normal((n, d)))
    v = np.eye(d) if diagonal else np.linalg.qr(rng.standard_normal((d, d)))[0]
    singular = np.sqrt(spectrum * n * k / 2.0)
    return (u * singular) @ v.T


def _linear_model(d=D, k=K, **kwargs):
    model = keras.Sequential(
        [keras.Input((d,)), keras.layers.Dense(k, use_bias=False, **kwargs)]
    )
    model.layers[0].kernel.assign(
        np.random.default_rng(1).standard_normal((d, k)).astype("float32")
    )
    return model


def _least_squares(seed=0, diagonal=False):
    x = _design(seed=seed, diagonal=diagonal)
    y = np.random.default_rng(2).standard_normal((N, K))
    hessian = np.kron(np.eye(K), 2.0 / (N * K) * x.T @ x)
    return x.astype("float32"), y.astype("float32"), hessian


def _weights(model):
    return [np.array(w, copy=True) for w in model.get_weights()]


def _assert_identical(before, after):
    assert len(before) == len(after)
    for b, a in zip(before, after):
        assert b.dtype == a.dtype and b.shape == a.shape
        assert np.array_equal(b, a)


def _hutchinson_std(hessian, num_samples):
    """Standard deviation of Hutchinson's estimate with Rademacher probes."""
    variance = 2.0 * (np.sum(hessian**2) - np.sum(np.diag(hessian) ** 2))
    return np.sqrt(variance / num_samples)


METHODS = pytest.mark.parametrize("method", ["autodiff", "finite_difference"])


@METHODS
def test_top_eigenvalue_least_squares(method):
    x, y, hessian = _least_squares()
    model = _linear_model()
    before = _weights(model)
    lam = flatness.hessian_top_eigenvalue(
        model, x, y, loss=keras.losses.MeanSquaredError(), num_iterations=30,
        seed=0, method=method,
    )
    expected = np.linalg.eigvalsh(hessian)[-1]
    assert expected == pytest.approx(5.0)
    assert lam == pytest.approx(expected, rel=1e-3)
    _assert_identical(before, _weights(model))


@METHODS
def test_trace_least_squares_within_hutchinson_error(method):
    x, y, hessian = _least_squares()
    model = _linear_model()
    before = _weights(model)
    num_samples = 100
    trace = flatness.hessian_trace(
        model, x, y, loss="mse", num_samples=num_samples, seed=0, method=method
    )
    expected = np.trace(hessian)
    std = _hutchinson_std(hessian, num_samples)
    # 4 standard deviations: a false failure has probability < 1e-4 for a
    # fresh seed (by Chebyshev < 1/16; the average of 100 bounded terms is
    # close to normal); the seed is fixed, so the test is deterministic.
    assert 0 < std < 0.2 * expected
    assert abs(trace - expected) < 4 * std
    _assert_identical(before, _weights(model))


@METHODS
def test_trace_exact_for_diagonal_hessian(method):
    # With X^T X diagonal, v^T H v = tr(H) for every Rademacher probe v.
    x, y, hessian = _least_squares(diagonal=True)
    assert np.allclose(hessian, np.diag(np.diag(hessian)), atol=1e-9)
    model = _linear_model()
    trace = flatness.hessian_trace(
        model, x, y, loss="mse", num_samples=3, seed=5, method=method
    )
    assert trace == pytest.approx(np.trace(hessian), rel=1e-3)


@METHODS
def test_logistic_regression_top_eigenvalue(method):
    rng = np.random.default_rng(3)
    n, d = 64, 5
    x = rng.standard_normal((n, d)).astype("float32")
    x[:, 0] *= 3.0  # a dominant direction
    y = (rng.random((n, 1)) < 0.5).astype("float32")
    model = keras.Sequential(
        [keras.Input((d,)), keras.layers.Dense(1, activation="sigmoid", use_bias=False)]
    )
    w = (0.3 * rng.standard_normal((d, 1))).astype("float32")
    model.layers[0].kernel.assign(w)
    before = _weights(model)
    p = 1.0 / (1.0 + np.exp(-(x.astype("float64") @ w.astype("float64"))))
    hessian = x.T.astype("float64") @ (x * (p * (1 - p))) / n
    eigenvalues = np.linalg.eigvalsh(hessian)
    assert eigenvalues[-2] / eigenvalues[-1] < 0.5
    lam = flatness.hessian_top_eigenvalue(
        model, x, y, loss=keras.losses.BinaryCrossentropy(), num_iterations=40,
        tol=0, seed=1, method=method,
    )
    assert lam == pytest.approx(eigenvalues[-1], rel=1e-3)
    trace = flatness.hessian_trace(
        model, x, y, loss=keras.losses.BinaryCrossentropy(), num_samples=50,
        seed=1, method=method,
    )
    assert abs(trace - np.trace(hessian)) < 4 * _hutchinson_std(hessian, 50)
    _assert_identical(before, _weights(model))


@METHODS
def test_batch_size_does_not_change_the_result(method):
    x, y, hessian = _least_squares()
    model = _linear_model()
    kwargs = dict(loss="mse", num_iterations=5, tol=0, seed=3, method=method)
    full = flatness.hessian_top_eigenvalue(model, x, y, batch_size=N, **kwargs)
    ragged = flatness.hessian_top_eigenvalue(model, x, y, batch_size=7, **kwargs)
    assert ragged == pytest.approx(full, rel=1e-4)
    kwargs = dict(loss="mse", num_samples=3, seed=3, method=method)
    full = flatness.hessian_trace(model, x, y, batch_size=N, **kwargs)
    ragged = flatness.hessian_trace(model, x, y, batch_size=7, **kwargs)
    assert ragged == pytest.approx(full, rel=1e-4)


def test_seed_makes_results_reproducible():
    x, y, _ = _least_squares()
    model = _linear_model()
    a = flatness.hessian_trace(model, x, y, loss="mse", num_samples=4, seed=11)
    b = flatness.hessian_trace(model, x, y, loss="mse", num_samples=4, seed=11)
    c = flatness.hessian_trace(model, x, y, loss="mse", num_samples=4, seed=12)
    assert a == b
    assert a != c


def test_compiled_loss_and_sam_model():
    import keras_ssam

    x, y, hessian = _least_squares()
    expected = np.linalg.eigvalsh(hessian)[-1]
    model = _linear_model()
    model.compile(optimizer="sgd", loss="mse")
    lam = flatness.hessian_top_eigenvalue(model, x, y, num_iterations=30, seed=0)
    assert lam == pytest.approx(expected, rel=1e-3)

    wrapped = keras_ssam.SAMModel(_linear_model())
    wrapped.compile(
        optimizer=keras_ssam.SSAM(keras.optimizers.SGD(0.1), rho=0.1),
        loss=keras.losses.MeanSquaredError(),
    )
    before = _weights(wrapped)
    lam = flatness.hessian_top_eigenvalue(wrapped, x, y, num_iterations=30, seed=0)
    assert lam == pytest.approx(expected, rel=1e-3)
    _assert_identical(before, _weights(wrapped))


@METHODS
def test_regularization_adds_to_the_hessian(method):
    x, y, hessian = _least_squares()
    l2 = 0.25  # l2 * ||W||^2 adds 2 * l2 * I
    model = _linear_model(kernel_regularizer=keras.regularizers.L2(l2))
    kwargs = dict(loss="mse", num_iterations=30, seed=0, method=method)
    plain = flatness.hessian_top_eigenvalue(model, x, y, **kwargs)
    regularized = flatness.hessian_top_eigenvalue(
        model, x, y, include_regularization=True, **kwargs
    )
    expected = np.linalg.eigvalsh(hessian)[-1]
    assert plain == pytest.approx(expected, rel=1e-3)
    assert regularized == pytest.approx(expected + 2 * l2, rel=1e-3)
    trace = flatness.hessian_trace(
        model, x, y, loss="mse", num_samples=100, seed=0,
        include_regularization=True, method=method,
    )
    shift = 2 * l2 * hessian.shape[0]
    assert abs(trace - np.trace(hessian) - shift) < 4 * _hutchinson_std(hessian, 100)


@METHODS
def test_state_untouched_with_batchnorm_and_dropout(method):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 4)).astype("float32")
    y = rng.integers(0, 3, size=50)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    bn = model.layers[1]
    bn.moving_mean.assign(rng.standard_normal(8).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, 8).astype("float32"))
    before = _weights(model)
    kwargs = dict(num_iterations=4, seed=0, batch_size=25, method=method)
    a = flatness.hessian_top_eigenvalue(model, x, y, **kwargs)
    b = flatness.hessian_top_eigenvalue(model, x, y, **kwargs)
    t = flatness.hessian_trace(model, x, y, num_samples=3, seed=0, method=method)
    assert np.isfinite(a) and np.isfinite(t)
    # training=False: no dropout noise, so the estimate is deterministic.
    assert a == pytest.approx(b, rel=1e-5)
    _assert_identical(before, _weights(model))


@METHODS
def test_float64_model(method):
    one = keras.ops.ones((2, 2), dtype="float64")
    if keras.ops.dtype(keras.ops.matmul(one, one)) != "float64":
        # JAX without JAX_ENABLE_X64; Keras 3.15's torch ops.matmul, whose
        # type promotion maps float64 to float32.
        pytest.skip(f"float64 matmul computes in float32 on {keras.backend.backend()}")
    floatx = keras.config.floatx()
    keras.config.set_floatx("float64")  # the Input layer's dtype too
    keras.config.set_dtype_policy("float64")
    try:
        x, y, hessian = _least_squares()
        model = _linear_model()
        assert model.layers[0].kernel.dtype == "float64"
        # The finite-difference step defaults to 1e-6 (relative) for float64.
        lam = flatness.hessian_top_eigenvalue(
            model, x.astype("float64"), y.astype("float64"), loss="mse",
            num_iterations=60, tol=0, seed=0, method=method,
        )
    finally:
        keras.config.set_floatx(floatx)
    assert lam == pytest.approx(np.linalg.eigvalsh(hessian)[-1], rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_iterations=0), "num_iterations=0"),
        (dict(num_iterations=2.5), "num_iterations=2.5"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(tol=-1.0), "tol=-1.0"),
        (dict(seed=-3), "seed=-3"),
        (dict(seed="a"), "seed='a'"),
        (dict(finite_difference_step=0.0), "finite_difference_step=0.0"),
        (dict(finite_difference_step=1e-3), "only applies to method='finite_difference'"),
        (dict(method="exact"), "method='exact'"),
        (dict(loss="no_such_loss"), "loss='no_such_loss'"),
        (dict(loss=3), "loss=3"),
        (dict(loss={"a": "mse"}), "Only a single loss"),
    ],
)
def test_bad_arguments_eigenvalue(kwargs, message):
    x, y, _ = _least_squares()
    model = _linear_model()
    kwargs.setdefault("loss", "mse")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        flatness.hessian_top_eigenvalue(model, x, y, **kwargs)


def test_bad_arguments_trace_and_data():
    x, y, _ = _least_squares()
    model = _linear_model()
    with pytest.raises(ValueError, match="num_samples=0"):
        flatness.hessian_trace(model, x, y, loss="mse", num_samples=0)
    with pytest.raises(ValueError, match="same number of examples"):
        flatness.hessian_trace(model, x, y[:-1], loss="mse")
    with pytest.raises(ValueError, match="y=None"):
        flatness.hessian_trace(model, x, None, loss="mse")
    with pytest.raises(ValueError, match="not compiled with a loss"):
        flatness.hessian_trace(model, x, y)
    with pytest.raises(ValueError, match="keras.Model instance"):
        flatness.hessian_trace("model", x, y, loss="mse")
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="must be built"):
        flatness.hessian_trace(unbuilt, x, y, loss="mse")


def test_model_is_freed_and_saves_after_use(tmp_path):
    import gc
    import weakref

    x, y, _ = _least_squares()
    model = _linear_model()
    flatness.hessian_trace(model, x, y, loss="mse", num_samples=1, seed=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    _assert_identical(_weights(model), _weights(restored))
    ref = weakref.ref(model)
    del model, restored
    gc.collect()
    assert ref() is None


def test_autodiff_and_finite_differences_agree_on_a_smooth_network():
    # No closed form: a tanh MLP with softmax cross-entropy, smooth
    # everywhere, where both ways of computing H v estimate the same
    # Hessian (the finite differences up to O(h^2) and float32 rounding).
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 5)).astype("float32")
    y = rng.integers(0, 3, size=64)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(loss="sparse_categorical_crossentropy")
    kwargs = dict(num_iterations=30, tol=0, seed=0)
    exact = flatness.hessian_top_eigenvalue(model, x, y, **kwargs)
    approx = flatness.hessian_top_eigenvalue(
        model, x, y, method="finite_difference", **kwargs
    )
    assert exact > 0
    assert approx == pytest.approx(exact, rel=1e-2)
    exact = flatness.hessian_trace(model, x, y, num_samples=10, seed=0)
    approx = flatness.hessian_trace(
        model, x, y, num_samples=10, seed=0, method="finite_difference"
    )
    assert approx == pytest.approx(exact, rel=2e-2)

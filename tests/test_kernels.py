"""The step's list kernels (keras_ssam/_kernels.py) against float64 NumPy.

Norms are checked on tensors large enough that a naive float32 sum drifts
(torch's full-tensor vector_norm is off by ~5e-5 on 3 M elements), in-place
writes against aliasing gradients autograd really produces on torch (one
tensor for two weights, a stride-0 expanded tensor), end to end included.
"""

import keras
import numpy as np
import pytest
from conftest import BACKEND
from keras import ops

from keras_ssam import SAM, SSAM, SAMModel, _kernels, sam_math


def _np(t):
    return np.asarray(ops.convert_to_numpy(t), dtype=np.float64)


NORM_SHAPES = [(3072, 1024), (1024,), (3, 3, 16, 32), (), (0, 4), (4, 0), (7, 1)]


def test_global_norm_matches_float64(dtype="float32", rtol=1e-6):
    # float32 only: JAX (without x64) and Keras's torch backend compute
    # float64 in float32.
    rng = np.random.default_rng(0)
    # A non-zero mean makes every square add the same sign: sums drift most.
    values = [(0.003 + 0.01 * rng.standard_normal(s)).astype(dtype) for s in NORM_SHAPES]
    expected = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in values))
    got = sam_math.global_norm([ops.convert_to_tensor(v) for v in values] + [None])
    assert ops.dtype(got) == dtype
    np.testing.assert_allclose(_np(got), expected, rtol=rtol)
    for v in values:
        np.testing.assert_allclose(
            _np(_kernels.sum_of_squares([ops.convert_to_tensor(v)])),
            np.sum(v.astype(np.float64) ** 2),
            rtol=rtol,
            atol=0,
        )


def test_scale_and_add_values_and_ownership():
    rng = np.random.default_rng(1)
    a = [rng.standard_normal(s).astype("float32") for s in [(5, 4), (4,), (2, 3, 3)]]
    b = [rng.standard_normal(s).astype("float32") for s in [(5, 4), (4,), (2, 3, 3)]]
    ta = [ops.convert_to_tensor(v) for v in a] + [None]
    tb = [ops.convert_to_tensor(v) for v in b] + [ops.ones((2,))]

    scaled = _kernels.scale_(list(ta), ops.convert_to_tensor(0.5))
    assert scaled[-1] is None
    for got, v in zip(scaled, a):
        np.testing.assert_array_equal(_np(got), (v * np.float32(0.5)).astype(np.float64))

    summed = _kernels.add_(scaled, tb)
    np.testing.assert_array_equal(_np(summed[-1]), np.ones(2))
    for got, v, w in zip(summed, a, b):
        np.testing.assert_array_equal(_np(got), (v * np.float32(0.5) + w).astype(np.float64))

    if BACKEND == "torch":
        # The whole point on torch: results live in the inputs' memory.
        assert all(s.data_ptr() == t.data_ptr() for s, t in zip(summed[:-1], ta[:-1]))
    else:
        # Functional backends never touch their inputs.
        for t, v in zip(ta[:-1], a):
            np.testing.assert_array_equal(_np(t), v)


def _aliasing_gradients():
    """Gradients as torch's autograd returns them for `(x * (a + b)).sum() +
    c.sum()`: one tensor object for a and b, a stride-0 expansion for c."""
    x = np.arange(12, dtype="float32").reshape(4, 3) / 10.0
    g_ab = ops.convert_to_tensor(x.sum(axis=0))
    g_c = ops.broadcast_to(ops.convert_to_tensor(np.float32(1.0)), (3,))
    return [g_ab, g_ab, g_c], [x.sum(axis=0), x.sum(axis=0), np.ones(3, "float32")]


def test_aliasing_tensors_are_written_once():
    tensors, values = _aliasing_gradients()
    scaled = _kernels.scale_(tensors, ops.convert_to_tensor(2.0))
    for got, v in zip(scaled, values):
        np.testing.assert_array_equal(_np(got), 2.0 * v.astype(np.float64))
    tensors, values = _aliasing_gradients()
    weights = [ops.ones((3,)), 2 * ops.ones((3,)), 3 * ops.ones((3,))]
    summed = _kernels.add_(tensors, weights)
    for got, v, w in zip(summed, values, [1.0, 2.0, 3.0]):
        np.testing.assert_array_equal(_np(got), (v + np.float32(w)).astype(np.float64))


def test_add_scaled_values_and_aliasing():
    """`add_scaled_` (LookSAM's reuse, `g + c g_v`): exact float32 values,
    per-tensor factors, `None` kept, aliasing tensors written once."""
    rng = np.random.default_rng(3)
    values = [rng.standard_normal(s).astype("float32") for s in [(4, 3), (5,)]]
    others = [rng.standard_normal(s).astype("float32") for s in [(4, 3), (5,)]]
    factors = [ops.convert_to_tensor(np.float32(0.5)), ops.convert_to_tensor(np.float32(-2.0))]
    got = _kernels.add_scaled_([ops.convert_to_tensor(v) for v in values] + [None],
                               [ops.convert_to_tensor(o) for o in others] + [None], factors + [None])
    assert got[2] is None
    for g, v, o, f in zip(got, values, others, [0.5, -2.0]):
        np.testing.assert_allclose(_np(g), v.astype(np.float64) + f * o.astype(np.float64), rtol=1e-6, atol=1e-6)
    tensors, values = _aliasing_gradients()
    partners = [ops.ones((3,)), 2 * ops.ones((3,)), 3 * ops.ones((3,))]
    factor = ops.convert_to_tensor(np.float32(0.25))
    summed = _kernels.add_scaled_(tensors, partners, [factor] * 3)
    for g, v, w in zip(summed, values, [1.0, 2.0, 3.0]):
        np.testing.assert_array_equal(_np(g), (v + np.float32(0.25 * w)).astype(np.float64))


class SharedSum(keras.layers.Layer):
    """`y = x * (a + b) + sum(c)`: on torch, a and b get one gradient tensor
    and c an expanded one."""

    def build(self, input_shape):
        init = keras.initializers.Constant
        self.a = self.add_weight(shape=(3,), initializer=init([0.3, -0.2, 0.5]), name="a")
        self.b = self.add_weight(shape=(3,), initializer=init([0.1, 0.4, -0.3]), name="b")
        self.c = self.add_weight(shape=(3,), initializer=init([0.05, -0.1, 0.2]), name="c")

    def call(self, x):
        return x * (self.a + self.b) + ops.sum(self.c)


def _reference_steps(x, t, params, steps, lr, rho, stable):
    """SAM (normalized e) or SSAM (e = rho g, renormalized update) with plain
    SGD on SharedSum and "mse", in float64."""
    a, b, c = [np.asarray(p, np.float64) for p in params]
    n = x.size

    def grads(a, b, c):
        r = 2.0 * (x * (a + b) + c.sum() - t) / n
        g_ab = (x * r).sum(axis=0)
        return [g_ab, g_ab.copy(), np.full(3, r.sum())]

    def norm(gs):
        return np.sqrt(sum(np.sum(g**2) for g in gs))

    for _ in range(steps):
        g = grads(a, b, c)
        scale = rho if stable else rho / (norm(g) + 1e-12)
        g_asc = grads(*[p + scale * gi for p, gi in zip((a, b, c), g)])
        gamma = norm(g) / (norm(g_asc) + 1e-12) if stable else 1.0
        a, b, c = [p - lr * gamma * gi for p, gi in zip((a, b, c), g_asc)]
    return [a, b, c]


@pytest.mark.parametrize("sam_class", [SAM, SSAM])
def test_aliasing_gradients_end_to_end(sam_class):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 3)).astype("float32")
    t = rng.standard_normal((8, 3)).astype("float32")
    inner = keras.Sequential([keras.Input((3,)), SharedSum()])
    params = [v.numpy() if hasattr(v, "numpy") else np.asarray(v) for v in inner.get_weights()]
    model = SAMModel(inner)
    model.compile(optimizer=sam_class(keras.optimizers.SGD(0.1), rho=0.05), loss="mse")
    model.fit(x, t, batch_size=8, epochs=3, shuffle=False, verbose=0)
    expected = _reference_steps(
        x.astype(np.float64), t.astype(np.float64), params, 3, 0.1, 0.05,
        stable=sam_class is SSAM,
    )
    for got, want in zip(inner.get_weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_sum_of_squares_of_strided_tensors():
    """Transposed and sliced views (as autograd may return) sum like copies."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((6, 8, 5)).astype("float32")
    t = ops.convert_to_tensor(base)
    views = [ops.transpose(t, (2, 0, 1)), t[:, ::2, :], ops.transpose(t[0])]
    expected = sum(np.sum(np.asarray(v, np.float64) ** 2) for v in
                   [base.transpose(2, 0, 1), base[:, ::2, :], base[0].T])
    np.testing.assert_allclose(_np(_kernels.sum_of_squares(views)), expected, rtol=1e-6)

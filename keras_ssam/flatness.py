"""Flatness of a minimum: top Hessian eigenvalue and Hessian trace.

Both estimators need only Hessian-vector products `H v` of the loss `L` with
respect to a model's trainable weights `w`; the Hessian is never formed.
`L` is the loss over the whole dataset `(x, y)`, evaluated in batches with
`training=False` (inference-mode BatchNormalization, no dropout) through
`model.stateless_call`: the model's variables are read, never written.

Two ways to compute `H v` (argument `method`):

* `"autodiff"` (default): exact, by differentiating twice: `jax.jvp` of
  `jax.grad` on JAX, the gradient of `<grad L(w), v>` (double
  backpropagation, as PyHessian does) on TensorFlow and torch. Needs every
  op of the model to have a second derivative (all standard Keras layers
  do). For ReLU networks this is the Hessian almost everywhere, which
  ignores the kinks.
* `"finite_difference"`: central differences of gradients,

      H v ~= (grad L(w + h u) - grad L(w - h u)) / (2 h) * ||v||,
      u = v / ||v||,  h = finite_difference_step * max(||w||, 1),

  exact for a quadratic loss up to rounding, error O(h^2) otherwise. Only
  first derivatives are needed, but in float32 the rounding error of the
  gradients is amplified by 1 / h, and a step of size h crosses ReLU and
  max-pooling kinks: prefer "autodiff" unless an op lacks a second
  derivative.

Public functions:
    hessian_top_eigenvalue: power iteration on `H`.
    hessian_trace: Hutchinson's estimator with Rademacher probes.

Both work on the tensorflow, jax and torch backends; each backend's
differentiation mechanics are in `keras_ssam/backend/<backend>_hessian.py`.

References:
    Power iteration: e.g. Golub & Van Loan, "Matrix Computations", sec. 8.2.
    Hutchinson, "A stochastic estimator of the trace of the influence matrix
        for Laplacian smoothing splines", Communications in Statistics -
        Simulation and Computation 18(3), 1989.
    Yao, Gholami, Keutzer & Mahoney, "PyHessian: Neural Networks Through the
        Lens of the Hessian", IEEE BigData 2020 (arXiv 1912.07145): the same
        two estimators applied to neural networks.
"""

from __future__ import annotations

import math
import numbers
import weakref

import keras
import numpy as np
from keras import ops, tree

from keras_ssam._validation import check_int, check_number
from keras_ssam.backend import backend_module

__all__ = ["hessian_top_eigenvalue", "hessian_trace"]


# --------------------------------------------------------------------------
# Argument checks.


def _check_positive(name, value, allow_zero=False, allow_none=False):
    check_number(name, value, minimum=0, allow_equal=allow_zero, allow_none=allow_none)


def _check_seed(seed):
    if seed is None:
        return
    if (
        not isinstance(seed, numbers.Integral)
        or isinstance(seed, bool)
        or seed < 0
    ):
        raise ValueError(
            "Argument `seed` must be None or an integer >= 0. "
            f"Received: seed={seed!r}"
        )


def _check_model(model):
    if not isinstance(model, keras.Model):
        raise ValueError(
            "Argument `model` must be a keras.Model instance. "
            f"Received: model={model!r}"
        )
    if not model.built:
        raise ValueError(
            "Argument `model` must be built (call it on a batch, or call "
            f"`model.build(input_shape)`) first. Received: model={model.name!r} "
            "(not built)"
        )
    if not model.trainable_variables:
        raise ValueError(
            "Argument `model` has no trainable weights, so the loss has no "
            f"Hessian with respect to them. Received: model={model.name!r}"
        )


def _num_examples(name, data):
    flat = [a for a in tree.flatten(data) if a is not None]
    if not flat:
        raise ValueError(f"Argument `{name}` must hold at least one array. Received: {name}={data!r}")
    sizes = set()
    for a in flat:
        shape = getattr(a, "shape", None)
        if shape is None or len(shape) == 0:
            raise ValueError(
                f"Argument `{name}` must hold arrays with a leading batch "
                f"dimension. Received: {name} with an element of shape {shape!r}"
            )
        sizes.add(int(shape[0]))
    if len(sizes) != 1:
        raise ValueError(
            f"Arrays in argument `{name}` disagree on the number of examples: "
            f"{sorted(sizes)}"
        )
    return sizes.pop()


def _resolve_loss(model, loss):
    """A callable `(y_true, y_pred) -> loss` (scalar or per example)."""
    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise ValueError(
                "Argument `loss` is None and the model is not compiled with a "
                "loss: pass `loss=` (a callable `(y_true, y_pred) -> scalar`, "
                "a keras.losses.Loss or a loss name such as 'mse'). "
                f"Received: loss=None, model={model.name!r}"
            )
        source = f"the model's compiled loss {loss!r}"
    else:
        source = f"loss={loss!r}"
    if isinstance(loss, (dict, list, tuple)):
        raise ValueError(
            "Only a single loss is supported (one output); for a model with "
            "several losses pass `loss=` as one callable "
            f"`(y_true, y_pred) -> scalar`. Received: {source}"
        )
    if isinstance(loss, str):
        try:
            loss = keras.losses.get(loss)
        except ValueError:
            raise ValueError(
                f"Argument `loss` names no Keras loss. Received: {source}"
            ) from None
    if not callable(loss):
        raise ValueError(
            "Argument `loss` must be a callable `(y_true, y_pred) -> scalar`, "
            f"a keras.losses.Loss or a loss name. Received: {source}"
        )
    return loss


# --------------------------------------------------------------------------
# Gradient and Hessian-vector product of the batch loss at given weight
# values; the backend's mechanics are in keras_ssam/backend/*_hessian.py.

def _batch_loss(model, loss_fn, include_regularization, trainable, non_trainable, x, y):
    if include_regularization:
        y_pred, _, losses = model.stateless_call(
            trainable, non_trainable, x, training=False, return_losses=True
        )
    else:
        y_pred, _ = model.stateless_call(trainable, non_trainable, x, training=False)
        losses = []
    # Loss functions such as keras.losses.mean_squared_error return one value
    # per example; keras.losses.Loss objects return the batch mean.
    value = ops.mean(_at_least_float32(loss_fn(y, y_pred)))
    for extra in losses:
        value = value + ops.cast(_at_least_float32(extra), ops.dtype(value))
    return value


def _at_least_float32(t):
    t = ops.convert_to_tensor(t)
    if ops.dtype(t) in ("float16", "bfloat16") or not ops.dtype(t).startswith("float"):
        return ops.cast(t, "float32")
    return t


# model -> {(kind, loss_fn, include_regularization): function}. The functions
# hold the model only through a weak reference, so an entry goes away with
# its model.
_FUNCTIONS = weakref.WeakKeyDictionary()
_CACHE_SIZE = 4


def _cached_function(kind, model, loss_fn, include_regularization):
    """The backend module's `gradient_function` (kind "gradient",
    `fn(trainable_values, non_trainable_values, x, y) -> grads`) or
    `hvp_function` (kind "hvp", `fn(..., x, y, v) -> H v`) of the batch loss,
    cached per model, so that repeated calls (an eigenvalue, then a trace)
    reuse the compiled JAX/TensorFlow function. Both give a list with one
    tensor per trainable weight and write nothing to the model."""

    def make():
        module = backend_module("_hessian", "keras_ssam.flatness")
        build = module.gradient_function if kind == "gradient" else module.hvp_function
        return build(_loss_function(model, loss_fn, include_regularization))

    key = (kind, loss_fn, bool(include_regularization))
    try:
        hash(key)
        cache = _FUNCTIONS.setdefault(model, {})
    except TypeError:
        return make()
    fn = cache.get(key)
    if fn is None:
        fn = make()
        if len(cache) >= _CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = fn
    return fn


def _loss_function(model, loss_fn, include_regularization):
    model_ref = weakref.ref(model)

    def loss_at(trainable, non_trainable, x, y):
        return _batch_loss(
            model_ref(), loss_fn, include_regularization, trainable, non_trainable, x, y
        )

    return loss_at


# --------------------------------------------------------------------------
# Lists of tensors as one vector.


def _dot(a, b):
    """`sum_i <a_i, b_i>` as a Python float (accumulated in float32, or
    float64 for float64 tensors)."""
    total = 0.0
    for u, v in zip(a, b):
        dtype = "float64" if ops.dtype(u) == "float64" else "float32"
        total += float(ops.convert_to_numpy(ops.sum(ops.cast(u, dtype) * ops.cast(v, dtype))))
    return total


def _norm(a):
    return math.sqrt(_dot(a, a))


def _axpy(alpha, x, y):
    """`alpha * x + y`, elementwise over the lists."""
    return [ops.add(ops.multiply(ops.cast(alpha, ops.dtype(v)), u), v) for u, v in zip(x, y)]


def _scale(alpha, x):
    return [ops.multiply(ops.cast(alpha, ops.dtype(u)), u) for u in x]


_METHODS = ("autodiff", "finite_difference")


class _HessianVectorProduct:
    """`v -> H v` for the dataset loss at the model's current weights."""

    def __init__(
        self, model, x, y, loss, batch_size, include_regularization, method, step
    ):
        _check_model(model)
        check_int("batch_size", batch_size, 1)
        if method not in _METHODS:
            raise ValueError(
                f"Argument `method` must be one of {_METHODS}. "
                f"Received: method={method!r}"
            )
        _check_positive("finite_difference_step", step, allow_none=True)
        if step is not None and method != "finite_difference":
            raise ValueError(
                "Argument `finite_difference_step` only applies to "
                "method='finite_difference'. Received: "
                f"finite_difference_step={step!r}, method={method!r}"
            )
        n = _num_examples("x", x)
        if y is None:
            raise ValueError("Argument `y` is required (the targets of `x`). Received: y=None")
        n_y = _num_examples("y", y)
        if n != n_y:
            raise ValueError(
                "Arguments `x` and `y` must have the same number of examples. "
                f"Received: x with {n}, y with {n_y}"
            )
        self.method = method
        loss_fn = _resolve_loss(model, loss)
        kind = "hvp" if method == "autodiff" else "gradient"
        self.fn = _cached_function(kind, model, loss_fn, include_regularization)
        # Snapshot of the weights: stop_gradient gives tensors detached from
        # the variables (torch), which the computation only reads.
        self.weights = [
            ops.stop_gradient(ops.convert_to_tensor(v.value))
            for v in model.trainable_variables
        ]
        self.non_trainable = [
            ops.stop_gradient(ops.convert_to_tensor(v.value))
            for v in model.non_trainable_variables
        ]
        if method == "finite_difference":
            if step is None:
                step = 1e-6 if ops.dtype(self.weights[0]) == "float64" else 1e-3
            self.h = step * max(_norm(self.weights), 1.0)
        self.batches = []
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            self.batches.append(
                (
                    tree.map_structure(lambda a: a[start:stop], x),
                    tree.map_structure(lambda a: a[start:stop], y),
                    (stop - start) / n,
                )
            )

    def shapes(self):
        return [tuple(w.shape) for w in self.weights]

    def dtypes(self):
        return [ops.dtype(w) for w in self.weights]

    def _dataset_sum(self, fn, *args):
        """`sum_b fraction_b * fn(weights_or_args, batch_b)`."""
        total = None
        for bx, by, fraction in self.batches:
            part = _scale(fraction, fn(bx, by, *args))
            total = part if total is None else [ops.add(t, p) for t, p in zip(total, part)]
        return total

    def __call__(self, v):
        if self.method == "autodiff":
            return self._dataset_sum(
                lambda bx, by: self.fn(self.weights, self.non_trainable, bx, by, v)
            )
        norm = _norm(v)
        if norm == 0.0:
            return [ops.zeros_like(u) for u in v]
        u = _scale(1.0 / norm, v)

        def gradient_at(weights):
            return self._dataset_sum(
                lambda bx, by: self.fn(weights, self.non_trainable, bx, by)
            )

        plus = gradient_at(_axpy(self.h, u, self.weights))
        minus = gradient_at(_axpy(-self.h, u, self.weights))
        factor = norm / (2.0 * self.h)
        return [
            ops.multiply(ops.subtract(p, m), ops.cast(factor, ops.dtype(p)))
            for p, m in zip(plus, minus)
        ]


def _to_tensors(arrays, dtypes):
    return [ops.convert_to_tensor(a, dtype=d) for a, d in zip(arrays, dtypes)]


def hessian_top_eigenvalue(
    model: keras.Model,
    x,
    y,
    loss=None,
    num_iterations: int = 20,
    tol: float = 1e-4,
    batch_size: int = 256,
    seed: int | None = None,
    include_regularization: bool = False,
    method: str = "autodiff",
    finite_difference_step: float | None = None,
) -> float:
    """Top eigenvalue of the loss Hessian w.r.t. the trainable weights.

    Power iteration on the Hessian `H` of the dataset loss at the model's
    current weights `w`:

        v_0 ~ N(0, I), normalized
        lambda_k = v_k^T H v_k          (Rayleigh quotient)
        v_{k+1}  = H v_k / ||H v_k||

    stopping after `num_iterations` Hessian-vector products, or earlier once
    `|lambda_k - lambda_{k-1}| <= tol * |lambda_k|` (as PyHessian, Yao et
    al. 2020, does). Power iteration finds the eigenvalue of largest
    magnitude; at or near a minimum that is the top (most positive)
    eigenvalue, the usual sharpness measure. Its convergence rate is
    `|lambda_2 / lambda_1|` per iteration.

    Each Hessian-vector product is over the whole dataset, exact by
    automatic differentiation (`method="autodiff"`) or a central finite
    difference of two gradients (`method="finite_difference"`), see the
    module docstring. The model's weights are read, never written.

    Args:
        model: a built `keras.Model` (a `keras_ssam.SAMModel` works too).
        x: inputs, an array or a structure of arrays the model accepts, with
            the examples along the first axis.
        y: targets for `x`.
        loss: a callable `(y_true, y_pred) -> loss` (a scalar, or one value
            per example, which is averaged), a `keras.losses.Loss`, or a loss
            name; `None` uses the loss the model was compiled with. The loss
            over the dataset is the mean of the batch losses weighted by
            batch size, i.e. the mean over examples for mean-reduced losses.
        num_iterations: maximum number of power iterations (Hessian-vector
            products), an integer >= 1.
        tol: relative tolerance for stopping early, >= 0 (0 runs all
            `num_iterations`).
        batch_size: examples per forward-backward pass (memory only: the
            result is for the whole dataset).
        seed: integer seed of the starting vector, or `None` for a random
            one.
        include_regularization: add the model's `losses` (weight and
            activity regularizers, `add_loss`) evaluated at the same weights.
        method: `"autodiff"` (exact Hessian-vector products, default) or
            `"finite_difference"` (central differences of gradients, for
            models with an op that has no second derivative).
        finite_difference_step: relative finite-difference step `> 0`, only
            with `method="finite_difference"`; `None` is 1e-3 for float32
            weights and 1e-6 for float64.

    Returns:
        The eigenvalue estimate, a Python float.

    Example:

    ```python
    lam = keras_ssam.flatness.hessian_top_eigenvalue(
        model, x_train[:1000], y_train[:1000], seed=0)
    ```
    """
    check_int("num_iterations", num_iterations, 1)
    _check_positive("tol", tol, allow_zero=True)
    _check_seed(seed)
    hvp = _HessianVectorProduct(
        model, x, y, loss, batch_size, include_regularization, method,
        finite_difference_step,
    )
    rng = np.random.default_rng(seed)
    v = _to_tensors(
        [rng.standard_normal(s) for s in hvp.shapes()], hvp.dtypes()
    )
    v = _scale(1.0 / _norm(v), v)
    eigenvalue = None
    for _ in range(num_iterations):
        hv = hvp(v)
        new = _dot(v, hv)
        norm = _norm(hv)
        if norm == 0.0:
            return 0.0
        v = _scale(1.0 / norm, hv)
        converged = eigenvalue is not None and abs(new - eigenvalue) <= tol * abs(new)
        eigenvalue = new
        if converged:
            break
    return float(eigenvalue)


def hessian_trace(
    model: keras.Model,
    x,
    y,
    loss=None,
    num_samples: int = 100,
    batch_size: int = 256,
    seed: int | None = None,
    include_regularization: bool = False,
    method: str = "autodiff",
    finite_difference_step: float | None = None,
) -> float:
    """Hessian trace of the loss w.r.t. the trainable weights (Hutchinson).

    Hutchinson's estimator (Hutchinson 1989; used for networks by
    PyHessian, Yao et al. 2020): with Rademacher probes `v` (entries +1 or
    -1 with equal probability), `E[v^T H v] = tr(H)`, so

        tr(H) ~= (1 / m) sum_{i=1..m} v_i^T H v_i,

    `m = num_samples`. The estimate is unbiased with variance
    `2 (||H||_F^2 - sum_j H_jj^2) / m`: it is exact for a diagonal `H` and
    its error shrinks as `1 / sqrt(m)`.

    Hessian-vector products are over the whole dataset, by automatic
    differentiation or finite differences (`method`), as in
    `hessian_top_eigenvalue`. The model's weights are read, never written.

    Args:
        model: a built `keras.Model` (a `keras_ssam.SAMModel` works too).
        x: inputs, an array or a structure of arrays the model accepts.
        y: targets for `x`.
        loss: as in `hessian_top_eigenvalue`; `None` uses the compiled loss.
        num_samples: number of probes `m`, an integer >= 1.
        batch_size: examples per forward-backward pass (memory only).
        seed: integer seed of the probes, or `None` for random ones.
        include_regularization: add the model's `losses` (regularizers).
        method: `"autodiff"` (default) or `"finite_difference"`, as in
            `hessian_top_eigenvalue`.
        finite_difference_step: as in `hessian_top_eigenvalue`.

    Returns:
        The trace estimate, a Python float.

    Example:

    ```python
    tr = keras_ssam.flatness.hessian_trace(
        model, x_train[:1000], y_train[:1000], num_samples=50, seed=0)
    ```
    """
    check_int("num_samples", num_samples, 1)
    _check_seed(seed)
    hvp = _HessianVectorProduct(
        model, x, y, loss, batch_size, include_regularization, method,
        finite_difference_step,
    )
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_samples):
        probe = _to_tensors(
            [2.0 * rng.integers(0, 2, size=s) - 1.0 for s in hvp.shapes()],
            hvp.dtypes(),
        )
        total += _dot(probe, hvp(probe))
    return total / num_samples

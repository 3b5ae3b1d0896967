"""Kernels for the SAM step's memory-bound loops over all the weights.

A SAM step reads every gradient once more per norm and once more per scaling.
On a model whose step is bound by memory traffic (a wide MLP on CPU) those
passes are what separates SSAM from SAM, so each is spelled as the fewest
full-size passes the backend allows: the backend's own kernel where it has
one (`backend/<name>_kernels.py`: torch works in place with multi-tensor
kernels; TensorFlow has a one-pass sum of squares), else the portable
`keras.ops` form below. The formulas stay in `sam_math`; results match the
portable forms to float32 rounding (tests compare both against float64
NumPy).

The functions ending in `_` may overwrite the tensors the caller gives up
(named in each docstring) and return the result; `None` entries stay `None`.
"""

from keras import ops

from keras_ssam.backend import backend_kernels


def _sum_of_squares(tensors):
    """`sum_i sum(t_i**2)` over float tensors of one dtype, in that dtype.

    Row norms first: `sum(square(t))` writes `square(t)` out at full size
    (without XLA), and short rows keep float32 sums accurate.
    """
    tensors = [t for t in tensors if 0 not in t.shape]
    if not tensors:
        return ops.zeros((), "float32")
    rows = [
        ops.reshape(ops.norm(t, axis=-1) if len(t.shape) else ops.abs(t), (-1,))
        for t in tensors
    ]
    return ops.sum(ops.square(ops.concatenate(rows)))


def scale(tensors, factor):
    """`[factor * t for t in tensors]` as new tensors."""
    return [None if t is None else t * ops.cast(factor, ops.dtype(t)) for t in tensors]


def _scale_(tensors, factor):
    """`scale(tensors, factor)`, overwriting `tensors` where it can."""
    return scale(tensors, factor)


def _add_(tensors, others):
    """`[t + o for t, o in zip(tensors, others)]`, overwriting `tensors`
    where it can; where `t` is `None` the result is `o`."""
    return [o if t is None else t + o for t, o in zip(tensors, others)]


def _dot(tensors, others):
    """`sum_i sum(t_i * o_i)` over float tensors of one dtype, in that dtype."""
    return sum(ops.sum(t * o) for t, o in zip(tensors, others))


def _add_scaled(tensors, others, factors):
    """`[t + f * o for t, o, f in zip(tensors, others, factors)]` as new
    tensors, for scalar tensors `factors`."""
    return [
        None if t is None else t + ops.cast(f, ops.dtype(t)) * o
        for t, o, f in zip(tensors, others, factors)
    ]


def _add_scaled_(tensors, others, factors):
    """`add_scaled(tensors, others, factors)`, overwriting `tensors` where
    it can."""
    return _add_scaled(tensors, others, factors)


def select(condition, if_true, if_false):
    """`[ops.where(condition, a, b) for a, b in zip(if_true, if_false)]` for
    a scalar boolean `condition`, as new tensors; `None` in `if_false`
    stays `None`."""
    return [b if b is None else ops.where(condition, a, b) for a, b in zip(if_true, if_false)]


def _select_(condition, if_true, if_false):
    """`select(condition, if_true, if_false)`, overwriting `if_false` where
    it can."""
    return select(condition, if_true, if_false)


_fast = backend_kernels()


def _backend_or(name, portable):
    return getattr(_fast, name, None) or portable


sum_of_squares = _backend_or("sum_of_squares", _sum_of_squares)
scale_ = _backend_or("scale_", _scale_)
add_ = _backend_or("add_", _add_)
dot = _backend_or("dot", _dot)
add_scaled = _backend_or("add_scaled", _add_scaled)
add_scaled_ = _backend_or("add_scaled_", _add_scaled_)
select_ = _backend_or("select_", _select_)

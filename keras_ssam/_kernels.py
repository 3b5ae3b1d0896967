"""Kernels for the SAM step's memory-bound loops over all the weights.

A SAM step reads every gradient once more per norm and once more per scaling.
On a model whose step is bound by memory traffic (a wide MLP on CPU) those
passes are what separates SSAM from SAM, so each is spelled here as the
fewest full-size passes the backend allows. The formulas stay in
`sam_math`; results match the plain `keras.ops` forms to float32 rounding
(tests compare both against float64 NumPy).

- `sum_of_squares`: `sum(square(t))` in `keras.ops` writes `square(t)` out at
  full size first (without XLA). Row norms don't (the reduction runs over
  short rows, which also keeps float32 sums accurate); TensorFlow has the
  one-pass kernel `tf.nn.l2_loss`.
- `scale_`, `add_`, `add_scaled_`, `where_`: torch works in place with multi-tensor kernels
  (`torch._foreach_mul_`, `torch._foreach_add_`, as Keras's own torch
  optimizers do), neither allocating nor page-faulting another copy of the
  weights' size: e is computed in the clean gradient's memory and w + e in
  e's.
"""

import keras
from keras import ops


def sum_of_squares(tensors):
    """`sum_i sum(t_i**2)` over float tensors of one dtype, in that dtype."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return 2.0 * tf.add_n([tf.nn.l2_loss(t) for t in tensors])
    tensors = [t for t in tensors if 0 not in t.shape]
    if not tensors:
        return ops.zeros((), "float32")
    if backend == "torch":
        import torch

        # Straight to torch: keras.ops' per-call overhead is most of the cost.
        # Norms along the last axis never copy, whatever the strides.
        rows = [torch.linalg.vector_norm(t, dim=-1).reshape(-1) if t.dim() else t.abs().reshape(1) for t in tensors]
        return torch.sum(torch.square(torch.cat(rows)))
    rows = [
        ops.reshape(ops.norm(t, axis=-1) if len(t.shape) else ops.abs(t), (-1,))
        for t in tensors
    ]
    return ops.sum(ops.square(ops.concatenate(rows)))


def _torch_groups(tensors, others=None):
    """Tensors safe to overwrite (with their partners), grouped by dtype.

    autograd may hand out gradients that alias: an expanded (stride 0) tensor
    or one storage for two weights. Those are left out; callers compute them
    out of place.
    """
    groups, seen = {}, set()
    for i, t in enumerate(tensors):
        if t is None:
            continue
        storage = t.untyped_storage().data_ptr()
        expanded = any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape))
        if storage in seen or expanded:
            continue
        seen.add(storage)
        group = groups.setdefault(t.dtype, ([], [], []))
        group[0].append(i)
        group[1].append(t)
        if others is not None:
            group[2].append(others[i])
    return groups


def scale(tensors, factor):
    """`[factor * t for t in tensors]` as new tensors; `None` stays `None`."""
    return [None if t is None else t * ops.cast(factor, ops.dtype(t)) for t in tensors]


def scale_(tensors, factor):
    """`[factor * t for t in tensors]`, overwriting `tensors` where it can.

    The caller gives the tensors up: on torch they hold the result where
    that is safe; elsewhere the result is new. `None` stays `None`.
    """
    if keras.backend.backend() != "torch":
        return scale(tensors, factor)
    import torch

    groups = _torch_groups(tensors)
    in_place = {i for indices, _, _ in groups.values() for i in indices}
    # Out of place first: an aliasing tensor must read the value before it
    # is overwritten.
    result = [
        t if t is None or i in in_place else t * ops.cast(factor, t.dtype)
        for i, t in enumerate(tensors)
    ]
    for dtype, (_, group, _) in groups.items():
        torch._foreach_mul_(group, ops.cast(factor, dtype))
    return result


def add_(tensors, others):
    """`[t + o for t, o in zip(tensors, others)]`, overwriting `tensors`
    where it can (as `scale_`); where `t` is `None` the result is `o`."""
    if keras.backend.backend() != "torch":
        return [o if t is None else t + o for t, o in zip(tensors, others)]
    import torch

    groups = _torch_groups(tensors, others)
    in_place = {i for indices, _, _ in groups.values() for i in indices}
    result = [
        o if t is None else t if i in in_place else t + o
        for i, (t, o) in enumerate(zip(tensors, others))
    ]
    for _, group, partners in groups.values():
        torch._foreach_add_(group, partners)
    return result


def dot(tensors, others):
    """`sum_i sum(t_i * o_i)` over float tensors of one dtype, in that dtype
    (torch: `vdot` per pair, without the product's temporary)."""
    if keras.backend.backend() == "torch":
        import torch

        return sum(torch.vdot(t.reshape(-1), o.reshape(-1)) for t, o in zip(tensors, others))
    return sum(ops.sum(t * o) for t, o in zip(tensors, others))


def add_scaled(tensors, others, factors):
    """`[t + f * o for t, o, f in zip(tensors, others, factors)]` as new
    tensors, for scalar tensors `factors` (torch: one `addcmul`, without a
    temporary `f * o`); `None` in `tensors` stays `None`."""
    if keras.backend.backend() == "torch":
        import torch

        return [
            None if t is None else torch.addcmul(t, o, f.to(t.dtype))
            for t, o, f in zip(tensors, others, factors)
        ]
    return [
        None if t is None else t + ops.cast(f, ops.dtype(t)) * o
        for t, o, f in zip(tensors, others, factors)
    ]


def add_scaled_(tensors, others, factors):
    """`[t + f * o for t, o, f in zip(tensors, others, factors)]` with
    scalar tensors `factors`, overwriting `tensors` where it can (as
    `scale_`): on torch one pass per tensor, without a temporary `f * o`.
    `None` in `tensors` stays `None`."""
    if keras.backend.backend() != "torch":
        return [
            None if t is None else t + ops.cast(f, ops.dtype(t)) * o
            for t, o, f in zip(tensors, others, factors)
        ]
    import torch

    groups = _torch_groups(tensors, [(o, f) for o, f in zip(others, factors)])
    in_place = {i for indices, _, _ in groups.values() for i in indices}
    result = [
        t if t is None or i in in_place else t + f.to(t.dtype) * o
        for i, (t, o, f) in enumerate(zip(tensors, others, factors))
    ]
    for dtype, (_, group, partners) in groups.items():
        torch._foreach_addcmul_(group, [o for o, _ in partners], [f.to(dtype) for _, f in partners])
    return result


def where(condition, tensors, others):
    """`[where(condition, o, t) for t, o in zip(tensors, others)]` for a
    scalar boolean `condition`, as new tensors; `None` stays `None`."""
    return [
        t if t is None else ops.where(condition, o, t)
        for t, o in zip(tensors, others)
    ]


def where_(condition, tensors, others):
    """`where(condition, tensors, others)`, overwriting `tensors` where it
    can (as `scale_`)."""
    if keras.backend.backend() != "torch":
        return where(condition, tensors, others)
    import torch

    groups = _torch_groups(tensors, others)
    in_place = {i for indices, _, _ in groups.values() for i in indices}
    result = [
        t if t is None or i in in_place else torch.where(condition, o, t)
        for i, (t, o) in enumerate(zip(tensors, others))
    ]
    for dtype, (_, group, partners) in groups.items():
        # lerp with weight 0 or 1 is exactly t or o (both finite).
        torch._foreach_lerp_(group, partners, condition.to(dtype))
    return result

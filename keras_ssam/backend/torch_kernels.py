"""torch's own kernels for `keras_ssam._kernels`: in place, with
multi-tensor kernels (`torch._foreach_*`, as Keras's own torch optimizers
use), neither allocating nor page-faulting another copy of the weights'
size: e is computed in the clean gradient's memory and w + e in e's.

Straight to torch: `keras.ops`' per-call overhead is most of the cost of
these small calls in an eager step.
"""

import torch
from keras import ops


def sum_of_squares(tensors):
    tensors = [t for t in tensors if 0 not in t.shape]
    if not tensors:
        return ops.zeros((), "float32")
    # Norms along the last axis never copy, whatever the strides.
    rows = [torch.linalg.vector_norm(t, dim=-1).reshape(-1) if t.dim() else t.abs().reshape(1) for t in tensors]
    return torch.sum(torch.square(torch.cat(rows)))


def _groups(tensors, others=None):
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


def _in_place(groups):
    return {i for indices, _, _ in groups.values() for i in indices}


def scale_(tensors, factor):
    groups = _groups(tensors)
    in_place = _in_place(groups)
    # Out of place first: an aliasing tensor must read the value before it
    # is overwritten.
    result = [t if t is None or i in in_place else t * ops.cast(factor, t.dtype) for i, t in enumerate(tensors)]
    for dtype, (_, group, _) in groups.items():
        torch._foreach_mul_(group, ops.cast(factor, dtype))
    return result


def add_(tensors, others):
    groups = _groups(tensors, others)
    in_place = _in_place(groups)
    result = [o if t is None else t if i in in_place else t + o for i, (t, o) in enumerate(zip(tensors, others))]
    for _, group, partners in groups.values():
        torch._foreach_add_(group, partners)
    return result


def dot(tensors, others):
    """`vdot` per pair, without the product's temporary."""
    return sum(torch.vdot(t.reshape(-1), o.reshape(-1)) for t, o in zip(tensors, others))


def add_scaled(tensors, others, factors):
    """One `addcmul` per tensor, without a temporary `f * o`."""
    return [
        None if t is None else torch.addcmul(t, o, f.to(t.dtype))
        for t, o, f in zip(tensors, others, factors)
    ]


def add_scaled_(tensors, others, factors):
    groups = _groups(tensors, list(zip(others, factors)))
    in_place = _in_place(groups)
    result = [
        t if t is None or i in in_place else t + f.to(t.dtype) * o
        for i, (t, o, f) in enumerate(zip(tensors, others, factors))
    ]
    for dtype, (_, group, partners) in groups.items():
        torch._foreach_addcmul_(group, [o for o, _ in partners], [f.to(dtype) for _, f in partners])
    return result


def select_(condition, if_true, if_false):
    groups = _groups(if_false, if_true)
    in_place = _in_place(groups)
    result = [
        b if b is None or i in in_place else torch.where(condition, a, b)
        for i, (a, b) in enumerate(zip(if_true, if_false))
    ]
    for dtype, (_, group, partners) in groups.items():
        # lerp with weight 0 or 1 is exactly b or a (both finite).
        torch._foreach_lerp_(group, partners, condition.to(dtype))
    return result

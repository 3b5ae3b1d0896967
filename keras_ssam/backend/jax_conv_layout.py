"""Convolutions inside `lax.cond` branches in the layout XLA:CPU runs fast.

XLA:CPU calls its Eigen convolution only for convolutions in NHWC / HWIO /
NHWC order. Its pass that rewrites the others into that order, with
transposes around them (`xla/service/cpu/conv_canonicalization.cc`), visits
the entry computation only: inside a conditional branch the convolutions of
a backward pass (input gradient with an `01oi` kernel, weight gradient
`f01b_i01o->01bf`) stay in their order and compile to naive loop nests,
10-30x slower. A SAM step whose perturbed pass runs in a branch
(`sam_probability`, LookSAM) took 17 s instead of 1.9 s on a small ResNet.

`canonical_convolutions(fn)` traces `fn` to a jaxpr and evaluates it again,
each convolution written as transpose -> canonical convolution -> transpose
(the same numbers): the rewrite XLA would have done at the top level. Other
primitives are bound unchanged; the bodies of nested `jit`, `custom_jvp`,
`custom_vjp` and `remat` calls are inlined (the branch is not
differentiated later). Convolutions nested in a further loop or conditional
inside the branch are left as they are.
"""

import jax
from jax import lax

try:
    from jax.extend import core as _core

    _AVAILABLE = all(hasattr(_core, n) for n in ("Literal", "Jaxpr", "ClosedJaxpr", "DropVar"))
except ImportError:  # older JAX: branches run as traced
    _AVAILABLE = False

_CONV = lax.conv_general_dilated_p
# Call-like primitives whose body is inlined, and the parameter holding it.
_INLINED = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat": "jaxpr",
    "checkpoint": "jaxpr",
}


def canonical_convolutions(fn):
    """`fn` (no arguments, a pytree of arrays out) with every convolution it
    runs in canonical order; `fn` itself where this JAX lacks the API."""
    if not _AVAILABLE:
        return fn

    def wrapped():
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)()
        if not any(_has_convolution(e) for e in closed.jaxpr.eqns):
            return fn()
        out = _evaluate(closed.jaxpr, closed.consts, [])
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return wrapped


def _has_convolution(eqn):
    if eqn.primitive is _CONV:
        return True
    body = eqn.params.get(_INLINED.get(eqn.primitive.name, ""))
    jaxpr = getattr(body, "jaxpr", body)
    return isinstance(jaxpr, _core.Jaxpr) and any(_has_convolution(e) for e in jaxpr.eqns)


def _evaluate(jaxpr, consts, args):
    env = {}

    def read(v):
        return v.val if isinstance(v, _core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        body = eqn.params.get(_INLINED.get(eqn.primitive.name, ""))
        if eqn.primitive is _CONV:
            outs = [_canonical_conv(*invals, eqn.params)]
        elif isinstance(body, _core.ClosedJaxpr):
            outs = _evaluate(body.jaxpr, body.consts, invals)
        elif isinstance(body, _core.Jaxpr):
            outs = _evaluate(body, (), invals)
        else:
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, _core.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _canonical_conv(lhs, rhs, params):
    """The convolution as transpose -> (N, spatial, C) x (spatial, I, O) ->
    transpose: the same result."""
    dn = params["dimension_numbers"]
    n = len(dn.lhs_spec)
    spatial = tuple(range(1, n - 1))
    canonical = lax.ConvDimensionNumbers(
        (0, n - 1) + spatial, (n - 1, n - 2) + tuple(range(n - 2)), (0, n - 1) + spatial
    )
    if (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == tuple(canonical):
        return _CONV.bind(lhs, rhs, **params)
    lhs = lax.transpose(lhs, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))
    rhs = lax.transpose(rhs, (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0]))
    out = _CONV.bind(lhs, rhs, **dict(params, dimension_numbers=canonical))
    order = (dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1])
    return lax.transpose(out, tuple(order.index(i) for i in range(n)))

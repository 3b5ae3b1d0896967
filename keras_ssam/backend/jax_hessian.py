"""JAX mechanics of `keras_ssam.flatness`: the gradient and the exact
Hessian-vector product (forward-over-reverse, `jax.jvp` of `jax.grad`) of a
batch loss, both `jax.jit`-compiled.

`loss_at(trainable, non_trainable, x, y) -> scalar` is the batch loss at the
given weight values; the returned functions give one array per trainable
weight and write nothing.
"""

import jax


def gradient_function(loss_at):
    """Returns `fn(trainable, non_trainable, x, y) -> grads`."""
    grad = jax.jit(jax.grad(loss_at))

    def fn(trainable, non_trainable, x, y):
        return list(grad(list(trainable), list(non_trainable), x, y))

    return fn


def hvp_function(loss_at):
    """Returns `fn(trainable, non_trainable, x, y, v) -> H v`."""

    def hvp(trainable, non_trainable, x, y, v):
        def grad(w):
            return jax.grad(loss_at)(w, non_trainable, x, y)

        return jax.jvp(grad, (trainable,), (v,))[1]

    hvp = jax.jit(hvp)

    def fn(trainable, non_trainable, x, y, v):
        return list(hvp(list(trainable), list(non_trainable), x, y, list(v)))

    return fn

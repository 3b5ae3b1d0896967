"""TensorFlow mechanics of `keras_ssam.flatness`: the gradient and the exact
Hessian-vector product (the gradient of `<grad L, v>`, double
backpropagation with nested `tf.GradientTape`s) of a batch loss, both
`tf.function`-compiled.

`loss_at(trainable, non_trainable, x, y) -> scalar` is the batch loss at the
given weight values; the returned functions give one tensor per trainable
weight (zeros where the loss does not depend on it) and write nothing.
"""

import tensorflow as tf


def _dense(tensors, like):
    return [
        tf.zeros_like(w) if t is None else tf.convert_to_tensor(t)
        for w, t in zip(like, tensors)
    ]


def gradient_function(loss_at):
    """Returns `fn(trainable, non_trainable, x, y) -> grads`."""

    @tf.function(reduce_retracing=True)
    def grad(trainable, non_trainable, x, y):
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            value = loss_at(trainable, non_trainable, x, y)
        return _dense(tape.gradient(value, trainable), trainable)

    def fn(trainable, non_trainable, x, y):
        return grad(list(trainable), list(non_trainable), x, y)

    return fn


def hvp_function(loss_at):
    """Returns `fn(trainable, non_trainable, x, y, v) -> H v`."""

    @tf.function(reduce_retracing=True)
    def hvp(trainable, non_trainable, x, y, v):
        with tf.GradientTape() as outer:
            outer.watch(trainable)
            with tf.GradientTape() as inner:
                inner.watch(trainable)
                value = loss_at(trainable, non_trainable, x, y)
            grads = inner.gradient(value, trainable)
            products = [
                tf.reduce_sum(tf.convert_to_tensor(g) * u)
                for g, u in zip(grads, v)
                if g is not None
            ]
            gv = tf.add_n(products) if products else tf.zeros(())
        return _dense(outer.gradient(gv, trainable), trainable)

    def fn(trainable, non_trainable, x, y, v):
        return hvp(list(trainable), list(non_trainable), x, y, list(v))

    return fn

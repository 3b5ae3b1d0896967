"""torch mechanics of `keras_ssam.flatness`: the gradient and the exact
Hessian-vector product (the gradient of `<grad L, v>`, double
backpropagation with `torch.autograd.grad(..., create_graph=True)`) of a
batch loss, run eagerly.

`loss_at(trainable, non_trainable, x, y) -> scalar` is the batch loss at the
given weight values; the returned functions give one detached tensor per
trainable weight (zeros where the loss does not depend on it) and write
nothing.
"""

import torch


def _leaves(trainable):
    return [w.detach().requires_grad_(True) for w in trainable]


def _dense(tensors, like):
    return [
        torch.zeros_like(w) if t is None else t.detach()
        for w, t in zip(like, tensors)
    ]


def gradient_function(loss_at):
    """Returns `fn(trainable, non_trainable, x, y) -> grads`."""

    def fn(trainable, non_trainable, x, y):
        leaves = _leaves(trainable)
        with torch.enable_grad():
            value = loss_at(leaves, list(non_trainable), x, y)
            grads = torch.autograd.grad(value, leaves, allow_unused=True)
        return _dense(grads, leaves)

    return fn


def hvp_function(loss_at):
    """Returns `fn(trainable, non_trainable, x, y, v) -> H v`."""

    def fn(trainable, non_trainable, x, y, v):
        leaves = _leaves(trainable)
        with torch.enable_grad():
            value = loss_at(leaves, list(non_trainable), x, y)
            grads = torch.autograd.grad(
                value, leaves, create_graph=True, allow_unused=True
            )
            products = [
                (g * u).sum()
                for g, u in zip(grads, v)
                if g is not None and g.requires_grad
            ]
            if not products:  # the loss is linear in the weights
                return [torch.zeros_like(w) for w in leaves]
            hv = torch.autograd.grad(sum(products), leaves, allow_unused=True)
        return _dense(hv, leaves)

    return fn

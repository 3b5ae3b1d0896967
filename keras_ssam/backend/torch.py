"""SAM train step for the PyTorch backend: two autograd passes.

Keras's torch `Dropout` without an explicit seed draws from torch's global
generator, not from Keras's seed state, so the perturbed pass replays that
generator from where the clean pass started and then leaves it where the clean
pass left it: both passes see the same dropout mask.
"""

import torch
from keras import tree
from keras.src.trainers.data_adapters import data_adapter_utils


def _rng_state():
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def train_step(model, data):
    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    trainable = model.trainable_variables
    weights = [v.value for v in trainable]
    with torch.no_grad():
        non_trainable_before = [v.value.clone() for v in model.non_trainable_variables]
    metrics_values = [v.value for v in model.metrics_variables]
    rng_before = _rng_state()

    # Clean pass at w, stateful as in Keras's own train_step.
    y_pred = model(x, training=True)
    loss = model._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
    )
    model._loss_tracker.update_state(
        loss, sample_weight=next(i for i in tree.flatten(x) if i is not None).shape[0]
    )
    grads = torch.autograd.grad(
        model.optimizer.scale_loss(loss), weights, allow_unused=True
    )
    rng_after = _rng_state()

    sam = model.sam_optimizer()
    grad_scale = model.loss_scale()
    with torch.no_grad():
        perturbations, grad_norm = sam.perturbation(grads, weights, grad_scale)
        perturbed = [
            w.detach() if e is None else w.detach() + e
            for w, e in zip(weights, perturbations)
        ]
    for p in perturbed:
        p.requires_grad_(True)

    # Perturbed pass at w + e, stateless: nothing it computes is written.
    _set_rng_state(rng_before)
    perturbed_loss, _, _, _ = model.stateless_training_loss(
        perturbed, non_trainable_before, metrics_values, x, y, sample_weight
    )
    perturbed_grads = torch.autograd.grad(
        model.optimizer.scale_loss(perturbed_loss), perturbed, allow_unused=True
    )
    _set_rng_state(rng_after)

    with torch.no_grad():
        update, _ = sam.update_gradients(
            grads, perturbed_grads, perturbed, grad_norm, grad_scale
        )
        with sam.sam_step():
            model.optimizer.apply(update, trainable)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

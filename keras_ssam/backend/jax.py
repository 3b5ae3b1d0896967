"""SAM train step for the JAX backend: both passes stateless, under `jit`."""

import jax
from keras import StatelessScope
from keras.src.trainers.data_adapters import data_adapter_utils


def train_step(model, state, data):
    trainable, non_trainable, optimizer_values, metrics_values = state
    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    optimizer_mapping = list(zip(model.optimizer.variables, optimizer_values))

    def scaled_loss(trainable_values):
        loss, y_pred, new_non_trainable, new_metrics = model.stateless_training_loss(
            trainable_values, non_trainable, metrics_values, x, y, sample_weight
        )
        with StatelessScope(state_mapping=optimizer_mapping):
            scaled = model.optimizer.scale_loss(loss)
        return scaled, (loss, y_pred, new_non_trainable, new_metrics)

    grad_fn = jax.value_and_grad(scaled_loss, has_aux=True)
    # Clean pass at w: its state updates are the step's.
    (_, (loss, y_pred, new_non_trainable, new_metrics)), grads = grad_fn(trainable)

    with StatelessScope(state_mapping=optimizer_mapping):
        sam = model.sam_optimizer()
        grad_scale = model.loss_scale()
        perturbations, grad_norm = sam.perturbation(grads, trainable, grad_scale)
    perturbed = [
        w if e is None else w + e for w, e in zip(trainable, perturbations)
    ]
    # Perturbed pass at w + e from the pre-step state (same dropout noise);
    # its state updates are dropped.
    _, perturbed_grads = grad_fn(perturbed)
    update, _ = sam.update_gradients(
        grads, perturbed_grads, perturbed, grad_norm, grad_scale
    )

    with sam.sam_step():
        trainable, optimizer_values = model.optimizer.stateless_apply(
            optimizer_values, update, trainable
        )
    logs, new_metrics = model._update_metrics_variables(
        new_metrics, loss, x, y, y_pred, sample_weight
    )
    return logs, (trainable, new_non_trainable, optimizer_values, new_metrics)

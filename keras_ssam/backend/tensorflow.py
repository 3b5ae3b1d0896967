"""SAM train step for the TensorFlow backend: two `tf.GradientTape` passes."""

import tensorflow as tf
from keras import tree
from keras.src.losses import loss as loss_module
from keras.src.trainers.data_adapters import data_adapter_utils


def _dense(grads):
    return [
        tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
        for g in grads
    ]


def train_step(model, data):
    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    trainable = model.trainable_variables
    # Snapshot the pre-step state for the perturbed pass; automatic control
    # dependencies order these reads before the clean pass's assignments.
    non_trainable_before = [tf.identity(v.value) for v in model.non_trainable_variables]
    metrics_before = [tf.identity(v.value) for v in model.metrics_variables]

    # Clean pass at w, stateful as in Keras's own train_step.
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        loss = model._compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        model._loss_tracker.update_state(
            loss_module.unscale_loss_for_distribution(loss),
            sample_weight=tf.shape(next(i for i in tree.flatten(x) if i is not None))[0],
        )
        scaled = model.optimizer.scale_loss(loss)
    grads = _dense(tape.gradient(scaled, trainable))

    sam = model.sam_optimizer()
    grad_scale = model.loss_scale()
    weights = [tf.convert_to_tensor(v.value) for v in trainable]
    perturbations, grad_norm = sam.perturbation(grads, weights, grad_scale)
    perturbed = [w if e is None else w + e for w, e in zip(weights, perturbations)]

    # Perturbed pass at w + e, stateless: nothing it computes is written.
    with tf.GradientTape() as tape:
        tape.watch(perturbed)
        perturbed_loss, _, _, _ = model.stateless_training_loss(
            perturbed, non_trainable_before, metrics_before, x, y, sample_weight
        )
        perturbed_scaled = model.optimizer.scale_loss(perturbed_loss)
    perturbed_grads = _dense(tape.gradient(perturbed_scaled, perturbed))
    update, _ = sam.update_gradients(
        grads, perturbed_grads, perturbed, grad_norm, grad_scale
    )

    with sam.sam_step():
        model.optimizer.apply(update, trainable)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

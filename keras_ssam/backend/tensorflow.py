"""SAM train step for the TensorFlow backend: `tf.GradientTape` passes."""

import keras
import tensorflow as tf
from keras import tree

from keras_ssam._keras_private import unscale_loss_for_distribution


def _dense(grads):
    return [
        tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
        for g in grads
    ]


def _replica_all_reduce():
    """`(replica_count, all_reduce)` of the enclosing tf.distribute replica."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return 1, None

    def all_reduce(values):
        present = [v for v in values if v is not None]
        reduced = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present))
        return [None if v is None else next(reduced) for v in values]

    return context.num_replicas_in_sync, all_reduce


def sum_over_replicas(values):
    """`values` summed over the tf.distribute replicas (as they are with
    one): a term each replica holds a share of, to be applied the same on
    every replica's copy of the weights (WSAM's decoupled term)."""
    _, all_reduce = _replica_all_reduce()
    return values if all_reduce is None else all_reduce(values)


# The SAM optimizer's own variables may be assigned inside the step's
# conditional branch (model._sam_update_gradients).
STATEFUL_CONDITIONALS = True


def train_step(model, data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    if not model.built:
        # Keras's TF trainer builds a model by its first batch only when it
        # traces the step; the snapshots below need the variables first.
        # Symbolic, so the built model runs no extra pass.
        model(tree.map_structure(lambda t: keras.KerasTensor(t.shape, t.dtype), x))
    trainable = model.trainable_variables
    # Snapshot the pre-step state for the perturbed pass; automatic control
    # dependencies order these reads before the clean pass's assignments.
    non_trainable_before = [tf.identity(v.value) for v in model.non_trainable_variables]
    metrics_before = [tf.identity(v.value) for v in model.metrics_variables]
    weights = [tf.convert_to_tensor(v.value) for v in trainable]

    # Clean pass at w, stateful as in Keras's own train_step.
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        loss = model._compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        model._loss_tracker.update_state(
            unscale_loss_for_distribution(loss),
            sample_weight=tf.shape(next(i for i in tree.flatten(x) if i is not None))[0],
        )
        scaled = model.optimizer.scale_loss(loss)
    grads = None
    # With batch splits the chunks' gradients replace it, unless some steps
    # skip the perturbed pass and take it.
    if model.num_batch_splits == 1 or not model.sam_optimizer()._always_perturbed():
        grads = _dense(tape.gradient(scaled, trainable))
    del tape

    def stateless_gradient(values, x, y, sample_weight):
        # Nothing computed here is written: the perturbed pass leaves no trace.
        with tf.GradientTape() as tape:
            tape.watch(values)
            loss, _, _, _ = model._stateless_training_loss(
                values, non_trainable_before, metrics_before, x, y, sample_weight
            )
            scaled = model.optimizer.scale_loss(loss)
        unscaled = unscale_loss_for_distribution(loss)
        return unscaled, _dense(tape.gradient(scaled, values))

    # Under tf.distribute this runs per replica, on gradients that are the
    # replica's share of the global one (losses carry 1 / replicas).
    replica_count, all_reduce = _replica_all_reduce()
    if not model.optimizer.built:
        # Keras's TF trainer builds the optimizer in its first `apply`; the
        # step reads the SAM optimizer's own variables (LookSAM) before.
        model.optimizer.build(trainable)
    update, stats = model._sam_update_gradients(
        grads, weights, unscale_loss_for_distribution(loss),
        stateless_gradient, x, y, sample_weight,
        replica_count=replica_count, all_reduce=all_reduce,
    )
    sam = model.sam_optimizer()
    with sam._sam_step():
        model.optimizer.apply(update, trainable)
    if stats:
        model._update_diagnostics(stats)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

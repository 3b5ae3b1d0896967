"""SAM train step for the TensorFlow backend: `tf.GradientTape` passes."""

import keras
import tensorflow as tf
from keras import ops, tree

from keras_ssam import _keras_private, step
from keras_ssam.model import SAMModel, without_diagnostics


def _unscale_loss_for_distribution(value):
    """Keras's `unscale_loss_for_distribution` (keras/src/losses/loss.py,
    Keras 3.12-3.15): the loss times the replicas in sync."""
    num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if num_replicas > 1:
        value = ops.multiply(value, ops.cast(num_replicas, value.dtype))
    return value


unscale_loss_for_distribution = (
    _keras_private.unscale_loss_for_distribution or _unscale_loss_for_distribution
)


def _dense(grads):
    return [
        tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
        for g in grads
    ]


def _replicas():
    """The enclosing tf.distribute replicas (`step.Replicas`)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return step.Replicas()

    def all_reduce(values):
        present = [v for v in values if v is not None]
        reduced = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present))
        return [None if v is None else next(reduced) for v in values]

    return step.Replicas(context.num_replicas_in_sync, all_reduce)


def stateless_normal(shape, seed, iteration):
    """Standard normal float32 draws, a function of `(seed, iteration)` only."""
    key = tf.stack([tf.cast(seed, tf.int64), tf.cast(iteration, tf.int64)])
    return tf.random.stateless_normal(shape, seed=key, dtype=tf.float32)


def cond_with_state(pred, true_fn, false_fn, variables):
    """The step's conditional: the SAM optimizer's own variables are assigned
    inside the branch that changes them (a skipped step copies nothing)."""

    def branch(fn):
        def run():
            outputs, state = fn()
            for variable, value in zip(variables, state or []):
                variable.assign(value)
            return outputs

        return run

    return ops.cond(pred, branch(true_fn), branch(false_fn))


def train_step(model, data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    if not model.built:
        # Keras's TF trainer builds a model by its first batch only when it
        # traces the step; the snapshots below need the variables first.
        # Symbolic, so the built model runs no extra pass.
        model(tree.map_structure(lambda t: keras.KerasTensor(t.shape, t.dtype), x))
    trainable = model.trainable_variables
    if not model.optimizer.built:
        # Keras's TF trainer builds the optimizer in its first `apply`; the
        # step reads the SAM optimizer's own variables (LookSAM) before.
        model.optimizer.build(trainable)
    # Snapshot the pre-step state for the perturbed pass; automatic control
    # dependencies order these reads before the clean pass's assignments.
    non_trainable_before = [tf.identity(v.value) for v in model.non_trainable_variables]
    metrics_before = [tf.identity(v.value) for v in model.metrics_variables]
    weights = [tf.convert_to_tensor(v.value) for v in trainable]
    if step.is_single_pass(model):
        return _single_pass_step(model, x, y, sample_weight, trainable, weights, non_trainable_before, metrics_before)

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
    grads = _dense(tape.gradient(scaled, trainable)) if step.needs_clean_gradients(model) else None
    del tape

    def gradient_at(values, x, y, sample_weight, training=True):
        # Nothing computed here is written: the perturbed pass leaves no trace.
        with tf.GradientTape() as tape:
            tape.watch(values)
            loss, _, _, _ = step.stateless_training_loss(
                model, values, non_trainable_before, metrics_before, x, y, sample_weight, training
            )
            scaled = model.optimizer.scale_loss(loss)
        return unscale_loss_for_distribution(loss), _dense(tape.gradient(scaled, values))

    # Under tf.distribute this runs per replica, on gradients that are the
    # replica's share of the global one (losses carry 1 / replicas).
    replicas = _replicas()
    result = step.sam_step(
        model, grads, weights, unscale_loss_for_distribution(loss), gradient_at,
        (x, y, sample_weight), replicas=replicas,
    )
    if result.decoupled is not None and replicas.all_reduce is not None:
        # Each replica holds a share of the decoupled term; every replica's
        # copy of the weights takes the sum.
        result = result._replace(decoupled=replicas.all_reduce(result.decoupled))
    step.apply_update(model.optimizer, result, trainable)
    if result.stats:
        model.update_diagnostics(result.stats)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _single_pass_step(model, x, y, sample_weight, trainable, weights, non_trainable_before, metrics_before):
    """One stateful pass at w + e (Momentum-SAM, random weight perturbation):
    its loss, metrics and state updates are the step's."""
    point = step.single_pass_point(model, weights, non_trainable_before)
    with tf.GradientTape() as tape:
        tape.watch(point.trainable)
        loss, y_pred, non_trainable, metrics = step.stateless_training_loss(
            model, point.trainable, point.non_trainable, metrics_before, x, y, sample_weight
        )
        scaled = model.optimizer.scale_loss(loss)
    grads = _dense(tape.gradient(scaled, point.trainable))
    non_trainable = step.unperturbed(non_trainable, non_trainable_before, point)
    for variable, value in zip(model.non_trainable_variables + model.metrics_variables, non_trainable + metrics):
        variable.assign(value)
    batch = tf.shape(next(i for i in tree.flatten(x) if i is not None))[0]
    model._loss_tracker.update_state(unscale_loss_for_distribution(loss), sample_weight=batch)
    result = step.single_pass_step(model, grads, loss, point.direction_norm)
    step.apply_update(model.optimizer, result, trainable)
    if result.stats:
        model.update_diagnostics(result.stats)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def test_step(model, data):
    logs = super(SAMModel, model).test_step(data)
    return without_diagnostics(logs) if model.diagnostics else logs

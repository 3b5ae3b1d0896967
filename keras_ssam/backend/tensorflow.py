"""SAM train step for the TensorFlow backend: `tf.GradientTape` passes."""

import tensorflow as tf
from keras import tree
from keras.src.losses import loss as loss_module
from keras.src.trainers.data_adapters import data_adapter_utils


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


def _check_divisible(data, splits):
    """Batch sizes unknown when tracing (a partial last batch) are checked at
    run time, before the split, with an error that names num_batch_splits."""
    batch = tf.shape(next(t for t in tree.flatten(data) if t is not None))[0]
    check = tf.debugging.Assert(
        tf.equal(tf.math.floormod(batch, splits), 0),
        [f"num_batch_splits={splits} does not divide the batch size", batch],
    )
    with tf.control_dependencies([check]):
        return tree.map_structure(
            lambda t: None if t is None else tf.identity(t), data
        )


def train_step(model, data):
    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
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
            loss_module.unscale_loss_for_distribution(loss),
            sample_weight=tf.shape(next(i for i in tree.flatten(x) if i is not None))[0],
        )
        scaled = model.optimizer.scale_loss(loss)
    grads = None
    if model.num_batch_splits == 1:
        grads = _dense(tape.gradient(scaled, trainable))
    del tape

    def stateless_gradient(values, x, y, sample_weight):
        # Nothing computed here is written: the perturbed pass leaves no trace.
        with tf.GradientTape() as tape:
            tape.watch(values)
            loss, _, _, _ = model.stateless_training_loss(
                values, non_trainable_before, metrics_before, x, y, sample_weight
            )
            scaled = model.optimizer.scale_loss(loss)
        unscaled = loss_module.unscale_loss_for_distribution(loss)
        return unscaled, _dense(tape.gradient(scaled, values))

    if model.num_batch_splits > 1:
        x, y, sample_weight = _check_divisible((x, y, sample_weight), model.num_batch_splits)

    # Under tf.distribute this runs per replica, on gradients that are the
    # replica's share of the global one (losses carry 1 / replicas).
    replica_count, all_reduce = _replica_all_reduce()
    update, stats = model.sam_update_gradients(
        grads, weights, loss_module.unscale_loss_for_distribution(loss),
        stateless_gradient, x, y, sample_weight,
        replica_count=replica_count, all_reduce=all_reduce,
    )
    sam = model.sam_optimizer()
    with sam.sam_step():
        model.optimizer.apply(update, trainable)
    if stats:
        model.update_diagnostics(stats)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

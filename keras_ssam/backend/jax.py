"""SAM train step for the JAX backend: every pass stateless, under `jit`."""

import jax
import keras
from keras import StatelessScope

from keras_ssam import step
from keras_ssam.backend.jax_conv_layout import canonical_convolutions
from keras_ssam.model import SAMModel, without_diagnostics


def _batch_shards():
    """Number of data-parallel shards of the batch under keras.distribution."""
    distribution = keras.distribution.distribution()
    name = getattr(distribution, "batch_dim_name", None)
    if name is None:
        return 1
    mesh = distribution.device_mesh
    return mesh.shape[mesh.axis_names.index(name)]


def train_step(model, state, data):
    trainable, non_trainable, optimizer_values, metrics_values = state
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    optimizer_variables = model.optimizer.variables
    optimizer_mapping = list(zip(optimizer_variables, optimizer_values))

    def scaled_loss(values, x, y, sample_weight, training=True, non_trainable_values=None):
        # From the pre-step state: the perturbed pass sees the clean pass's
        # dropout noise and BatchNorm statistics.
        loss, y_pred, new_non_trainable, new_metrics = step.stateless_training_loss(
            model, values, non_trainable if non_trainable_values is None else non_trainable_values,
            metrics_values, x, y, sample_weight, training,
        )
        with StatelessScope(state_mapping=optimizer_mapping):
            scaled = model.optimizer.scale_loss(loss)
        return scaled, (loss, y_pred, new_non_trainable, new_metrics)

    grad_fn = jax.value_and_grad(scaled_loss, has_aux=True)

    def gradient_at(values, x, y, sample_weight, training=True):
        (_, aux), grads = grad_fn(values, x, y, sample_weight, training)
        return aux[0], grads

    if step.is_single_pass(model):
        # One pass at w + e (Momentum-SAM, random weight perturbation): its
        # state updates are the step's.
        with StatelessScope(state_mapping=optimizer_mapping):
            point = step.single_pass_point(model, trainable, non_trainable)
        (_, (loss, y_pred, new_non_trainable, new_metrics)), grads = grad_fn(
            point.trainable, x, y, sample_weight, True, point.non_trainable
        )
        new_non_trainable = step.unperturbed(new_non_trainable, non_trainable, point)
        with StatelessScope(state_mapping=optimizer_mapping):
            result = step.single_pass_step(model, grads, loss, point.direction_norm)
    else:
        # Clean pass at w: its state updates are the step's. With batch splits
        # the chunks' gradients replace its gradient, which jit then prunes.
        (_, (loss, y_pred, new_non_trainable, new_metrics)), grads = grad_fn(
            trainable, x, y, sample_weight
        )
        with StatelessScope(state_mapping=optimizer_mapping):
            result = step.sam_step(
                model, grads, trainable, loss, gradient_at, (x, y, sample_weight),
                batch_shards=_batch_shards(),
            )
    # The SAM optimizer's own variables come last (ForwardingOptimizer).
    own = len(result.state)
    if own:
        optimizer_values = list(optimizer_values[: len(optimizer_values) - own]) + list(result.state)
    trainable, optimizer_values = step.stateless_apply_update(
        model.optimizer, result, optimizer_values, trainable
    )
    if result.stats:
        mapping = list(zip(model.metrics_variables, new_metrics))
        with StatelessScope(state_mapping=mapping) as scope:
            model.update_diagnostics(result.stats)
        new_metrics = [
            scope.get_current_value(v) if scope.get_current_value(v) is not None else old
            for v, old in zip(model.metrics_variables, new_metrics)
        ]
    logs, new_metrics = model._update_metrics_variables(
        new_metrics, loss, x, y, y_pred, sample_weight
    )
    return logs, (trainable, new_non_trainable, optimizer_values, new_metrics)


def test_step(model, state, data):
    logs, state = super(SAMModel, model).test_step(state, data)
    return (without_diagnostics(logs) if model.diagnostics else logs), state


def stateless_normal(shape, seed, iteration):
    """Standard normal float32 draws, a function of `(seed, iteration)` only."""
    import jax.numpy as jnp

    key = jnp.stack([jnp.asarray(seed, jnp.uint32), jnp.asarray(iteration).astype(jnp.uint32)])
    return jax.random.normal(key, shape, dtype=jnp.float32)


def _cond(pred, true_fn, false_fn):
    """`lax.cond`; on CPU each branch's convolutions are put in the layout
    XLA:CPU runs fast, which it does not do itself inside a branch (see
    `jax_conv_layout`)."""
    if jax.default_backend() == "cpu":
        true_fn, false_fn = canonical_convolutions(true_fn), canonical_convolutions(false_fn)
    return jax.lax.cond(pred, true_fn, false_fn)


def cond_with_state(pred, true_fn, false_fn, variables):
    """The step's conditional: the new state flows out of `lax.cond` and is
    assigned (in the step's StatelessScope) after it."""
    return step.portable_cond_with_state(pred, true_fn, false_fn, variables, cond=_cond)


def host_iteration(model, state, *args):
    """The optimizer's `iterations` from the step's state (during `fit` the
    variables hold no value)."""
    variables = model.optimizer.variables
    index = next(i for i, v in enumerate(variables) if v is model.optimizer.iterations)
    return int(state[2][index])

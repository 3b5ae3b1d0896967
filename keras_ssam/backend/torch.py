"""SAM train step for the PyTorch backend: autograd passes.

Keras's torch `Dropout` without an explicit seed draws from torch's global
generator, not from Keras's seed state, so every stateless pass replays that
generator from where the clean pass started, and the step leaves it where the
clean pass left it: all passes see the same dropout mask.
"""

import keras
import torch
from keras import ops, tree

from keras_ssam import step
from keras_ssam.model import SAMModel, without_diagnostics


def _rng_state():
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def _check_single_process():
    # Keras's torch backend has no DistributedDataParallel in `fit`: each
    # process would train its own copy on its own data. Refuse, don't diverge.
    distributed = torch.distributed
    if (
        distributed.is_available()
        and distributed.is_initialized()
        and distributed.get_world_size() > 1
    ):
        raise RuntimeError(
            "keras_ssam.SAMModel on the torch backend runs in one process: "
            "Keras's torch trainer has no DistributedDataParallel support in "
            f"fit, and torch.distributed has world_size={distributed.get_world_size()}. "
            "Use the JAX backend (keras.distribution.DataParallel) or "
            "TensorFlow (tf.distribute.MirroredStrategy) for data parallelism."
        )


_CONSTANTS: dict = {}


def constant(array):
    """One tensor per NumPy constant of the step, made once (an eager step
    would otherwise copy it to the device every time)."""
    entry = _CONSTANTS.get(id(array))
    if entry is None or entry[0] is not array:
        entry = _CONSTANTS[id(array)] = (array, ops.convert_to_tensor(array))
    return entry[1]


def stateless_normal(shape, seed, iteration):
    """Standard normal float32 draws, a function of `(seed, iteration)` only
    (a generator seeded from both: reading the iteration is a host read)."""
    device = ops.zeros(()).device  # Keras's default device
    generator = torch.Generator(device=device)
    generator.manual_seed((int(seed) * 1_000_003 + int(iteration)) & 0xFFFFFFFFFFFF)
    return torch.normal(0.0, 1.0, size=tuple(shape), generator=generator, device=device)


def cond_with_state(pred, true_fn, false_fn, variables):
    """The step's conditional (a Python `if`): the SAM optimizer's own
    variables are assigned in the branch that changes them."""
    outputs, state = true_fn() if pred else false_fn()
    for variable, value in zip(variables, state or []):
        variable.assign(value)
    return outputs


def train_step(model, data):
    _check_single_process()
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    trainable = model.trainable_variables
    weights = [v.value for v in trainable]
    with torch.no_grad():
        non_trainable_before = [v.value.clone() for v in model.non_trainable_variables]
    metrics_values = [v.value for v in model.metrics_variables]
    rng_before = _rng_state()
    if step.is_single_pass(model):
        return _single_pass_step(model, x, y, sample_weight, trainable, weights, non_trainable_before, metrics_values)

    # Clean pass at w, stateful as in Keras's own train_step.
    y_pred = model(x, training=True)
    loss = model._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
    )
    model._loss_tracker.update_state(
        loss, sample_weight=next(i for i in tree.flatten(x) if i is not None).shape[0]
    )
    grads = None
    if step.needs_clean_gradients(model):
        grads = torch.autograd.grad(
            model.optimizer.scale_loss(loss), weights, allow_unused=True
        )
    rng_after = _rng_state()

    def gradient_at(values, x, y, sample_weight, training=True):
        # Nothing computed here is written: the perturbed pass leaves no trace.
        # Called from the no-grad SAM arithmetic: only this pass needs autograd.
        with torch.enable_grad():
            values = [v.detach().requires_grad_(True) for v in values]
            _set_rng_state(rng_before)
            loss, _, _, _ = step.stateless_training_loss(
                model, values, non_trainable_before, metrics_values, x, y, sample_weight, training
            )
            grads = torch.autograd.grad(
                model.optimizer.scale_loss(loss), values, allow_unused=True
            )
        return loss.detach(), grads

    try:
        with torch.no_grad():
            result = step.sam_step(
                model, list(grads) if grads is not None else None, [w.detach() for w in weights],
                loss.detach(), gradient_at, (x, y, sample_weight),
            )
    finally:
        _set_rng_state(rng_after)
    with torch.no_grad():
        step.apply_update(model.optimizer, result, trainable)
        if result.stats:
            model.update_diagnostics(result.stats)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _single_pass_step(model, x, y, sample_weight, trainable, weights, non_trainable_before, metrics_values):
    """One stateful pass at w + e (Momentum-SAM, random weight perturbation):
    its loss, metrics and state updates are the step's (torch's generator
    advances as in a plain pass)."""
    with torch.no_grad():
        point = step.single_pass_point(model, [w.detach() for w in weights], non_trainable_before)
    values = [p.detach().requires_grad_(True) for p in point.trainable]
    loss, y_pred, non_trainable, metrics = step.stateless_training_loss(
        model, values, point.non_trainable, metrics_values, x, y, sample_weight
    )
    grads = torch.autograd.grad(model.optimizer.scale_loss(loss), values, allow_unused=True)
    non_trainable = step.unperturbed(non_trainable, non_trainable_before, point)
    with torch.no_grad():
        for variable, value in zip(model.non_trainable_variables + model.metrics_variables, non_trainable + metrics):
            variable.assign(value)
        model._loss_tracker.update_state(
            loss.detach(), sample_weight=next(i for i in tree.flatten(x) if i is not None).shape[0]
        )
        result = step.single_pass_step(model, list(grads), loss.detach(), point.direction_norm)
        step.apply_update(model.optimizer, result, trainable)
        if result.stats:
            model.update_diagnostics(result.stats)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def test_step(model, data):
    logs = super(SAMModel, model).test_step(data)
    return without_diagnostics(logs) if model.diagnostics else logs


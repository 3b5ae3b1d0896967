"""One SAM step, backend-agnostic: which passes run, and what they give the
base optimizer.

The backend modules (`keras_ssam/backend/<name>.py`) run the clean pass at
`w` the way Keras's own train step does, then call `sam_step` with its
gradients and a `gradient_at(values, x, y, sample_weight) -> (loss, grads)`
that runs a pass at other weight values from the pre-step state and writes
nothing. `sam_step` decides whether this step runs the perturbed pass, and
handles the loss scale, the perturbation scope, `perturb=` masks and batch
chunks; the formulas are the SAM optimizer's (its public variant contract,
see `keras_ssam.SAM`). It returns a `StepUpdate`, which the backend hands to
the base optimizer with `apply_update` / `stateless_apply_update`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import keras
from keras import ops, tree

from keras_ssam import _kernels, sam_math
from keras_ssam.backend import backend_module

DIAGNOSTICS = (
    "grad_norm",
    "perturbed_grad_norm",
    "renorm_factor",
    "sharpness",
    "clean_fallback",
    "sam_step_fraction",
)


class StepUpdate(NamedTuple):
    """What one SAM step hands to the base optimizer.

    Attributes:
        update: the gradient per trainable weight the base optimizer applies
            at `w` (carrying the loss scale, as the clean gradients do).
        stats: the diagnostics of the step (see `SAMModel`), or `{}`.
        state: the new values of the SAM optimizer's own variables (already
            assigned to them; on JAX, in the step's `StatelessScope`).
        decoupled: per weight, a term subtracted after the base update, times
            the learning rate (WSAM's decoupled sharpness term), unscaled; or
            `None`.
    """

    update: list
    stats: dict
    state: list
    decoupled: list | None = None


class Replicas(NamedTuple):
    """A step's data-parallel replicas under tf.distribute: each runs the
    step with gradients that are its `1 / count` share, and `all_reduce`
    sums a list of tensors (`None` kept) over them."""

    count: int = 1
    all_reduce: Callable[[list], list] | None = None


GradientAt = Callable[[list, Any, Any, Any], tuple]


def loss_scale(optimizer: keras.optimizers.Optimizer):
    """The factor the training loss is multiplied by before differentiation
    (mixed-precision loss scale, static `loss_scale_factor`), or `None`."""
    scale = optimizer.scale_loss(1.0)
    if isinstance(scale, (int, float)) and scale == 1.0:
        return None
    return scale


def needs_clean_gradients(model) -> bool:
    """Whether a step of `model` needs the clean gradient of the whole batch:
    not when the batch is split and every step runs the perturbed pass (the
    chunks' gradients replace it)."""
    if not model.ascent_training:
        return False
    return model.num_batch_splits == 1 or not model.sam_optimizer().always_runs_perturbed_pass()


def sam_step(
    model,
    grads: list | None,
    weights: list,
    clean_loss,
    gradient_at: GradientAt,
    data: tuple,
    *,
    replicas: Replicas = Replicas(),
    batch_shards: int = 1,
) -> StepUpdate:
    """The update of one SAM step of `model` (a `keras_ssam.SAMModel`).

    Args:
        model: the `SAMModel`; the step reads its compiled SAM optimizer and
            its `diagnostics`, `num_batch_splits`, `perturbation_scope` and
            `perturb=` selection.
        grads: the clean gradients at `weights` (of the scaled loss); `None`
            when the batch is split and every step runs the perturbed pass
            (the chunks' gradients replace it).
        weights: the trainable weights' values `w`.
        clean_loss: the unscaled batch loss at `w` (for `sharpness`).
        gradient_at: `(values, x, y, sample_weight, training=True) ->
            (unscaled loss, grads of the scaled loss)` at `values`, from the
            pre-step state (same dropout noise, BatchNorm statistics),
            writing nothing.
        data: the batch `(x, y, sample_weight)`.
        replicas: tf.distribute's replicas of this step.
        batch_shards: data-parallel shards of a global batch (JAX
            distribution): the local perturbation scope perturbs each with
            its own gradient.

    Returns:
        A `StepUpdate`.
    """
    sam = model.sam_optimizer()
    step = _Step(model, sam, weights, clean_loss, gradient_at, data, replicas, batch_shards)
    grad_norm = None
    if sam.decision_needs_gradient():
        # Adaptive steps: the decision reads the clean gradient's norm.
        grad_norm = sam_math.weighted_grad_norm(grads, None, grad_scale=step.loss_scale)
    decision = model.forced_step_decision
    if decision is None:
        decision = sam.runs_perturbed_pass(sam.iterations, grad_norm)
    variables = sam.state_variables()

    def perturbed():
        update, stats, state, decoupled = step.perturbed(grads)
        return (update, stats, decoupled), state

    def skipped():
        update, decoupled = sam.split_update(grads, sam.skipped_update(grads))
        stats = {}
        if model.diagnostics:
            stats = {k: ops.zeros((), "float32") for k in DIAGNOSTICS if k != "sam_step_fraction"}
        return (update, stats, decoupled), None

    if decision is not True and decision is not False and replicas.count > 1:
        # The perturbed branch all-reduces, and tf.distribute cannot
        # synchronize replicas inside a conditional.
        raise NotImplementedError(
            f"{type(sam).__name__} skips the perturbed pass on some steps "
            "(sam_probability, LookSAM), which tf.distribute cannot run "
            f"with several replicas (here {replicas.count}) yet. Use "
            "sam_probability=1.0 (and SAM, USAM or SSAM) there, or the JAX "
            "backend's keras.distribution.DataParallel."
        )
    update, stats, decoupled = _run_with_state(decision, perturbed, skipped, variables, grads)
    if model.diagnostics:
        stats["sam_step_fraction"] = ops.cast(decision, "float32")
    state = [ops.convert_to_tensor(v.value) for v in sam.own_variables()]
    return StepUpdate(update, stats, state, decoupled)


def is_single_pass(model) -> bool:
    """Whether `model`'s SAM optimizer takes its only gradient at a point
    known before the step (Momentum-SAM, random weight perturbation): the
    backend then runs one stateful pass at `single_pass_point`."""
    return model.sam_optimizer().single_pass


def check_supported(model) -> None:
    """Raises for a combination of `model`'s options and its SAM optimizer
    that the step cannot run, before the step runs (on JAX `fit` moves the
    weights into the step's state first)."""
    sam = model.sam_optimizer()
    sam.check_model(model)
    if sam.single_pass:
        if model.num_batch_splits > 1:
            raise NotImplementedError(
                f"{type(sam).__name__} takes its perturbation from its state, not from "
                "the batch, so num_batch_splits (m-sharpness) has no meaning for it. "
                f"Received: num_batch_splits={model.num_batch_splits}."
            )
        if sam.decision_needs_gradient():
            raise NotImplementedError(
                f"{type(sam).__name__} takes its only gradient at the perturbed point, so a "
                "step decision that reads the clean gradient (sam_probability="
                f"{type(sam.sam_probability).__name__}) cannot be made before it."
            )
    # (Replicas and shards are known in the step: it checks them there.)
    if sam.state_variables() and model.num_batch_splits > 1 and not sam.state_averages_over_chunks:
        raise NotImplementedError(
            f"{type(sam).__name__} keeps a direction between steps and "
            "supports neither num_batch_splits > 1, the local perturbation "
            "scope over several shards, nor tf.distribute with several "
            f"replicas yet. Received: num_batch_splits={model.num_batch_splits}, "
            f"perturbation_scope={model.perturbation_scope!r}."
        )


class SinglePassPoint(NamedTuple):
    """Where a single-pass variant's step takes its one pass.

    Attributes:
        trainable: `w + e`, per trainable weight.
        non_trainable: the non-trainable values of the pass (perturbed where
            the variant perturbs them: Flat-LoRA's frozen kernels).
        direction_norm: the diagnostics' `grad_norm`.
        perturbed_non_trainable: a bool per non-trainable weight: its value
            after the pass must be set back to the pre-step one.
    """

    trainable: list
    non_trainable: list
    direction_norm: Any
    perturbed_non_trainable: list


def single_pass_point(model, weights: list, non_trainable_weights: list) -> SinglePassPoint:
    """The point of a single-pass variant's one pass: `w + e`, with `e` from
    `perturbation_before_gradient` (zero on a step the schedule skips: no
    conditional is needed, the pass runs anyway), and the non-trainable
    values, perturbed where `non_trainable_perturbation` says so."""
    sam = model.sam_optimizer()
    check_supported(model)
    perturbations, direction_norm = sam.perturbation_before_gradient(weights, mask=model._perturbed_mask())
    offsets = sam.non_trainable_perturbation(model, weights, non_trainable_weights)
    decision = model.forced_step_decision
    if decision is None:
        decision = sam.runs_perturbed_pass(sam.iterations)
    perturbed = [o is not None for o in offsets] if offsets else [False] * len(non_trainable_weights)
    if decision is False:
        return SinglePassPoint(list(weights), list(non_trainable_weights), direction_norm, [False] * len(perturbed))
    if decision is not True:
        perturbations = _kernels.scale_(perturbations, ops.cast(decision, "float32"))
        offsets = offsets and _kernels.scale(offsets, ops.cast(decision, "float32"))
    non_trainable = list(non_trainable_weights)
    if offsets:
        non_trainable = [v if o is None else v + ops.cast(o, ops.dtype(v)) for v, o in zip(non_trainable, offsets)]
    return SinglePassPoint(_kernels.add_(perturbations, weights), non_trainable, direction_norm, perturbed)


def unperturbed(new_non_trainable: list, non_trainable_before: list, point: SinglePassPoint) -> list:
    """The non-trainable values after a single pass, with the weights the
    pass perturbed set back to their pre-step values (a frozen LoRA kernel
    must not keep the noise)."""
    return [
        before if perturbed else new
        for new, before, perturbed in zip(new_non_trainable, non_trainable_before, point.perturbed_non_trainable)
    ]


def single_pass_step(model, grads: list, loss, direction_norm) -> StepUpdate:
    """The update of a single-pass variant's step from the gradient `grads`
    of its one pass at `single_pass_point` (the base optimizer applies it at
    `w`), its new state and the diagnostics."""
    sam = model.sam_optimizer()
    grad_scale = loss_scale(model.optimizer)
    variables = sam.state_variables()
    state = sam.next_state(None, grads, None, grad_scale)
    if state and isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
        # A mixed-precision overflow (LossScaleOptimizer skips the update)
        # must not leave a non-finite value in the state either.
        finite = _all_finite(grads)
        state = [ops.where(finite, value, variable.value) for variable, value in zip(variables, state)]
    for variable, value in zip(variables, state or ()):
        variable.assign(value)
    stats = {}
    if model.diagnostics:
        grad_norm = sam_math.weighted_grad_norm(grads, None, grad_scale=grad_scale)
        decision = model.forced_step_decision
        if decision is None:
            decision = sam.runs_perturbed_pass(sam.iterations)
        stats = {
            "grad_norm": ops.cast(direction_norm, "float32"),
            "perturbed_grad_norm": grad_norm,
            "renorm_factor": ops.ones((), "float32"),
            # No clean loss is computed: not measured.
            "sharpness": ops.cast(float("nan"), "float32"),
            "clean_fallback": ops.zeros((), "float32"),
            "sam_step_fraction": ops.cast(decision, "float32"),
        }
    update, decoupled = sam.split_update(grads, list(grads))
    return StepUpdate(update, stats, [ops.convert_to_tensor(v.value) for v in sam.own_variables()], decoupled)


def _all_finite(tensors):
    present = [t for t in tensors if t is not None]
    return ops.all(ops.stack([ops.all(ops.isfinite(t)) for t in present]))


class _Step:
    """The perturbed pass of one step, over batch chunks and replicas."""

    def __init__(self, model, sam, weights, clean_loss, gradient_at, data, replicas, batch_shards):
        self.sam = sam
        self.weights = weights
        self.clean_loss = clean_loss
        self.gradient_at = gradient_at
        self.data = data
        self.diagnostics = model.diagnostics
        self.ascent_training = model.ascent_training
        self.sum_chunks = model.batch_split_reduction == "sum"
        self.mask = model._perturbed_mask()
        self.loss_scale = self.grad_scale = loss_scale(model.optimizer)
        local = model.perturbation_scope == "local"
        self.reduce = None
        if replicas.count > 1:
            if local:
                # Each replica's gradient is its local mean gradient / replicas.
                scale = 1.0 if self.grad_scale is None else self.grad_scale
                self.grad_scale = scale / replicas.count
            else:
                self.reduce = replicas.all_reduce
        self.shards = batch_shards if local else 1
        self.splits = model.num_batch_splits * self.shards
        chunked = self.splits > 1 and not sam.state_averages_over_chunks
        if sam.state_variables() and (chunked or replicas.count > 1):
            raise NotImplementedError(
                f"{type(sam).__name__} keeps a direction between steps and "
                "supports neither num_batch_splits > 1, the local perturbation "
                "scope over several shards, nor tf.distribute with several "
                f"replicas yet. Received: num_batch_splits={model.num_batch_splits}, "
                f"perturbation_scope={model.perturbation_scope!r}, replicas={replicas.count}."
            )

    def perturbed(self, grads):
        """`(update, stats, state, decoupled)` of the step with the perturbed
        pass; over chunks, their values weighted by chunk size."""
        if self.splits == 1:
            clean_loss = self.clean_loss
            if not self.ascent_training:
                clean_loss, grads = self.gradient_at(self.weights, *self.data, training=False)
            return self.one_chunk(grads, clean_loss, self.data)
        total = None
        for chunk, weight in split_batch(self.data, self.splits):
            if self.sum_chunks:
                # tf.keras's SAM sums the splits of a batch; data-parallel
                # shards of the global batch are still averaged.
                weight = 1.0 / self.shards
            chunk_loss, chunk_grads = self.gradient_at(self.weights, *chunk, training=self.ascent_training)
            result = tree.map_structure(
                lambda v: None if v is None else _weighted(v, weight),
                self.one_chunk(chunk_grads, chunk_loss, chunk),
            )
            total = result if total is None else tree.map_structure(_add, total, result)
        return total

    def one_chunk(self, grads, clean_loss, data):
        sam = self.sam
        # With `reduce` (global scope over replicas) e and gamma come from the
        # all-reduced gradients, while the update stays this replica's share:
        # the optimizer all-reduces it, once. The clean gradient stays alive
        # for the fallback on a step whose perturbed gradient vanishes.
        global_grads = grads if self.reduce is None else self.reduce(grads)
        perturbations, grad_norm = sam.perturbation(
            global_grads, self.weights, self.grad_scale, mask=self.mask
        )
        # On torch w + e overwrites e.
        perturbed_weights = _kernels.add_(perturbations, self.weights)
        del perturbations
        perturbed_loss, perturbed_grads = self.gradient_at(perturbed_weights, *data)
        state = sam.next_state(grads, perturbed_grads, grad_norm, self.grad_scale)
        if not sam.adaptive:
            perturbed_weights = None  # only T(w + e) reads it: free it before the update
        global_perturbed_grads = None if self.reduce is None else self.reduce(perturbed_grads)
        # The step owns the perturbed gradients: torch computes SSAM's
        # rescaled update (and the fallback) in their memory.
        update, stats = sam.update_gradients(
            grads, perturbed_grads, perturbed_weights, grad_norm, self.grad_scale,
            need_stats=self.diagnostics, overwrite_grads=True,
            global_grads=None if self.reduce is None else global_grads,
            global_perturbed_grads=global_perturbed_grads,
        )
        update, decoupled = sam.split_update(grads, update)
        if decoupled is not None and self.loss_scale is not None:
            # Applied after the base optimizer, which unscales `update` itself.
            decoupled = _kernels.scale(decoupled, 1.0 / ops.cast(self.loss_scale, "float32"))
        if self.diagnostics:
            stats["grad_norm"] = grad_norm
            stats["sharpness"] = ops.cast(perturbed_loss, "float32") - ops.cast(clean_loss, "float32")
            stats = {k: ops.cast(v, "float32") for k, v in stats.items()}
        return update, stats, state, decoupled


def _run_with_state(decision, perturbed, skipped, variables, grads):
    """Runs `perturbed()` or `skipped()` by `decision` (a Python bool, or a
    scalar boolean tensor for a compiled conditional) and leaves `variables`
    holding the chosen branch's new state. Each branch returns `(outputs,
    new_state)`, with `new_state` `None` for unchanged. The outputs'
    `None` entries (gradients of weights the loss does not reach) are where
    `grads` has them: conditionals carry tensors only."""
    if decision is True or decision is False:
        outputs, state = (perturbed if decision else skipped)()
        for variable, value in zip(variables, state or []):
            variable.assign(value)
        return outputs
    missing = [g is None for g in grads]

    def dense(fn):
        def branch():
            (update, stats, decoupled), state = fn()
            return (_present(update), stats, None if decoupled is None else _present(decoupled)), state

        return branch

    # A backend's conditional: assigned in the branch (TensorFlow, torch) or
    # returned from it and assigned after (JAX).
    cond_with_state = getattr(backend_module("", "keras_ssam"), "cond_with_state", portable_cond_with_state)
    update, stats, decoupled = cond_with_state(decision, dense(perturbed), dense(skipped), variables)
    return (
        _with_missing(update, missing),
        dict(stats),
        None if decoupled is None else _with_missing(decoupled, missing),
    )


def portable_cond_with_state(pred, true_fn, false_fn, variables, cond=ops.cond):
    """`ops.cond` over branches returning `(outputs, new_state)`: the state
    flows out of the conditional (an unchanged state as the current values)
    and is assigned once after it. Returns the outputs."""

    def branch(fn):
        def run():
            outputs, state = fn()
            if state is None:
                state = [ops.convert_to_tensor(v.value) for v in variables]
            return outputs, list(state)

        return run

    outputs, state = cond(pred, branch(true_fn), branch(false_fn))
    for variable, value in zip(variables, state):
        variable.assign(value)
    return outputs


def _present(tensors):
    return [t for t in tensors if t is not None]


def _with_missing(tensors, missing):
    tensors = iter(tensors)
    return [None if m else next(tensors) for m in missing]


def _add(a, b):
    return None if a is None else a + b


def _weighted(value, weight):
    """`weight * value`; an empty chunk (weight 0, value maybe NaN) gives 0."""
    product = value * ops.cast(weight, ops.dtype(value))
    if isinstance(weight, float):
        return product
    return ops.where(ops.greater(weight, 0), product, ops.zeros_like(product))


def split_batch(data: tuple, splits: int) -> list:
    """Splits every tensor of `(x, y, sample_weight)` along the batch axis
    into `splits` chunks whose sizes differ by at most one.

    Returns a list of `((x, y, sample_weight), size / batch_size)`. Where the
    batch size is known when tracing (JAX, torch, full batches on
    TensorFlow) sizes are Python ints and empty chunks are left out; a
    batch of unknown size (a partial last batch on TensorFlow) is split at
    run time, and a chunk that turns out empty has weight 0.
    """
    first = next(t for t in tree.flatten(data) if t is not None)
    batch = first.shape[0]
    static = batch is not None
    if not static:
        batch = ops.shape(first)[0]
    base, remainder = batch // splits, batch % splits
    chunks = []
    for i in range(splits):
        if static:
            start, size = i * base + min(i, remainder), base + (i < remainder)
            if not size:
                continue
            weight = size / batch
        else:
            start = i * base + ops.minimum(i, remainder)
            size = base + ops.cast(ops.less(i, remainder), ops.dtype(base))
            weight = ops.cast(size, "float32") / ops.cast(batch, "float32")
        chunk = tree.map_structure(
            lambda t, start=start, size=size: None if t is None else t[start : start + size],
            data,
        )
        chunks.append((chunk, weight))
    return chunks


def stateless_training_loss(
    model, trainable_values, non_trainable_values, metrics_values, x, y, sample_weight, training=True
):
    """`model`'s unscaled training loss at the given values; writes nothing.

    Includes the compiled losses (with `loss_weights` and `sample_weight`)
    and `model.losses` (weight and activity regularizers, evaluated at
    `trainable_values`).

    Returns:
        `(loss, y_pred, new_non_trainable_values, new_metrics_values)`.
    """
    y_pred, non_trainable_values, losses = model.stateless_call(
        trainable_values,
        non_trainable_values,
        x,
        training=training,
        return_losses=True,
    )
    if losses:
        # `compute_loss` reads forward-pass losses from `model.losses`.
        model._losses_override.clear()
        model._losses_override = losses
    try:
        loss, (_, _, metrics_values) = model.stateless_compute_loss(
            trainable_values,
            non_trainable_values,
            metrics_values,
            x=x,
            y=y,
            y_pred=y_pred,
            sample_weight=sample_weight,
            training=training,
        )
    finally:
        if losses:
            model._losses_override.clear()
    return loss, y_pred, non_trainable_values, metrics_values


def apply_update(optimizer: keras.optimizers.Optimizer, result: StepUpdate, trainable_variables: list) -> None:
    """Applies a step's update with the compiled `optimizer` (the SAM
    optimizer, or the LossScaleOptimizer around it), statefully."""
    sam = _sam_of(optimizer)
    with sam.applying(result.decoupled):
        optimizer.apply(result.update, trainable_variables)


def stateless_apply_update(
    optimizer: keras.optimizers.Optimizer, result: StepUpdate, optimizer_values: list, trainable_values: list
) -> tuple:
    """`apply_update` for a stateless (JAX) step: returns
    `(new_trainable_values, new_optimizer_values)`."""
    sam = _sam_of(optimizer)
    with sam.applying(result.decoupled):
        return optimizer.stateless_apply(optimizer_values, result.update, trainable_values)


def _sam_of(optimizer):
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.inner_optimizer
    return optimizer

"""`SAMModel`: a `keras.Model` whose `train_step` runs SAM's two passes."""

import copy

import keras
from keras import ops
from keras import tree

from keras_ssam import _kernels
from keras_ssam._validation import check_int
from keras_ssam.backend import backend_module
from keras_ssam.optimizers import find_sam_optimizer
from keras_ssam.perturb import perturbed_mask

PERTURBATION_SCOPES = ("global", "local")
DIAGNOSTICS = (
    "grad_norm",
    "perturbed_grad_norm",
    "renorm_factor",
    "sharpness",
    "clean_fallback",
    "sam_step_fraction",
)

@keras.saving.register_keras_serializable(package="keras_ssam")
class SAMModel(keras.Model):
    """Wraps a Keras model so that `fit` trains it sharpness-aware.

    Compile with a `keras_ssam.SAM` optimizer (or `USAM`, `SSAM`). Each
    training step computes the gradient `g` at the weights `w` (the clean
    pass, which also updates BatchNorm statistics, the RNG seed state, the
    loss and the metrics), then the gradient at `w + e` on the same batch with
    the same dropout noise and the pre-step non-trainable state (the perturbed
    pass, which changes no state), and hands the SAM gradient to the base
    optimizer to update `w`. The weights are never written with `w + e`.

    `call`, `predict`, `evaluate`, `summary` and the weights are the wrapped
    model's.

    Args:
        model: a built or unbuilt `keras.Model` (Sequential, functional or
            subclassed).
        diagnostics: add to the training logs (epoch means, like `loss`):
            `grad_norm` (`||T g||`), `perturbed_grad_norm` (`||T g_asc||` as
            used in gamma), `renorm_factor` (SSAM's gamma; 1.0 when not
            stable), `sharpness` (batch loss at `w + e` minus batch loss at
            `w`) and `clean_fallback` (the fraction of steps whose perturbed
            gradient vanished and that took the clean gradient instead). Off
            by default, and then no diagnostic is logged.
        num_batch_splits: m-sharpness (Foret et al. 2021, sec. 4.1): split each
            batch into this many chunks, each with its own `g`, `e`, `g_asc`
            (and gamma); the update gradient is the chunks' update gradients
            averaged with weights proportional to their sizes. The logged
            loss, the metrics and the state updates still come from the clean
            pass over the whole batch. A batch that this number does not
            divide (a partial last batch) is split into chunks whose sizes
            differ by at most one; a batch smaller than it into one-example
            chunks.
        perturbation_scope: with data parallelism (JAX `keras.distribution`,
            `tf.distribute`), `"global"` (default) takes `g`, `e` and gamma
            from the all-reduced gradient, identical on every replica, so a
            distributed run equals the single-device run of the global batch;
            `"local"` perturbs each replica with its own gradient (the
            m-sharpness of the SAM paper and Google's reference code, with m
            the per-replica batch), and the update is the mean of the
            replicas' update gradients. Without data parallelism both are
            the same.
        name: name of the wrapper; defaults to `"sam_" + model.name`.

    Example:

    ```python
    model = keras_ssam.SAMModel(inner_model)
    model.compile(
        optimizer=keras_ssam.SSAM(keras.optimizers.SGD(0.05, momentum=0.9),
                                  rho=0.05),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x, y, epochs=10)
    ```
    """

    def __init__(
        self,
        model,
        diagnostics=False,
        num_batch_splits=1,
        perturbation_scope="global",
        name=None,
        **kwargs,
    ):
        if not isinstance(model, keras.Model):
            raise ValueError(
                "Argument `model` must be a keras.Model instance "
                f"(Sequential, functional or subclassed). Received: model={model!r}"
            )
        if isinstance(model, SAMModel):
            raise ValueError(
                "Argument `model` is already a SAMModel; wrap the inner model "
                f"once. Received: model={model!r}"
            )
        if not isinstance(diagnostics, bool):
            raise ValueError(
                f"Argument `diagnostics` must be a bool. Received: diagnostics={diagnostics!r}"
            )
        check_int("num_batch_splits", num_batch_splits, 1)
        if perturbation_scope not in PERTURBATION_SCOPES:
            raise ValueError(
                f"Argument `perturbation_scope` must be one of {PERTURBATION_SCOPES}. "
                f"Received: perturbation_scope={perturbation_scope!r}"
            )
        kwargs.setdefault("dtype", model.dtype_policy)
        super().__init__(name=name or f"sam_{model.name}", **kwargs)
        self.model = model
        self.diagnostics = diagnostics
        self.num_batch_splits = int(num_batch_splits)
        self.perturbation_scope = perturbation_scope
        self._diagnostic_metrics = (
            [keras.metrics.Mean(name=n) for n in DIAGNOSTICS] if diagnostics else []
        )
        if hasattr(model, "output_names"):
            self.output_names = model.output_names
        if model.built:
            self.built = True

    def build(self, input_shape):
        if not self.model.built:
            # As Keras builds a model by its first batch: a symbolic call runs
            # the model's own `build`, or traces a subclassed model's `call`
            # when it has none.
            self.model(tree.map_shape_structure(keras.KerasTensor, input_shape))
        self.built = True

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def summary(self, *args, **kwargs):
        return self.model.summary(*args, **kwargs)

    # `compile` stores the optimizer here; a SAM optimizer is required because
    # only it knows the perturbation. Overriding `compile` itself would stop
    # `load_model` from recompiling.
    @property
    def optimizer(self):
        try:
            return self._compiled_optimizer
        except AttributeError:
            raise AttributeError("SAMModel has no optimizer until compiled") from None

    @optimizer.setter
    def optimizer(self, optimizer):
        if optimizer is not None and find_sam_optimizer(optimizer) is None:
            raise ValueError(
                "SAMModel must be compiled with a keras_ssam optimizer "
                "(keras_ssam.SAM, USAM or SSAM wrapping a Keras optimizer), "
                "e.g. optimizer=keras_ssam.SAM(keras.optimizers.SGD(0.1)). "
                f"Received: optimizer={optimizer!r}"
            )
        if optimizer is not None:
            find_sam_optimizer(optimizer)._attached_to_sam_model = True
        self._compiled_optimizer = optimizer

    def sam_optimizer(self):
        """The compiled SAM optimizer (inside any LossScaleOptimizer)."""
        return find_sam_optimizer(self.optimizer)

    def _loss_scale(self):
        """Factor the training loss is multiplied by before differentiation
        (mixed-precision loss scale, static `loss_scale_factor`), or `None`."""
        scale = self.optimizer.scale_loss(1.0)
        if isinstance(scale, (int, float)) and scale == 1.0:
            return None
        return scale

    def make_train_function(self, force=False):
        # Resolve `perturb` before the first step: a bad selection raises
        # here, while the variables are intact (on JAX `fit` moves them into
        # the step's state first).
        if self.built and find_sam_optimizer(getattr(self, "_compiled_optimizer", None)) is not None:
            self._perturbed_mask()
        return super().make_train_function(force=force)

    def train_step(self, *args):
        return backend_module("", "keras_ssam").train_step(self, *args)

    def test_step(self, *args):
        # Diagnostics describe training steps only; keep them out of evaluate.
        result = super().test_step(*args)
        if not self.diagnostics:
            return result
        if keras.backend.backend() == "jax":
            logs, state = result
            return _without_diagnostics(logs), state
        return _without_diagnostics(result)

    def _sam_update_gradients(
        self,
        grads,
        weights,
        clean_loss,
        stateless_gradient,
        x,
        y,
        sample_weight,
        *,
        replica_count=1,
        all_reduce=None,
        batch_shards=1,
    ):
        """The gradient to hand to the base optimizer, and diagnostics.

        Backend-agnostic: the backend supplies the clean gradients `grads` at
        `weights` (may be `None` when the batch is split and every step runs
        the perturbed pass) and
        `stateless_gradient(values, x, y, sample_weight) -> (loss, grads)`,
        the scaled-loss gradient at `values` from the pre-step state; losses
        are unscaled.

        Args:
            replica_count, all_reduce: under tf.distribute each replica runs
                this with gradients that are its `1 / replica_count` share;
                `all_reduce` sums a list of tensors over replicas.
            batch_shards: number of data-parallel shards of a global batch
                (JAX distribution); the local perturbation scope perturbs
                each shard with its own gradient.

        Returns:
            `(update_gradients, stats)`; `stats` is empty unless diagnostics.
        """
        sam = self.sam_optimizer()
        runs = sam._runs_perturbed_pass()
        own_state = sam._state_variables()
        # TensorFlow and torch assign the optimizer's own variables (LookSAM's
        # g_v) in the perturbed branch; JAX's conditional must return them,
        # and the skipped branch returns the unchanged values.
        assigns_in_branch = getattr(backend_module("", "keras_ssam"), "STATEFUL_CONDITIONALS", False)

        def perturbed():
            update, stats, state = self._perturbed_update(
                sam, grads, weights, clean_loss, stateless_gradient, x, y, sample_weight,
                replica_count=replica_count, all_reduce=all_reduce, batch_shards=batch_shards,
            )
            if assigns_in_branch or runs is True:
                for variable, value in zip(own_state, state):
                    variable.assign(value)
                state = []
            return update, stats, state

        def skipped():
            stats = {}
            if self.diagnostics:
                stats = {k: ops.zeros((), "float32") for k in DIAGNOSTICS if k != "sam_step_fraction"}
            state = [] if assigns_in_branch or runs is False else [
                ops.convert_to_tensor(v.value) for v in own_state
            ]
            return sam.skipped_update(grads), stats, state

        if runs is True:
            update, stats, state = perturbed()
        elif runs is False:
            update, stats, state = skipped()
        elif replica_count > 1:
            # The perturbed branch all-reduces, and tf.distribute cannot
            # synchronize replicas inside a conditional.
            raise NotImplementedError(
                f"{type(sam).__name__} skips the perturbed pass on some steps "
                "(sam_probability, LookSAM), which tf.distribute cannot run "
                f"with several replicas (here {replica_count}) yet. Use "
                "sam_probability=1.0 (and SAM, USAM or SSAM) there, or the JAX "
                "backend's keras.distribution.DataParallel."
            )
        else:
            # A compiled conditional on TensorFlow and JAX, a Python `if` on
            # torch: a skipped step runs no perturbed pass at all.
            update, stats, state = _cond(runs, perturbed, skipped, [g is None for g in grads])
        for variable, value in zip(own_state, state):
            variable.assign(value)
        if self.diagnostics:
            stats["sam_step_fraction"] = ops.cast(runs, "float32")
        return update, stats

    def _perturbed_update(
        self, sam, grads, weights, clean_loss, stateless_gradient, x, y, sample_weight,
        *, replica_count, all_reduce, batch_shards,
    ):
        """The step with the perturbed pass: `(update, stats, state)`, with
        `state` the new values of the SAM optimizer's own variables."""
        grad_scale = self._loss_scale()
        local = self.perturbation_scope == "local"
        reduce = None
        if replica_count > 1:
            if local:
                # Each replica's gradient is its local mean gradient / replicas.
                grad_scale = (1.0 if grad_scale is None else grad_scale) / replica_count
            else:
                reduce = all_reduce
        splits = self.num_batch_splits * (batch_shards if local else 1)
        chunked = splits > 1 and not sam._state_averages_over_chunks
        if sam._state_variables() and (chunked or replica_count > 1):
            raise NotImplementedError(
                f"{type(sam).__name__} keeps a direction between steps and "
                "supports neither num_batch_splits > 1, the local perturbation "
                "scope over several shards, nor tf.distribute with several "
                f"replicas yet. Received: num_batch_splits={self.num_batch_splits}, "
                f"perturbation_scope={self.perturbation_scope!r}, replicas={replica_count}."
            )
        if splits == 1:
            return self._one_sam_update(
                sam, grads, weights, clean_loss, grad_scale, reduce,
                lambda values: stateless_gradient(values, x, y, sample_weight),
            )
        # Chunk updates (and F-SAM's state) weighted by chunk size: with
        # equal chunks, their mean.
        total = None
        for (cx, cy, csw), weight in _split_batch((x, y, sample_weight), splits):
            chunk_loss, chunk_grads = stateless_gradient(weights, cx, cy, csw)
            update, chunk_stats, state = self._one_sam_update(
                sam, chunk_grads, weights, chunk_loss, grad_scale, reduce,
                lambda values, cx=cx, cy=cy, csw=csw: stateless_gradient(values, cx, cy, csw),
            )
            chunk = (
                [None if u is None else _weighted(u, weight) for u in update],
                {k: _weighted(v, weight) for k, v in chunk_stats.items()},
                [_weighted(v, weight) for v in state],
            )
            if total is None:
                total = chunk
                continue
            total = (
                [None if t is None else t + u for t, u in zip(total[0], chunk[0])],
                {k: total[1][k] + v for k, v in chunk[1].items()},
                [t + v for t, v in zip(total[2], chunk[2])],
            )
        return total

    def _one_sam_update(self, sam, grads, weights, clean_loss, grad_scale, reduce, gradient_at):
        # With `reduce` (global scope over replicas) e and gamma come from the
        # all-reduced gradients, while the update stays this replica's share:
        # the optimizer all-reduces it, once. The clean gradient stays alive
        # for the fallback on a step whose perturbed gradient vanishes.
        reduced_grads = None if reduce is None else reduce(grads)
        perturbations, grad_norm = sam.perturbation(
            grads if reduce is None else reduced_grads, weights, grad_scale,
            mask=self._perturbed_mask(),
        )
        # On torch w + e overwrites e.
        perturbed = _kernels.add_(perturbations, weights)
        del perturbations
        perturbed_loss, perturbed_grads = gradient_at(perturbed)
        state = sam._perturbed_step_state(grads, perturbed_grads, grad_norm, grad_scale)
        if not sam.adaptive:
            perturbed = None  # only T(w + e) reads it: free it before the update
        norm_grads = None if reduce is None else reduce(perturbed_grads)
        # The step owns the perturbed gradients: torch computes SSAM's
        # rescaled update (and the fallback) in their memory.
        update, stats = sam.update_gradients(
            grads, perturbed_grads, perturbed, grad_norm, grad_scale,
            need_stats=self.diagnostics, norm_perturbed_grads=norm_grads,
            overwrite_grads=True, norm_grads=reduced_grads,
        )
        if self.diagnostics:
            stats["grad_norm"] = grad_norm
            stats["sharpness"] = ops.cast(perturbed_loss, "float32") - ops.cast(clean_loss, "float32")
            stats = {k: ops.cast(v, "float32") for k, v in stats.items()}
        return update, stats, state

    def _perturbed_mask(self):
        """The SAM optimizer's `perturb` as a bool per trainable weight, or
        `None` (all), resolved once per set of weights."""
        sam = self.sam_optimizer()
        if isinstance(sam.perturb, str) and sam.perturb == "all":
            return None
        variables = self.trainable_variables
        key = (id(sam), sam.perturb, tuple(id(v) for v in variables))
        cached = getattr(self, "_perturbed_mask_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, perturbed_mask(sam.perturb, variables, self.model))
            self._perturbed_mask_cache = cached
        return cached[1]

    def _update_diagnostics(self, stats):
        """Adds one step's diagnostics to their running means (stateful):
        `sam_step_fraction` over every step, the others over the steps that
        ran the perturbed pass."""
        weight = stats["sam_step_fraction"]
        for metric in self._diagnostic_metrics:
            if metric.name == "sam_step_fraction":
                metric.update_state(weight)
            else:
                metric.update_state(stats[metric.name], sample_weight=weight)

    def _stateless_training_loss(
        self, trainable_values, non_trainable_values, metrics_values, x, y, sample_weight
    ):
        """Unscaled training loss at the given values; writes nothing.

        Includes the compiled losses (with `loss_weights` and
        `sample_weight`) and `model.losses` (weight and activity
        regularizers, evaluated at `trainable_values`).

        Returns:
            `(loss, y_pred, new_non_trainable_values, new_metrics_values)`.
        """
        y_pred, non_trainable_values, losses = self.stateless_call(
            trainable_values,
            non_trainable_values,
            x,
            training=True,
            return_losses=True,
        )
        if losses:
            # `compute_loss` reads forward-pass losses from `self.losses`.
            self._losses_override.clear()
            self._losses_override = losses
        try:
            loss, (_, _, metrics_values) = self.stateless_compute_loss(
                trainable_values,
                non_trainable_values,
                metrics_values,
                x=x,
                y=y,
                y_pred=y_pred,
                sample_weight=sample_weight,
                training=True,
            )
        finally:
            if losses:
                self._losses_override.clear()
        return loss, y_pred, non_trainable_values, metrics_values

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.saving.serialize_keras_object(self.dtype_policy),
            "model": keras.saving.serialize_keras_object(self.model),
            "diagnostics": self.diagnostics,
            "num_batch_splits": self.num_batch_splits,
            "perturbation_scope": self.perturbation_scope,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # Deserializing a model consumes its nested config: work on a copy.
        config = copy.deepcopy(config)
        config["model"] = keras.saving.deserialize_keras_object(
            config["model"], custom_objects=custom_objects
        )
        return cls(**config)


def _without_diagnostics(logs):
    return {k: v for k, v in logs.items() if k not in DIAGNOSTICS}


def _cond(pred, true_fn, false_fn, missing):
    """`ops.cond` over `(update, stats, state)` whose `update` list has
    `None` where `missing` is true (conditionals take tensors only)."""

    def present(fn):
        def branch():
            update, stats, state = fn()
            return [u for u in update if u is not None], stats, state

        return branch

    # A backend may bring its own conditional (JAX: convolutions in the
    # layout XLA:CPU runs fast inside a branch).
    cond = getattr(backend_module("", "keras_ssam"), "cond", ops.cond)
    update, stats, state = cond(pred, present(true_fn), present(false_fn))
    update = iter(update)
    return [None if m else next(update) for m in missing], stats, list(state)


def _weighted(value, weight):
    """`weight * value`; an empty chunk (weight 0, value maybe NaN) gives 0."""
    product = value * ops.cast(weight, ops.dtype(value))
    if isinstance(weight, float):
        return product
    return ops.where(ops.greater(weight, 0), product, ops.zeros_like(product))


def _split_batch(data, splits):
    """Splits every tensor of `(x, y, sample_weight)` along the batch axis
    into `splits` chunks whose sizes differ by at most one.

    Returns a list of `((x, y, sample_weight), size / batch_size)`. Where the
    batch size is known when tracing (JAX, torch, full batches on
    TensorFlow) sizes are Python ints and empty chunks are left out; a
    TensorFlow batch of unknown size (a partial last batch) is split at run
    time, and a chunk that turns out empty has weight 0.
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

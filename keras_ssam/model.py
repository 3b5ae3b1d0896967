"""`SAMModel`: a `keras.Model` whose `train_step` runs SAM's two passes."""

from __future__ import annotations

import copy

import keras
from keras import tree

from keras_ssam import host_dispatch, step
from keras_ssam._validation import check_bool, check_int
from keras_ssam.backend import backend_module
from keras_ssam.optimizers import find_sam_optimizer
from keras_ssam.perturb import perturbed_mask
from keras_ssam.step import DIAGNOSTICS

PERTURBATION_SCOPES = ("global", "local")


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
            gradient vanished and that took the clean gradient instead), all
            means over the steps that ran the perturbed pass (NaN for an
            epoch without one), and `sam_step_fraction` (the fraction of
            steps that did). Off by default, and then no diagnostic is
            logged. Single-pass variants (MomentumSAM, RandomSAM) log
            `grad_norm` as the norm of their direction (`||v||`, `||eps||`),
            `perturbed_grad_norm` as the norm of the step's one gradient, and
            `sharpness` as NaN (no clean loss is computed).
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

    # The mode of the pass whose gradient defines the perturbation (`True`:
    # the clean pass's gradient, in training mode). The tf.keras shim
    # (`keras_ssam.SharpnessAwareMinimization`) sets `False`, as tf.keras did.
    ascent_training = True
    # How a step over batch chunks combines the chunks' updates: "mean"
    # (weighted by chunk size) or "sum" (tf.keras's SAM).
    batch_split_reduction = "mean"
    # Set by host dispatch (keras_ssam.host_dispatch) while a step runs: the
    # step's decision made on the host, which the step then takes as given.
    forced_step_decision = None

    def __init__(
        self,
        model: keras.Model,
        diagnostics: bool = False,
        num_batch_splits: int = 1,
        perturbation_scope: str = "global",
        name: str | None = None,
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
        check_bool("diagnostics", diagnostics)
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
            [keras.metrics.Mean(name=n) if n == "sam_step_fraction" else _MeanOverSAMSteps(name=n)
             for n in DIAGNOSTICS]
            if diagnostics else []
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
                "SAMModel must be compiled with a keras_ssam optimizer wrapping "
                "a Keras optimizer (keras_ssam.SAM, USAM, SSAM, LookSAM, GSAM, "
                "FriendlySAM, WSAM, or another subclass of keras_ssam.SAM), "
                "e.g. optimizer=keras_ssam.SAM(keras.optimizers.SGD(0.1)). "
                f"Received: optimizer={optimizer!r}"
            )
        if optimizer is not None:
            find_sam_optimizer(optimizer)._attached_to_sam_model = True
        self._compiled_optimizer = optimizer

    def sam_optimizer(self) -> keras.optimizers.Optimizer:
        """The compiled SAM optimizer (inside any LossScaleOptimizer)."""
        return find_sam_optimizer(self.optimizer)

    def make_train_function(self, force=False):
        # Resolve `perturb` before the first step: a bad selection raises
        # here, while the variables are intact (on JAX `fit` moves them into
        # the step's state first).
        sam = find_sam_optimizer(getattr(self, "_compiled_optimizer", None))
        if self.built and sam is not None:
            self._perturbed_mask()
        if sam is not None:
            step.check_supported(self)
        if sam is not None and self.diagnostics and (self.train_function is None or force):
            description = sam.step_description()
            if description:
                print(description)
        if sam is None or not host_dispatch.applies(self, sam):
            return super().make_train_function(force=force)
        if isinstance(self.train_function, host_dispatch.HostDispatch) and not force:
            self.train_function.resync()
            return self.train_function
        compiled = {}
        for decision in (True, False):
            # A distinct step function per decision: JAX's jit would share one
            # trace between two jits of the same method.
            self.train_step = host_dispatch.decided_step(self, decision)
            try:
                super().make_train_function(force=True)
            finally:
                del self.train_step
            compiled[decision] = self.train_function
        self.train_function = host_dispatch.HostDispatch(self, sam, compiled[True], compiled[False])
        return self.train_function

    def train_step(self, *args):
        return backend_module("", "keras_ssam").train_step(self, *args)

    def test_step(self, *args):
        # Diagnostics describe training steps only; keep them out of evaluate.
        return backend_module("", "keras_ssam").test_step(self, *args)

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

    def update_diagnostics(self, stats: dict) -> None:
        """Adds one step's diagnostics to their running means (stateful):
        `sam_step_fraction` over every step, the others over the steps that
        ran the perturbed pass."""
        weight = stats["sam_step_fraction"]
        for metric in self._diagnostic_metrics:
            if metric.name == "sam_step_fraction":
                metric.update_state(weight)
            else:
                metric.update_state(stats[metric.name], sample_weight=weight)

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


class _MeanOverSAMSteps(keras.metrics.Mean):
    """The mean of a diagnostic over the steps that ran the perturbed pass;
    NaN for an epoch without one (not measured, rather than a misleading 0)."""

    def result(self):
        count = keras.ops.cast(self.count, self.dtype)
        return keras.ops.where(count > 0, self.total / keras.ops.maximum(count, 1.0), float("nan"))


def without_diagnostics(logs: dict) -> dict:
    """`logs` less the training diagnostics."""
    return {k: v for k, v in logs.items() if k not in DIAGNOSTICS}

"""`SharpnessAwareMinimization`: Keras 2's SAM model wrapper, on Keras 3.

Keras 2 (tf.keras, now the `tf_keras` package) had
`tf.keras.models.experimental.SharpnessAwareMinimization(model, rho=0.05,
num_batch_splits=None, name=None)`, compiled with any optimizer; Keras 3 has
nothing in its place. This class takes the same arguments and, by default,
computes tf.keras's update, so that a Keras 2 script runs with one changed
import:

    # before: from tf_keras.models.experimental import SharpnessAwareMinimization
    from keras_ssam import SharpnessAwareMinimization

It is a `keras_ssam.SAMModel` compiled with `keras_ssam.SAM(optimizer,
rho=rho)`, and runs on TensorFlow, JAX and PyTorch. Where tf.keras and
keras_ssam differ, see the class docstring and docs/guides/migration.md.
"""

from __future__ import annotations

import copy
import numbers

import keras

from keras_ssam._validation import check_bool, check_number
from keras_ssam.model import SAMModel
from keras_ssam.optimizers import SAM, find_sam_optimizer

BATCH_SPLIT_REDUCTIONS = ("sum", "mean")

# Marks the SAM optimizer a `SharpnessAwareMinimization` made around the
# optimizer it was compiled with (see `_wrap_optimizer`).
_MADE_BY_SHIM = "_keras_ssam_tf_keras_shim"


@keras.saving.register_keras_serializable(package="keras_ssam")
class SharpnessAwareMinimization(SAMModel):
    """tf.keras's `SharpnessAwareMinimization` model wrapper, on Keras 3.

    `compile(optimizer=...)` takes any plain Keras optimizer (or its name)
    and trains with `keras_ssam.SAM(optimizer, rho=rho)` around it: each
    step, per batch split,

        g   = gradient of the compiled loss at w, in inference mode
              (BatchNormalization uses its moving statistics, no dropout)
        e   = rho g / (||g|| + 1e-12)           (one global L2 norm)
        g_i = gradient at w + e, in training mode

    and the optimizer applies the SUM of the splits' `g_i` at `w`, as
    tf.keras did. The weights are never assigned `w + e`: the passes read it
    as values.

    Differences from tf.keras (see also docs/guides/migration.md):

    - Weight and activity regularizers (`model.losses`) are in the loss of
      every pass (`include_regularization=True`); tf.keras left them out of
      its SAM step altogether, so a regularizer had no effect on training.
      `include_regularization=False` reproduces that.
    - BatchNormalization's moving statistics are updated once per step,
      from the whole batch at `w` (a training-mode forward pass, as in
      `keras.Model.fit`); tf.keras updated them once per split, from the
      split at `w + e`. Within a step every split's inference-mode pass
      sees the statistics from before the step (tf.keras: those updated by
      the previous splits).
    - The logged `loss` and the compiled metrics come from that
      training-mode pass over the whole batch at `w` (the plain loss, as in
      `fit`); tf.keras logged the mean of the loss of both passes of every
      split (inference mode at `w`, training mode at `w + e`) and fed the
      metrics its inference-mode predictions at `w`. The update does not
      depend on this.
    - Dropout: the perturbed pass draws its mask as tf.keras's did (one
      fresh mask per step, the same distribution), but from another random
      stream, so the masks themselves differ.
    - A batch that `num_batch_splits` does not divide (a partial last
      batch) is split into chunks whose sizes differ by at most one and
      their gradients summed; tf.keras's `tf.split` raised an error.
    - `get_config` stores `num_batch_splits` (tf.keras's did not, so a
      loaded model stopped splitting).
    - Under `tf.distribute`, tf.keras perturbed each replica with its own
      gradient (`perturbation_scope="local"` here); the default here,
      `"global"`, takes `e` from the all-reduced gradient, as the
      single-device run of the global batch does.
    - A step whose perturbed gradient is exactly zero while `g` is not
      applies `g` (see `keras_ssam.SAM`); tf.keras applied the zero.

    Args:
        model: a `keras.Model` (Sequential, functional or subclassed).
        rho: the perturbation radius, a float >= 0.
        num_batch_splits: split each batch into this many chunks
            (m-sharpness), each with its own `e`; `None` (or 1): no split.
        name: name of the wrapper; defaults to `"sam_" + model.name`.
        ascent_training: run the pass whose gradient defines `e` in
            training mode (`True`, as `keras_ssam.SAMModel` does) instead
            of inference mode (`False`, tf.keras).
        batch_split_reduction: combine the splits' gradients by their
            `"sum"` (tf.keras: the update grows with `num_batch_splits`) or
            their `"mean"` weighted by split size (`keras_ssam.SAMModel`).
        include_regularization: add `model.losses` (weight and activity
            regularizers, `add_loss`) to the loss of the training step's
            passes; `False` leaves them out as tf.keras did (`evaluate`
            still includes them, as tf.keras's did).
        diagnostics: as in `keras_ssam.SAMModel`.
        perturbation_scope: as in `keras_ssam.SAMModel`;
            `perturbation_scope="local"` is tf.keras's per-replica
            perturbation under `tf.distribute` (the shards of JAX's
            `DataParallel` are averaged, the splits summed).

    Example:

    ```python
    model = keras_ssam.SharpnessAwareMinimization(inner_model, rho=0.05)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x, y, epochs=10)
    ```
    """

    # tf.keras's update by default (see keras_ssam.model.SAMModel).
    ascent_training = False
    batch_split_reduction = "sum"

    def __init__(
        self,
        model: keras.Model,
        rho: float = 0.05,
        num_batch_splits: int | None = None,
        name: str | None = None,
        *,
        ascent_training: bool = False,
        batch_split_reduction: str = "sum",
        include_regularization: bool = True,
        diagnostics: bool = False,
        perturbation_scope: str = "global",
    ):
        if not isinstance(model, keras.Model):
            raise ValueError(
                "Argument `model` must be a keras.Model instance "
                f"(Sequential, functional or subclassed). Received: model={model!r}"
            )
        check_number("rho", rho, minimum=0.0)
        if num_batch_splits is not None and (
            not isinstance(num_batch_splits, numbers.Integral)
            or isinstance(num_batch_splits, bool)
            or num_batch_splits < 1
        ):
            raise ValueError(
                "Argument `num_batch_splits` must be None (no split) or an "
                f"integer >= 1. Received: num_batch_splits={num_batch_splits!r}"
            )
        check_bool("ascent_training", ascent_training)
        check_bool("include_regularization", include_regularization)
        if batch_split_reduction not in BATCH_SPLIT_REDUCTIONS:
            raise ValueError(
                f"Argument `batch_split_reduction` must be one of {BATCH_SPLIT_REDUCTIONS}. "
                f"Received: batch_split_reduction={batch_split_reduction!r}"
            )
        super().__init__(
            model,
            diagnostics=diagnostics,
            num_batch_splits=1 if num_batch_splits is None else int(num_batch_splits),
            perturbation_scope=perturbation_scope,
            name=name,
        )
        self.rho = rho
        self.ascent_training = ascent_training
        self.batch_split_reduction = batch_split_reduction
        self.include_regularization = include_regularization
        # As given (tf.keras's attribute is None without splits).
        self._num_batch_splits_argument = None if num_batch_splits is None else int(num_batch_splits)
        self._in_train_step = False

    # `compile` stores the optimizer here: a plain Keras optimizer is wrapped
    # in keras_ssam.SAM (overriding `compile` itself would stop `load_model`
    # from recompiling).
    @property
    def optimizer(self):
        return SAMModel.optimizer.fget(self)

    @optimizer.setter
    def optimizer(self, optimizer):
        SAMModel.optimizer.fset(self, self._wrap_optimizer(optimizer))

    def _wrap_optimizer(self, optimizer):
        if optimizer is None:
            return None
        sam = find_sam_optimizer(optimizer)
        if sam is not None:
            if getattr(sam, _MADE_BY_SHIM, False):
                # Ours, e.g. inside the LossScaleOptimizer that `compile`
                # adds under a mixed_float16 policy.
                return optimizer
            raise ValueError(
                "SharpnessAwareMinimization wraps the optimizer it is compiled "
                "with in keras_ssam.SAM(optimizer, rho=rho) itself: compile it "
                "with a plain Keras optimizer, e.g. keras.optimizers.SGD(0.1). "
                "To train with a keras_ssam optimizer (SAM, SSAM, GSAM, ...), "
                "wrap the model in keras_ssam.SAMModel instead. "
                f"Received: optimizer={optimizer!r}"
            )
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            if optimizer.built:
                raise ValueError(
                    "SharpnessAwareMinimization cannot wrap a LossScaleOptimizer "
                    "that has already been used: compile with the plain optimizer "
                    "(under a mixed_float16 policy `compile` adds the loss scaling). "
                    f"Received: optimizer={optimizer!r}"
                )
            return keras.optimizers.LossScaleOptimizer(
                self._sam(optimizer.inner_optimizer),
                initial_scale=optimizer.initial_scale,
                dynamic_growth_steps=optimizer.dynamic_growth_steps,
                name=optimizer.name,
            )
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise ValueError(
                "SharpnessAwareMinimization must be compiled with a Keras "
                "optimizer (a keras.optimizers.Optimizer instance or its name, "
                f"e.g. 'sgd'). Received: optimizer={optimizer!r}"
            )
        return self._sam(optimizer)

    def _sam(self, optimizer):
        sam = SAM(optimizer, rho=self.rho, epsilon=1e-12)
        setattr(sam, _MADE_BY_SHIM, True)
        return sam

    # With include_regularization=False the training step's losses are the
    # compiled loss alone, as in tf.keras (every pass reads `losses`).
    def train_step(self, *args):
        self._in_train_step = True
        try:
            return super().train_step(*args)
        finally:
            self._in_train_step = False

    @property
    def losses(self):
        if getattr(self, "_in_train_step", False) and not self.include_regularization:
            return []
        return super().losses

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "model": keras.saving.serialize_keras_object(self.model),
            "rho": self.rho,
            "num_batch_splits": self._num_batch_splits_argument,
            "ascent_training": self.ascent_training,
            "batch_split_reduction": self.batch_split_reduction,
            "include_regularization": self.include_regularization,
            "diagnostics": self.diagnostics,
            "perturbation_scope": self.perturbation_scope,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # Deserializing a model consumes its nested config: work on a copy.
        config = copy.deepcopy(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"], custom_objects=custom_objects)
        trainable = config.pop("trainable", True)
        config.pop("dtype", None)  # the wrapped model's, as at construction
        instance = cls(**config)
        instance.trainable = trainable
        return instance

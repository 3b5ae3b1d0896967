"""`SAMModel`: a `keras.Model` whose `train_step` runs SAM's two passes."""

import importlib

import keras

from keras_ssam.optimizers import find_sam_optimizer

_STEP_MODULES = {
    "tensorflow": "keras_ssam.backend.tensorflow",
    "jax": "keras_ssam.backend.jax",
    "torch": "keras_ssam.backend.torch",
}


def _step_module():
    name = keras.backend.backend()
    if name not in _STEP_MODULES:
        raise NotImplementedError(
            f"keras_ssam supports the tensorflow, jax and torch backends; "
            f"KERAS_BACKEND is {name!r}."
        )
    return importlib.import_module(_STEP_MODULES[name])


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

    def __init__(self, model, name=None, **kwargs):
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
        kwargs.setdefault("dtype", model.dtype_policy)
        super().__init__(name=name or f"sam_{model.name}", **kwargs)
        self.model = model
        if hasattr(model, "output_names"):
            self.output_names = model.output_names
        if model.built:
            self.built = True

    def build(self, input_shape):
        if not self.model.built:
            self.model.build(input_shape)
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
        self._compiled_optimizer = optimizer

    def sam_optimizer(self):
        """The compiled SAM optimizer (inside any LossScaleOptimizer)."""
        return find_sam_optimizer(self.optimizer)

    def loss_scale(self):
        """Factor the training loss is multiplied by before differentiation
        (mixed-precision loss scale, static `loss_scale_factor`), or `None`."""
        scale = self.optimizer.scale_loss(1.0)
        if isinstance(scale, (int, float)) and scale == 1.0:
            return None
        return scale

    def train_step(self, *args):
        return _step_module().train_step(self, *args)

    def stateless_training_loss(
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
            "model": keras.saving.serialize_keras_object(self.model),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(
            config["model"], custom_objects=custom_objects
        )
        return cls(**config)

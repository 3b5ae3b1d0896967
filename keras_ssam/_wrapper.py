"""`ForwardingOptimizer`: an optimizer whose weight update is another's.

In the shape of Keras's own `LossScaleOptimizer`: the wrapped optimizer (the
*base*) owns the update, the learning rate, the iteration count and its
variables; the wrapper adds its own variables after them and forwards the
rest. `StepOnlyOptimizer` adds the guard that only a SAM step applies it.
`keras_ssam.SAM` builds on them, so that the SAM classes read as the
sharpness-aware policy only.
"""

from __future__ import annotations

import contextlib

import keras

from keras_ssam import sam_math


class ForwardingOptimizer(keras.optimizers.Optimizer):
    """Forwards everything about the weight update to `base_optimizer`.

    Keras finds the wrapped optimizer where it looks for a
    `LossScaleOptimizer`'s: `inner_optimizer` (the callbacks
    `SwapEMAWeights` and `TensorBoard`); under a `LossScaleOptimizer`,
    `SwapEMAWeights` stops at this wrapper, which lends it the base
    optimizer's EMA variables. `learning_rate` is the base
    optimizer's and settable (`LearningRateScheduler`, `ReduceLROnPlateau`);
    `iterations` is the base optimizer's counter.

    A subclass adds variables of its own by overriding `build_state` (create
    them, once) and `state_variables` (list them); `variables` is the base
    optimizer's followed by those, which is the order `stateless_apply`
    takes and returns.

    Args:
        base_optimizer: the `keras.optimizers.Optimizer` that makes the
            update.
        name: name of the wrapper.

    Example:

    ```python
    class Logged(ForwardingOptimizer):
        def apply(self, grads, trainable_variables=None):
            print("step", int(self.iterations))
            super().apply(grads, trainable_variables)

    optimizer = Logged(keras.optimizers.SGD(0.1))
    ```
    """

    def __init__(self, base_optimizer: keras.optimizers.Optimizer, name: str | None = None):
        super().__init__(learning_rate=0.0, name=name)
        self.base_optimizer = base_optimizer

    @property
    def inner_optimizer(self) -> keras.optimizers.Optimizer:
        """The base optimizer, where Keras's callbacks look for a wrapped one."""
        return self.base_optimizer

    # -- This optimizer's own variables. --

    def build_state(self, var_list: list) -> None:
        """Creates this optimizer's own variables for `var_list`, once."""

    def state_variables(self) -> list:
        """This optimizer's own variables (saved, restored, and on JAX carried
        through the stateless step after the base optimizer's)."""
        return []

    def own_variables(self) -> list:
        """All of this optimizer's own variables, after the base optimizer's
        in `variables`: `state_variables()` unless a subclass keeps more."""
        return self.state_variables()

    @property
    def variables(self):
        return self.base_optimizer.variables + self.own_variables()

    def build(self, var_list):
        self.base_optimizer.build(var_list)
        self.build_state(var_list)
        # As LossScaleOptimizer: Keras's own `build` records the trainable
        # variables (`_trainable_variables`), so that a callback that takes
        # this optimizer for the EMA owner (SwapEMAWeights under a
        # LossScaleOptimizer) pairs them with the averages below. The
        # wrapper's own `use_ema` is False: it creates no variables.
        super().build(var_list)

    @property
    def _model_variables_moving_average(self):
        # The base optimizer's EMA of the weights (`use_ema=True`), for
        # SwapEMAWeights when it finds this optimizer as a
        # LossScaleOptimizer's `inner_optimizer` (it unwraps one level
        # only). Absent, like on any optimizer, when the base has no EMA.
        base = self.__dict__.get("base_optimizer")
        if base is None or not hasattr(base, "_model_variables_moving_average"):
            raise AttributeError("_model_variables_moving_average")
        return base._model_variables_moving_average

    # -- The update is the base optimizer's. --

    def apply(self, grads, trainable_variables=None):
        self.base_optimizer.apply(grads, trainable_variables)
        self.built = True

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        # The base optimizer's values come first; this optimizer's own
        # (already updated by the step) pass through.
        count = len(self.base_optimizer.variables)
        trainable_variables, base_values = self.base_optimizer.stateless_apply(
            optimizer_variables[:count], grads, trainable_variables
        )
        own_values = [keras.ops.convert_to_tensor(v) for v in optimizer_variables[count:]]
        return trainable_variables, list(base_values) + own_values

    def finalize_variable_values(self, var_list):
        self.base_optimizer.finalize_variable_values(var_list)

    def scale_loss(self, loss):
        return self.base_optimizer.scale_loss(loss)

    @property
    def loss_scale_factor(self):
        base = self.__dict__.get("base_optimizer")
        return None if base is None else base.loss_scale_factor

    @loss_scale_factor.setter
    def loss_scale_factor(self, value):
        # A LossScaleOptimizer turns off its inner optimizer's static scaling;
        # that scaling lives on the base optimizer. (Keras's constructor sets
        # it before `base_optimizer` exists.)
        base = self.__dict__.get("base_optimizer")
        if base is not None:
            base.loss_scale_factor = value

    @property
    def learning_rate(self):
        return self.base_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        base = self.__dict__.get("base_optimizer")
        if base is not None:
            base.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.base_optimizer.iterations

    # -- Saving: the base optimizer is part of the config. --

    def get_config(self):
        return {
            "name": self.name,
            "base_optimizer": keras.saving.serialize_keras_object(self.base_optimizer),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["base_optimizer"] = keras.saving.deserialize_keras_object(
            config["base_optimizer"], custom_objects=custom_objects
        )
        return cls(**config)


_SAM_MODEL_HINT = (
    "SAM optimizers need the gradient at a perturbed point, which only "
    "keras_ssam.SAMModel computes: wrap your model, "
    "`keras_ssam.SAMModel(model)`, and compile that."
)


class StepOnlyOptimizer(ForwardingOptimizer):
    """A `ForwardingOptimizer` that applies only at the end of a SAM step.

    `keras_ssam.step.apply_update` applies the step's update inside
    `applying(decoupled)`; anywhere else `apply` raises, so a SAM optimizer
    compiled into a plain `keras.Model` cannot silently train as its base
    optimizer. A step's decoupled term (WSAM) is subtracted from the weights
    after the base optimizer's update, times its learning rate at the step.

    Args:
        base_optimizer: the `keras.optimizers.Optimizer` that makes the
            update.
        name: name of the wrapper.
    """

    def __init__(self, base_optimizer: keras.optimizers.Optimizer, name: str | None = None):
        super().__init__(base_optimizer, name=name)
        self._applying = None
        # Set by SAMModel when compiled with this optimizer; `_built_elsewhere`
        # when a model that is not one built it.
        self._attached_to_sam_model = False
        self._built_elsewhere = False

    @contextlib.contextmanager
    def applying(self, decoupled=None):
        """Marks an `apply` as the end of a SAM step, with the step's
        decoupled term (`None`, or a tensor per weight, unscaled)."""
        outer, self._applying = self._applying, [decoupled]
        try:
            yield
        finally:
            self._applying = outer

    def _decoupled_term(self):
        if self._applying is None:
            raise RuntimeError(
                f"{type(self).__name__}.apply was called outside "
                f"keras_ssam.SAMModel. {_SAM_MODEL_HINT}"
            )
        return self._applying[0]

    @property
    def variables(self):
        # A model that is not a SAMModel built this optimizer (Keras builds it
        # for evaluate too). Its `fit` reads the variables before the first
        # step (on JAX it then moves the weights into the step's state):
        # refuse here, while the model is intact; `apply` refuses on the
        # other paths.
        if self._built_elsewhere and not self._attached_to_sam_model:
            raise RuntimeError(
                f"{type(self).__name__} was compiled into a model that is "
                f"not a keras_ssam.SAMModel. {_SAM_MODEL_HINT}"
            )
        return super().variables

    def build(self, var_list):
        if not self._attached_to_sam_model:
            self._built_elsewhere = True
        super().build(var_list)

    def apply(self, grads, trainable_variables=None):
        decoupled = self._decoupled_term()
        if decoupled is None:
            super().apply(grads, trainable_variables)
            return
        variables = self.base_optimizer._trainable_variables if trainable_variables is None else trainable_variables
        # The learning rate of this step, before `apply` advances it.
        learning_rate = keras.ops.convert_to_tensor(self.base_optimizer.learning_rate)
        super().apply(grads, trainable_variables)
        new = sam_math.decoupled_step([v.value for v in variables], decoupled, learning_rate)
        for variable, value in zip(variables, new):
            variable.assign(value)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        decoupled = self._decoupled_term()
        if decoupled is not None:
            count = len(self.base_optimizer.variables)
            # LossScaleOptimizer hands over the variables themselves inside a
            # StatelessScope: read them there.
            mapping = list(zip(self.base_optimizer.variables, optimizer_variables[:count]))
            with keras.StatelessScope(state_mapping=mapping):
                learning_rate = keras.ops.convert_to_tensor(self.base_optimizer.learning_rate)
        trainable_variables, values = super().stateless_apply(optimizer_variables, grads, trainable_variables)
        if decoupled is not None:
            trainable_variables = sam_math.decoupled_step(trainable_variables, decoupled, learning_rate)
        return trainable_variables, values

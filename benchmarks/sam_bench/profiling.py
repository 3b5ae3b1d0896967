"""What the single-model profile scripts share (`profile_torch.py`,
`xla_cost.py`, `jax_fallback_cost.py`): the benchmark's full-size MLP, a
configuration of `configs.KERAS_CONFIGS` built on it by name, and a compiled
Keras model's state as the tuple its stateless `train_step` takes.

Imports Keras and keras_ssam: the scripts set `KERAS_BACKEND` first.
"""

from .configs import FULL, KERAS_CONFIGS, LEARNING_RATE, MOMENTUM
from .models import build_keras_model


def mlp():
    """The benchmark's MLP (sam_bench.models, full size): 4.2 M parameters,
    the same initial weights on every call."""
    import keras

    keras.utils.set_random_seed(0)
    return build_keras_model("mlp", FULL)


def build(name):
    """(model, optimizer) of configuration `name` on `mlp()`, over the
    benchmark's base optimizer, with `total_steps` 1."""
    import keras

    import keras_ssam

    return KERAS_CONFIGS[name](mlp(), keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM), keras_ssam, 1)


def config_names(parser, csv):
    """The configuration names in `csv`; an unknown one is a `parser.error`."""
    names = [n for n in csv.split(",") if n]
    unknown = sorted(set(names) - set(KERAS_CONFIGS))
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {','.join(KERAS_CONFIGS)}")
    return names


def stateless_state(model):
    """The compiled `model`'s (trainable, non-trainable, optimizer, metrics)
    values: the state Keras's stateless `train_step(state, data)` takes."""
    return tuple(
        [v.value for v in variables]
        for variables in (model.trainable_variables, model.non_trainable_variables,
                          model.optimizer.variables, model.metrics_variables)
    )

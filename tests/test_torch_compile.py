"""torch's `jit_compile=True` (Keras compiles the train step with
`torch.compile`) for every optimizer in the library: the weights equal the
eager run's, nothing recompiles after the first epoch, and keras_ssam's code
emits no warning while dynamo traces it.

torch only: `jit_compile` on TensorFlow and JAX is XLA, which the rest of the
suite runs by default.
"""

import warnings

import keras
import numpy as np
import pytest
from conftest import BACKEND

import keras_ssam

pytestmark = pytest.mark.skipif(BACKEND != "torch", reason="torch.compile is the torch backend's jit_compile")

SGD = keras.optimizers.SGD
OPTIMIZERS = {
    "SAM": lambda: keras_ssam.SAM(SGD(0.1), rho=0.1),
    "USAM": lambda: keras_ssam.USAM(SGD(0.1), rho=0.1),
    "SSAM": lambda: keras_ssam.SSAM(SGD(0.1, momentum=0.9), rho=0.5),
    "ASAM": lambda: keras_ssam.SAM(SGD(0.1), rho=0.1, adaptive=True, eta=0.01),
    "LookSAM": lambda: keras_ssam.LookSAM(SGD(0.1), rho=0.1, k=3),
    "GSAM": lambda: keras_ssam.GSAM(SGD(0.1), rho=0.1),
    "FriendlySAM": lambda: keras_ssam.FriendlySAM(SGD(0.1), rho=0.1),
    "WSAM": lambda: keras_ssam.WSAM(SGD(0.1), rho=0.1),
    "MomentumSAM": lambda: keras_ssam.MomentumSAM(SGD(0.1, momentum=0.9), rho=0.3),
    "RandomSAM": lambda: keras_ssam.RandomSAM(SGD(0.1), sigma=0.05, seed=1),
    "RandomSAM mix": lambda: keras_ssam.RandomSAM(SGD(0.1), sigma=0.05, mix=0.5, seed=1),
    "SAM p=0.5": lambda: keras_ssam.SAM(SGD(0.1), rho=0.1, sam_probability=0.5, seed=2),
    "SSAM AdaptiveSteps": lambda: keras_ssam.SSAM(
        SGD(0.1), rho=0.5, sam_probability=keras_ssam.schedules.AdaptiveSteps(12)),
    "SharpnessAwareMinimization": None,  # the tf.keras shim, compiled with a plain optimizer
}


def _run(name, jit_compile):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    keras.utils.set_random_seed(1)
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
    if OPTIMIZERS[name] is None:
        model = keras_ssam.SharpnessAwareMinimization(inner, rho=0.1, num_batch_splits=2)
        optimizer = SGD(0.1)
    else:
        model = keras_ssam.SAMModel(inner)
        optimizer = OPTIMIZERS[name]()
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    graphs = []

    class Graphs(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            from torch._dynamo.utils import counters

            graphs.append(counters["stats"]["unique_graphs"])

    model.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0, callbacks=[Graphs()])
    return [np.array(w) for w in inner.get_weights()], graphs


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_compiled_step_equals_eager_without_recompiling(name):
    import torch._dynamo

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled, graphs = _run(name, True)
    eager, _ = _run(name, False)
    for c, e in zip(compiled, eager):
        # Compiled kernels fuse and reorder float32 arithmetic.
        np.testing.assert_allclose(c, e, rtol=1e-5, atol=2e-6)
    assert graphs[0] > 0, "setup: torch.compile compiled nothing"
    assert graphs[1:] == [graphs[0]] * 2, f"graphs compiled after the first epoch: {graphs}"
    ours = [str(w.message) for w in caught if "keras_ssam" in str(w.filename)]
    assert ours == [], ours

"""XLA's cost analysis of one compiled training step (JAX backend): FLOPs and
bytes accessed of plain fit, SAM, SSAM and adaptive SSAM on the benchmark's
MLP (4.2 M parameters, batch 128). A machine-independent profile of where a
SAM step's extra cost goes.

    python benchmarks/xla_cost.py
"""

import os

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from sam_bench.configs import FULL  # noqa: E402  (same folder)
from sam_bench.models import build_keras_model  # noqa: E402

import keras_ssam  # noqa: E402

BATCH = 128


def mlp():
    """The benchmark's MLP (sam_bench.models, full size): 4.2 M parameters."""
    keras.utils.set_random_seed(0)
    return build_keras_model("mlp", FULL)


def step_cost(model, optimizer, x, y):
    """(FLOPs, bytes accessed) of the jitted train_step after one fit step."""
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    state = tuple(
        [v.value for v in variables]
        for variables in (
            model.trainable_variables,
            model.non_trainable_variables,
            model.optimizer.variables,
            model.metrics_variables,
        )
    )
    step = jax.jit(lambda state, data: model.train_step(state, data))
    cost = step.lower(state, (x, y)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost.get("flops", 0.0), cost.get("bytes accessed", 0.0)


def main():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, BATCH).astype("int32")

    def base():
        return keras.optimizers.SGD(0.01, momentum=0.9)

    rows = {
        "plain": step_cost(mlp(), base(), x, y),
        "sam": step_cost(keras_ssam.SAMModel(mlp()), keras_ssam.SAM(base(), 0.05), x, y),
        "ssam": step_cost(keras_ssam.SAMModel(mlp()), keras_ssam.SSAM(base(), 0.05), x, y),
        "ssam_adapt": step_cost(
            keras_ssam.SAMModel(mlp()),
            keras_ssam.SSAM(base(), 0.5, adaptive=True, eta=0.01),
            x,
            y,
        ),
    }
    flops0, bytes0 = rows["plain"]
    print(f"{'config':<12}{'GFLOP':>8}{'':>9}{'MB accessed':>13}")
    for name, (flops, nbytes) in rows.items():
        print(
            f"{name:<12}{flops / 1e9:8.3f} ({flops / flops0:.2f}x) {nbytes / 1e6:9.1f} ({nbytes / bytes0:.2f}x)"
        )


if __name__ == "__main__":
    main()

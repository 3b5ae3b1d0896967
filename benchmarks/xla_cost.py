"""XLA's cost analysis of one compiled training step (JAX backend): FLOPs and
bytes accessed of plain fit, SAM, SSAM and adaptive SSAM on the benchmark's
MLP (4.2 M parameters, batch 128). A machine-independent profile of where a
SAM step's extra cost goes.

    python benchmarks/xla_cost.py
    python benchmarks/xla_cost.py --configs plain,msam,rwp,aesam    # any of sam_bench's KERAS_CONFIGS

The default rows are the four above; `--configs` takes the benchmark's
configuration names instead (built as the benchmark builds them, with
`total_steps` 1). A configuration whose step holds a conditional (AE-SAM's
adaptive steps) counts both branches.
"""

import argparse
import os

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from sam_bench.profiling import build, config_names, mlp, stateless_state  # noqa: E402  (same folder)

import keras_ssam  # noqa: E402

BATCH = 128


def step_cost(model, optimizer, x, y):
    """(FLOPs, bytes accessed) of the jitted train_step after one fit step."""
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    state = stateless_state(model)
    step = jax.jit(lambda state, data: model.train_step(state, data))
    cost = step.lower(state, (x, y)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost.get("flops", 0.0), cost.get("bytes accessed", 0.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=None,
                        help="comma-separated names from sam_bench.configs.KERAS_CONFIGS (default: plain, sam, "
                             "ssam, ssam_adapt as written below)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, BATCH).astype("int32")

    def base():
        return keras.optimizers.SGD(0.01, momentum=0.9)

    if args.configs:
        rows = {name: step_cost(*build(name), x, y) for name in config_names(parser, args.configs)}
        report(rows)
        return
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
    report(rows)


def report(rows):
    flops0, bytes0 = next(iter(rows.values()))
    print(f"{'config':<13}{'GFLOP':>8}{'':>9}{'MB accessed':>13}   (ratios to {next(iter(rows))})")
    for name, (flops, nbytes) in rows.items():
        print(
            f"{name:<13}{flops / 1e9:8.3f} ({flops / flops0:.2f}x) {nbytes / 1e6:9.1f} ({nbytes / bytes0:.2f}x)"
        )


if __name__ == "__main__":
    main()

"""torch.profiler's view of one training step (torch backend): where the time
of plain fit, SAM and SSAM goes on the benchmark's MLP (4.2 M parameters,
batch 128), per aten operator, and what SSAM adds over SAM. The eager
counterpart of `xla_cost.py`: every pass over the weights is its own kernel.

    python benchmarks/profile_torch.py [--steps 20]
"""

import argparse
import collections
import os

os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sam_bench.configs import FULL  # noqa: E402  (same folder)
from sam_bench.models import build_keras_model  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import keras_ssam  # noqa: E402

BATCH = 128


def mlp():
    """The benchmark's MLP (sam_bench.models, full size): 4.2 M parameters."""
    keras.utils.set_random_seed(0)
    return build_keras_model("mlp", FULL)


def per_step_ms(model, optimizer, x, y, steps):
    """{aten op: self CPU ms per step} over `steps` profiled steps."""
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    ops = collections.Counter()
    for event in prof.key_averages():
        if event.key.startswith("aten::") or event.key.startswith("_foreach"):
            ops[event.key] += event.self_cpu_time_total / 1e3 / steps
    return ops


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * args.steps, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, BATCH * args.steps).astype("int32")

    def base():
        return keras.optimizers.SGD(0.01, momentum=0.9)

    rows = {
        "plain": per_step_ms(mlp(), base(), x, y, args.steps),
        "sam": per_step_ms(keras_ssam.SAMModel(mlp()), keras_ssam.SAM(base(), 0.05), x, y, args.steps),
        "ssam": per_step_ms(keras_ssam.SAMModel(mlp()), keras_ssam.SSAM(base(), 0.05), x, y, args.steps),
    }
    names = sorted(set().union(*rows.values()), key=lambda k: -rows["ssam"][k])
    names = [k for k in names if max(r[k] for r in rows.values()) >= 0.05]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; self CPU ms per step")
    print(f"{'op':<34}{'plain':>8}{'sam':>8}{'ssam':>8}{'ssam-sam':>10}")
    for k in names:
        p, s, ss = (rows[c][k] for c in ("plain", "sam", "ssam"))
        print(f"{k:<34}{p:8.2f}{s:8.2f}{ss:8.2f}{ss - s:10.2f}")
    totals = {c: sum(r.values()) for c, r in rows.items()}
    mm = {c: r["aten::mm"] + r["aten::addmm"] for c, r in rows.items()}
    print(f"{'all aten ops':<34}" + "".join(f"{totals[c]:8.2f}" for c in rows)
          + f"{totals['ssam'] - totals['sam']:10.2f}")
    print(f"{'of which matmuls':<34}" + "".join(f"{mm[c]:8.2f}" for c in rows)
          + f"{mm['ssam'] - mm['sam']:10.2f}")


if __name__ == "__main__":
    main()

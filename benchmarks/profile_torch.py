"""torch.profiler's view of one training step (torch backend): where the time
of plain fit, SAM and SSAM goes on the benchmark's MLP (4.2 M parameters,
batch 128), per aten operator, and what SSAM adds over SAM. The eager
counterpart of `xla_cost.py`: every pass over the weights is its own kernel.

    python benchmarks/profile_torch.py [--steps 20]
    python benchmarks/profile_torch.py --configs plain,msam,rwp    # any of sam_bench's KERAS_CONFIGS

With `--configs` the columns are those benchmark configurations (built as
the benchmark builds them, with `total_steps` 1), and the last column is the
last one minus the first.
"""

import argparse
import collections
import os

os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sam_bench.profiling import build, config_names, mlp  # noqa: E402  (same folder)
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import keras_ssam  # noqa: E402

BATCH = 128


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
    parser.add_argument("--configs", default=None,
                        help="comma-separated names from sam_bench.configs.KERAS_CONFIGS (default: plain, sam, "
                             "ssam as written below, and SSAM - SAM)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * args.steps, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, BATCH * args.steps).astype("int32")

    def base():
        return keras.optimizers.SGD(0.01, momentum=0.9)

    if args.configs:
        names = config_names(parser, args.configs)
        rows = {name: per_step_ms(*build(name), x, y, args.steps) for name in names}
        report(rows, names[-1], names[0])
        return
    rows = {
        "plain": per_step_ms(mlp(), base(), x, y, args.steps),
        "sam": per_step_ms(keras_ssam.SAMModel(mlp()), keras_ssam.SAM(base(), 0.05), x, y, args.steps),
        "ssam": per_step_ms(keras_ssam.SAMModel(mlp()), keras_ssam.SSAM(base(), 0.05), x, y, args.steps),
    }
    report(rows, "ssam", "sam")


def report(rows, a, b):
    """Self CPU ms per step of each op and config, and config `a` minus `b`."""
    width = max(8, *(len(c) + 1 for c in rows))
    names = sorted(set().union(*rows.values()), key=lambda k: -rows[a][k])
    names = [k for k in names if max(r[k] for r in rows.values()) >= 0.05]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; self CPU ms per step")
    print(f"{'op':<34}" + "".join(f"{c:>{width}}" for c in rows) + f"{a + '-' + b:>{width + 6}}")
    for k in names:
        print(f"{k:<34}" + "".join(f"{r[k]:{width}.2f}" for r in rows.values())
              + f"{rows[a][k] - rows[b][k]:{width + 6}.2f}")
    totals = {c: sum(r.values()) for c, r in rows.items()}
    mm = {c: r["aten::mm"] + r["aten::addmm"] for c, r in rows.items()}
    print(f"{'all aten ops':<34}" + "".join(f"{totals[c]:{width}.2f}" for c in rows)
          + f"{totals[a] - totals[b]:{width + 6}.2f}")
    print(f"{'of which matmuls':<34}" + "".join(f"{mm[c]:{width}.2f}" for c in rows)
          + f"{mm[a] - mm[b]:{width + 6}.2f}")


if __name__ == "__main__":
    main()

"""Training-step time and memory of keras_ssam against plain fit and peer SAMs.

    python benchmarks/bench.py                      # full run, all backends
    python benchmarks/bench.py --smoke              # seconds-long check (CI)
    python benchmarks/bench.py --backends jax --reps 7 --steps 20 --batch-size 128

For each Keras backend (tensorflow, jax, torch), each model (an MLP and a small
ResNet-style CNN on synthetic 32x32x3 inputs, 10 classes) and each
configuration (plain fit, keras_ssam's SAM and SSAM variants, and a peer
library's plain and SAM loops on the same model: the table in
`sam_bench/configs.py`), the median training-step time and the peak memory,
and the step-time ratios against their targets.

The plan is `main` below; the parts live in `sam_bench/` (see its
`__init__.py`; the methods are in each module's docstring and in README.md).
Outputs, in `--out` (default benchmarks/results/): `bench.json` (everything,
including the per-step times), `bench.png` (ratio bars per backend and model)
and the printed tables (`bench.txt`).
"""

import os
import sys
import time

from sam_bench import analysis, children, cli, parent, report  # this script's folder is on sys.path


def main(argv=None):
    args = cli.parse_args(argv, description=__doc__.splitlines()[0])
    if args.child == "timing":  # in a child process, on the backend KERAS_BACKEND names
        return children.child_timing(args)
    if args.child == "memory":
        return children.child_memory(args)

    if args.report_from:
        return report.rewrite(args.report_from)

    meta = parent.describe_run(args)
    results = {}
    t_start = time.perf_counter()
    for backend in args.backends:
        # One child: every configuration warmed up, then interleaved timed blocks.
        res = parent.time_backend(backend, args)
        if "error" not in res:
            if args.memory == "fresh":
                # One fresh child per (model, configuration).
                parent.measure_memory_fresh(backend, res, args)
            # Ratios against their targets, SAM's extra memory.
            analysis.summarize(res, backend)
        results[backend] = res
    meta["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)

    report.write(results, meta, args.out)
    failed = [b for b, r in results.items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

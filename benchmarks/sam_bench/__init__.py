"""The benchmark behind `benchmarks/bench.py` (its entry point), in parts:

    configs.py       what is benchmarked: backends, models, sizes, hyper-parameters,
                     the configurations (one table), the ratios and their targets
    cli.py           the command line, defaults and checks
    parent.py        the parent process: spawns the children, records the run
    children.py      the child processes: the timing harness, the memory child
    models.py        the Keras models, their torch twins, synthetic data
    keras_config.py  a Keras configuration trained with fit, its step timer
    peers.py         the peers' training loops (optax, pytorch_optimizer)
    memory.py        RSS, device and XLA memory readings around a step
    analysis.py      ratios, targets and SAM's extra memory from the readings
    report.py        the tables, bench.json, bench.txt and the chart

Only the children import Keras (and a backend): every module imports its
framework inside the functions that need it.
"""

import os

BENCHMARKS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

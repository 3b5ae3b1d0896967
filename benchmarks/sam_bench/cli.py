"""The command line: options, the defaults of a full run and of `--smoke`,
and their checks. The same script serves the parent and, with the hidden
`--child` options, its child processes.

`parse_args` returns argparse's namespace with the lists already split:
`models` and `configs` (and, in the parent, `backends`) are lists of names,
`sizes` is a dict, and in the parent `child_cpus` is the set of CPUs the
children run on (None: all).
"""

import argparse
import json
import os

from . import BENCHMARKS
from .configs import BACKENDS, CONFIGS, DEFAULT_CONFIGS, FULL, MODELS, SIZE_KEYS, SMOKE


def _names(csv):
    return [name for name in csv.split(",") if name]


def _parser(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help="subset of " + ",".join(CONFIGS) + " (default: all but the _jit ones)")
    parser.add_argument("--reps", type=int, help=f"interleaved repetitions (default {FULL['reps']})")
    parser.add_argument("--steps", type=int, help=f"steps per timed block (default {FULL['steps']})")
    parser.add_argument("--batch-size", type=int, help=f"default {FULL['batch_size']}")
    parser.add_argument("--mlp-width", type=int, help=f"default {FULL['mlp_width']}")
    parser.add_argument("--mlp-depth", type=int, help=f"default {FULL['mlp_depth']}")
    parser.add_argument("--resnet-width", type=int, help=f"default {FULL['resnet_width']}")
    parser.add_argument("--resnet-stages", type=int, help=f"default {FULL['resnet_stages']}")
    parser.add_argument("--out", default=os.path.join(BENCHMARKS, "results"))
    parser.add_argument("--memory", choices=("fresh", "inline", "off"),
                        help="fresh child per config (default), inline (default with --smoke), or off")
    parser.add_argument("--cpus", type=int,
                        help="run the children on this many CPUs (affinity; sets every backend's "
                             "thread count); default: all")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repetition: checks the script works")
    parser.add_argument("--report-from", metavar="BENCH_JSON",
                        help="rewrite the report next to a run's bench.json from its stored measurements "
                             "(after the report changed); measures nothing")
    # Internal: child processes.
    parser.add_argument("--child", choices=("timing", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    return parser


def parse_args(argv, description):
    parser = _parser(description)
    args = parser.parse_args(argv)
    args.models, args.configs = _names(args.models), _names(args.configs)
    if args.child:
        args.sizes = json.loads(args.sizes)
        return args

    defaults = SMOKE if args.smoke else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.memory is None:
        args.memory = "inline" if args.smoke else "fresh"
    args.backends = _names(args.backends)
    for kind, chosen, allowed in (("backend", args.backends, BACKENDS), ("model", args.models, MODELS),
                                  ("config", args.configs, CONFIGS)):
        bad = sorted(set(chosen) - set(allowed))
        if bad:
            parser.error(f"unknown {kind}(s) {bad}; choose from {allowed}")
    if "ssam_split2" in args.configs and args.batch_size % 2:
        parser.error("--batch-size must be even for ssam_split2 (num_batch_splits=2)")
    if args.reps < 1 or args.steps < 1:
        parser.error("--reps and --steps must be >= 1")
    args.sizes = {k: getattr(args, k) for k in SIZE_KEYS}
    args.child_cpus = None
    if args.cpus is not None:
        allowed = sorted(os.sched_getaffinity(0))
        if not 1 <= args.cpus <= len(allowed):
            parser.error(f"--cpus must be between 1 and {len(allowed)}")
        args.child_cpus = set(allowed[: args.cpus])
    return args

"""The parent process. Keras picks its backend at import, so the parent
imports no backend: it spawns one timing child per backend (KERAS_BACKEND
set), with `--memory fresh` one memory child per (model, configuration), and
collects their JSON. It also records the run's description (`meta` in
bench.json).

Threads: every backend uses all CPUs by default. `--cpus N` starts the
children with their CPU affinity set to N CPUs (and OMP_NUM_THREADS=N); the
TensorFlow, XLA and OpenMP (torch) thread pools follow the affinity mask. On a
machine shared with other work, multi-threaded steps stall at thread barriers
(torch on 2 threads of an oversubscribed 2-core machine was 100x slower than
on 1): use an idle machine, or `--cpus 1`.
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from . import BENCHMARKS, children, memory
from .configs import HYPERPARAMETERS

ROOT = os.path.dirname(BENCHMARKS)
SCRIPT = os.path.join(BENCHMARKS, "bench.py")  # the parent's script: the children run it too


def describe_run(args):
    """The run's `meta`: settings, machine, load, methods (the load and wall
    time at the end are added by the caller)."""
    return {
        "mode": "smoke" if args.smoke else "full",
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "reps": args.reps,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "sizes": args.sizes,
        "memory": args.memory,
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}".strip(),
        "cpu_count": os.cpu_count(),
        "child_cpus": sorted(args.child_cpus) if args.child_cpus else "all",
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "hyperparameters": HYPERPARAMETERS,
        "timing_method": children.METHOD,
        "memory_method": memory.METHOD,
    }


def _common(args):
    return ["--models", ",".join(args.models), "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--sizes", json.dumps(args.sizes)]


def time_backend(backend, args):
    """One timing child: every configuration of every model, warm-up then the
    interleaved repetitions. Returns its result, or {"error": ...}."""
    print(f"[bench] {backend}: timing {len(args.configs)} configs x {len(args.models)} models, "
          f"{args.reps} reps x {args.steps} steps ...", flush=True)
    t0 = time.perf_counter()
    res, err = spawn(backend, ["--child", "timing", "--configs", ",".join(args.configs),
                               "--reps", str(args.reps),
                               "--memory", "inline" if args.memory == "inline" else "off",
                               *_common(args)], cpus=args.child_cpus)
    if err:
        print(f"[bench] {backend}: FAILED\n{err}", flush=True)
        return {"error": err}
    print(f"[bench] {backend}: timing done in {time.perf_counter() - t0:.0f} s", flush=True)
    return res


def measure_memory_fresh(backend, res, args):
    """One memory child per (model, configuration) timed in `res`; adds each
    reading (or its error) to the configuration's entry as "memory"."""
    for model_name in args.models:
        for name in res["models"][model_name]["configs"]:
            mem, err = spawn(
                backend,
                ["--child", "memory", "--configs", name,
                 "--models", model_name, *_common(args)[2:]],
                env_extra={"MALLOC_MMAP_THRESHOLD_": "65536"},
                cpus=args.child_cpus,
            )
            res["models"][model_name]["configs"][name]["memory"] = mem or {"error": err}
            if err:
                print(f"[bench] {backend}/{model_name}/{name}: memory child failed\n{err}", flush=True)
    print(f"[bench] {backend}: memory done", flush=True)


def spawn(backend, argv, env_extra=None, cpus=None):
    """Runs SCRIPT with `argv` in a child on `backend`; (its JSON result, None)
    or (None, the error with the tail of its output)."""
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    # A PYTHONPATH of the caller's comes first: `PYTHONPATH=<other checkout>`
    # benchmarks that checkout's keras_ssam (recorded as keras_ssam_file).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), ROOT) if p)
    env.update(env_extra or {})
    preexec = None
    if cpus:
        # TensorFlow, XLA and OpenMP (torch) size their thread pools from the
        # affinity mask, so this sets every backend's thread count.
        env["OMP_NUM_THREADS"] = str(len(cpus))

        def preexec():
            os.sched_setaffinity(0, cpus)

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    try:
        proc = subprocess.run(
            [sys.executable, SCRIPT, *argv, "--child-out", path],
            env=env,
            cwd=ROOT,
            preexec_fn=preexec,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout)[-4000:]
            return None, f"exit {proc.returncode}:\n{tail}"
        with open(path) as f:
            return json.load(f), None
    finally:
        os.remove(path)

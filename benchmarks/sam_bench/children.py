"""The child processes, one backend each (KERAS_BACKEND set by the parent):
the timing harness and the fresh-process memory measurement. Each writes its
result as JSON to `--child-out`.

Timing (`child_timing`): per model, every configuration is built from the
same initial weights and warmed up with one block of `--steps` steps
(tracing, XLA compilation, the first epoch: excluded). Then
`for rep in range(reps): for config in configs (rotated each rep): run one
block of --steps steps`, so slow phases of a shared machine hit every
configuration alike. Reported per configuration: the median of all timed
steps, and the min and max over repetitions of the per-repetition medians;
also each block's mean step, and, for the configurations that skip the
perturbed pass on some steps (`configs.SAM_STEP_PATTERNS`), how many steps of
each timed block ran it (block r covers iterations (r + 1) * steps to
(r + 2) * steps - 1: the warm-up block took the first `steps`); for those
whose steps depend on the data (`configs.MEASURED_SAM_STEPS`), the counts
their diagnostics logged. A configuration is built knowing the steps the
process trains it for: (reps + 1) * steps in the timing child, 2 * steps in
a memory child.
"""

import json
import platform
import statistics
import time

from .conditional import step_decision
from .configs import KERAS_CONFIGS, PEER_CONFIGS, PEERS, SAM_STEP_PATTERNS
from .keras_config import KerasConfig
from .memory import measure_memory, optimizer_state_bytes, rss_mib
from .models import build_keras_model, make_data, weight_info
from .peers import JaxPeerConfig, TorchPeerConfig, peer_available

METHOD = (
    "per-step wall time; Keras: callback on_train_batch_begin->on_train_batch_end "
    "(logs are pythonified before the callback runs, which syncs); peers: numpy batch "
    "conversion to loss read back as float. Warm-up epoch excluded. Interleaved reps, "
    "config order rotated each rep.")


def make_config(backend, name, model_name, template, sizes, x, y, batch_size, total_steps):
    """The configuration `name`: a KerasConfig, or this backend's peer loop."""
    if name in KERAS_CONFIGS:
        return KerasConfig(name, template, x, y, batch_size, total_steps)
    if backend == "jax":
        return JaxPeerConfig(name, template, x, y, batch_size)
    if backend == "torch":
        return TorchPeerConfig(name, model_name, sizes, x, y, batch_size)
    raise ValueError(f"no peer implementation on {backend}")


def backend_versions(backend):
    """The versions of Keras, Python, the backend and its peer library."""
    import keras

    import keras_ssam

    versions = {"keras": keras.__version__, "python": platform.python_version(),
                "keras_ssam": getattr(keras_ssam, "__version__", None), "keras_ssam_file": keras_ssam.__file__}
    if backend == "tensorflow":
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    elif backend == "jax":
        import jax
        import optax

        versions["jax"] = jax.__version__
        versions["optax"] = optax.__version__
        versions["jax_devices"] = [str(d) for d in jax.devices()]
    elif backend == "torch":
        import torch

        versions["torch"] = torch.__version__
        versions["torch_threads"] = torch.get_num_threads()
        try:
            import pytorch_optimizer

            versions["pytorch_optimizer"] = pytorch_optimizer.__version__
        except Exception:  # noqa: BLE001
            pass
    return versions


def sam_steps_per_block(name, steps, reps, cfg=None):
    """How many steps of each timed block of `name` run the perturbed pass
    (None: every step or none by construction, plain and peers excluded):
    from its pattern, or as its diagnostics logged them (the warm-up block's
    count dropped)."""
    measured = getattr(cfg, "sam_steps_per_block", None)
    if measured is not None:
        return measured[1:] if None not in measured else None
    if name not in SAM_STEP_PATTERNS:
        return None
    import numpy as np

    import keras_ssam

    return [int(np.sum(SAM_STEP_PATTERNS[name](np.arange((r + 1) * steps, (r + 2) * steps), keras_ssam)))
            for r in range(reps)]


def step_kind_medians(name, times):
    """The median step of each kind for a configuration whose perturbed steps
    are known in advance (`SAM_STEP_PATTERNS`; None otherwise or unmixed):
    {"perturbed": s, "skipped": s}. `times[r]` is block r's steps, iterations
    (r + 1) * len(block) onwards (the warm-up block came first). Where a mixed
    configuration's cost goes: its perturbed steps against SAM's, its skipped
    steps against plain's."""
    if name not in SAM_STEP_PATTERNS:
        return None
    import numpy as np

    import keras_ssam

    kinds = {"perturbed": [], "skipped": []}
    for r, block in enumerate(times):
        start = (r + 1) * len(block)
        runs = SAM_STEP_PATTERNS[name](np.arange(start, start + len(block)), keras_ssam)
        for t, perturbed in zip(block, np.broadcast_to(runs, (len(block),))):
            kinds["perturbed" if perturbed else "skipped"].append(t)
    if not all(kinds.values()):
        return None
    return {kind: statistics.median(ts) for kind, ts in kinds.items()}


def child_timing(args):
    """Times every configuration of every model on this backend (module doc)."""
    import keras

    backend = keras.backend.backend()
    sizes = args.sizes
    configs = args.configs
    peer_ok, peer_reason = peer_available(backend)
    if not peer_ok:
        configs = [c for c in configs if c not in PEER_CONFIGS]
    result = {
        "backend": backend,
        "versions": backend_versions(backend),
        "peer": PEERS[backend] if peer_ok else None,
        "peer_skipped_reason": peer_reason,
        "models": {},
    }
    for model_name in args.models:
        keras.utils.set_random_seed(0)
        template = build_keras_model(model_name, sizes)
        params, nbytes = weight_info(template)
        x, y = make_data(args.steps, args.batch_size)
        cfgs, first_epoch_s = {}, {}
        for name in configs:
            cfg = make_config(backend, name, model_name, template, sizes, x, y, args.batch_size,
                              (args.reps + 1) * args.steps)
            t0 = time.perf_counter()
            cfg.run_block(args.steps)  # warm-up: trace, compile, first epoch
            first_epoch_s[name] = time.perf_counter() - t0
            cfgs[name] = cfg
        traces_after_warmup = {n: c.traces for n, c in cfgs.items()}
        graphs_after_warmup = {n: getattr(c, "graphs", None) for n, c in cfgs.items()}
        times = {n: [] for n in cfgs}
        order = list(cfgs)
        for rep in range(args.reps):
            k = rep % len(order)
            for name in order[k:] + order[:k]:
                times[name].append(cfgs[name].run_block(args.steps))
        entry = {
            "trainable_params": params,
            "trainable_weight_bytes": nbytes,
            "configs": {},
        }
        for name, cfg in cfgs.items():
            per_rep = [statistics.median(block) for block in times[name]]
            per_rep_mean = [statistics.fmean(block) for block in times[name]]
            pooled = [t for block in times[name] for t in block]
            sam_steps = sam_steps_per_block(name, args.steps, args.reps, cfg)
            optimizer = getattr(getattr(cfg, "model", None), "optimizer", None)
            traced = backend != "torch"  # torch: eager, train_step runs every step
            graphs = getattr(cfg, "graphs", None)  # torch.compile: dynamo's graphs
            entry["configs"][name] = {
                "kind": cfg.kind,
                "step_s": {
                    "median": statistics.median(pooled),
                    "rep_median_min": min(per_rep),
                    "rep_median_max": max(per_rep),
                    "per_rep_median": per_rep,
                    "mean": statistics.fmean(pooled),
                    "per_rep_mean": per_rep_mean,
                },
                # Steps of each timed block that ran the perturbed pass (mixed configs only),
                # and the optimizer's iteration count at the end (checks the block alignment).
                "sam_steps_per_block": sam_steps,
                "sam_steps_source": None if sam_steps is None else (
                    "diagnostics" if getattr(cfg, "sam_steps_per_block", None) is not None else "pattern"),
                # Exact: the bytes of the optimizer's variables (the base's slots and
                # keras_ssam's own state), None for the peers.
                "optimizer_state_bytes": optimizer_state_bytes(cfg),
                "iterations_end": int(optimizer.iterations.numpy()) if hasattr(
                    getattr(optimizer, "iterations", None), "numpy") else None,
                "step_times_s": times[name],
                "step_kind_median_s": step_kind_medians(name, times[name]),
                "first_epoch_s": first_epoch_s[name],
                # The warm-up block's time beyond --steps steady-state steps (its
                # mean): tracing and compilation (torch.compile, XLA, tf.function).
                "first_epoch_extra_s": first_epoch_s[name] - args.steps * statistics.fmean(pooled),
                "jit_compile": getattr(getattr(cfg, "model", None), "jit_compile", None)
                if cfg.kind == "keras" else (backend == "jax"),
                # How the step decides whether to run the perturbed pass: "host"
                # (host dispatch), "conditional", "static", "-" (no SAM).
                "step_decision": step_decision(cfg.model) if cfg.kind == "keras" else None,
                "traces": None if cfg.traces is None else {
                    # torch.compile: graphs dynamo compiled, else train_step calls.
                    "counts": "torch.compile graphs" if graphs is not None else "train_step calls",
                    "after_warmup": graphs_after_warmup[name] if graphs is not None else traces_after_warmup[name],
                    "end": graphs if graphs is not None else cfg.traces,
                    "retraces_after_warmup": (graphs - graphs_after_warmup[name]) if graphs is not None
                    else cfg.traces - traces_after_warmup[name],
                    "meaningful": traced or graphs is not None,
                    "jit_cache_entries": cfg.jit_cache_size() if backend == "jax" else None,
                    "tf_function_tracing_count": cfg.tf_tracing_counts()
                    if backend == "tensorflow" else None,
                },
            }
        if args.memory == "inline":
            # Every config's model is alive here: no meaningful persistent
            # figure, only the steady-state step peak.
            for name, cfg in cfgs.items():
                entry["configs"][name]["memory"] = dict(
                    measure_memory(backend, cfg, args.steps, None, already_warm=True),
                    method="inline",
                )
        result["models"][model_name] = entry
        del cfgs
    with open(args.child_out, "w") as f:
        json.dump(result, f)


def child_memory(args):
    """Measures one (model, configuration) in this fresh process (sam_bench.memory)."""
    import keras

    backend = keras.backend.backend()
    sizes = args.sizes
    (model_name,), (name,) = args.models, args.configs
    keras.utils.set_random_seed(0)
    template = build_keras_model(model_name, sizes)
    x, y = make_data(args.steps, args.batch_size)
    cfg = make_config(backend, name, model_name, template, sizes, x, y, args.batch_size, 2 * args.steps)
    rss_before = rss_mib()
    out = measure_memory(backend, cfg, args.steps, rss_before, already_warm=False)
    out["method"] = "fresh"
    with open(args.child_out, "w") as f:
        json.dump(out, f)

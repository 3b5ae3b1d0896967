"""Memory readings of a training step, on any backend.

tracemalloc does not see native tensor buffers and no backend exposes a CPU
allocator peak, so on CPU memory comes from the process's resident set (Linux
`/proc/self/status`). `measure_memory` runs a configuration's warm-up block
(unless already warm), resets the kernel's RSS high-water mark (`echo 5 >
/proc/self/clear_refs`), runs one block of steps and reads `VmHWM`:

    step_peak_mib       high-water mark minus the RSS at the reset: the
                        transient memory of a steady-state step (activations,
                        gradients, SAM's perturbed weights and gradients, the
                        batch), without the one-off compilation
    fit_persistent_mib  RSS at the reset minus RSS before the first fit
                        (optimizer slots, compiled code, caches)
    total_peak_mib      high-water mark minus RSS before the first fit

Page-granular, with allocator and runtime noise of a few MiB. With `--memory
fresh` (the default) each (backend, model, config) is measured in its own
child with glibc's mmap threshold fixed at 64 KiB
(`MALLOC_MMAP_THRESHOLD_=65536`: large buffers go back to the OS when freed,
so the RSS follows the live tensors); `--memory inline` (the default with
`--smoke`) measures inside the timing child, where the configurations share a
process and allocator: rough. On JAX, XLA's own compiled-memory analysis of
the train step (argument, output, alias and temp bytes) is recorded too,
exact for what XLA allocates; on a GPU, the device allocator's peak.
"""

METHOD = (
    "RSS (Linux /proc/self/status). step_peak_mib = VmHWM after one steady-state block "
    "minus VmRSS when the high-water mark was reset (clear_refs 5) after the warm-up "
    "epoch; fresh: one child process per config with MALLOC_MMAP_THRESHOLD_=65536; "
    "inline: inside the timing child (rough). JAX: XLA compiled memory_analysis too. "
    "GPU: allocator peak.")


def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def rss_mib():
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib / 1024.0


def hwm_mib():
    kib = _proc_status_kib("VmHWM")
    return None if kib is None else kib / 1024.0


def reset_hwm():
    """Resets the kernel's RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def optimizer_state_bytes(config):
    """The bytes of a Keras configuration's optimizer variables (the base
    optimizer's slots, keras_ssam's own state, the step counters): exact,
    the persistent state a step keeps. None for a peer."""
    optimizer = getattr(getattr(config, "model", None), "optimizer", None)
    if config.kind != "keras" or optimizer is None:
        return None
    import numpy as np

    return int(sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in optimizer.variables))


def xla_stats(compiled):
    ma = compiled.memory_analysis()
    if ma is None:
        return {"error": "memory_analysis() returned None"}
    out = {
        "argument_bytes": int(ma.argument_size_in_bytes),
        "output_bytes": int(ma.output_size_in_bytes),
        "alias_bytes": int(ma.alias_size_in_bytes),
        "temp_bytes": int(ma.temp_size_in_bytes),
    }
    out["peak_estimate_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    )
    return out


def device_memory_reset(backend):
    try:
        if backend == "torch":
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        elif backend == "tensorflow":
            import tensorflow as tf

            if tf.config.list_physical_devices("GPU"):
                tf.config.experimental.reset_memory_stats("GPU:0")
    except Exception:  # noqa: BLE001 - best effort
        pass


def device_memory_peak(backend):
    """Accelerator allocator peak in MiB, or None on CPU."""
    try:
        if backend == "torch":
            import torch

            if torch.cuda.is_available():
                return torch.cuda.max_memory_allocated() / 2**20
        elif backend == "tensorflow":
            import tensorflow as tf

            if tf.config.list_physical_devices("GPU"):
                return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
        elif backend == "jax":
            import jax

            dev = jax.devices()[0]
            if dev.platform != "cpu":
                stats = dev.memory_stats() or {}
                if "peak_bytes_in_use" in stats:
                    # Not resettable: the process-lifetime peak.
                    return stats["peak_bytes_in_use"] / 2**20
    except Exception:  # noqa: BLE001 - best effort
        return None
    return None


def measure_memory(backend, config, steps, rss_before_fit, already_warm):
    """RSS readings around one steady-state block (see module doc)."""
    if not already_warm:
        config.run_block(steps)
    rss_reset = rss_mib()
    ok = reset_hwm()
    device_memory_reset(backend)
    config.run_block(steps)
    hwm = hwm_mib()
    out = {
        "hwm_reset_ok": ok,
        "rss_before_fit_mib": rss_before_fit,
        "rss_at_reset_mib": rss_reset,
        "hwm_steady_mib": hwm,
        "step_peak_mib": (hwm - rss_reset) if ok and hwm is not None else None,
        "fit_persistent_mib": (rss_reset - rss_before_fit) if rss_before_fit is not None else None,
        "total_peak_mib": (hwm - rss_before_fit) if ok and hwm is not None and rss_before_fit is not None else None,
        "device_peak_mib": device_memory_peak(backend),
    }
    if backend == "jax" and hasattr(config, "xla_memory"):
        try:
            out["xla"] = config.xla_memory()
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            out["xla"] = {"error": f"{type(e).__name__}: {e}"}
    return out

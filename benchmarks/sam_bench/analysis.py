"""From a timing child's per-step times and memory readings to the headline
numbers, added to each model's entry of the results:

    ratios               per `configs.RATIOS` row: the median over repetitions
                         of the ratio of the two configurations'
                         per-repetition median step times, min-max alongside
                         (of their per-repetition mean step times when one
                         of them is in `configs.MIXED_CONFIGS`: steps of one
                         and of two passes, whose median would be one kind)
    memory_sam_vs_plain  SAM's extra memory over plain, in MiB and in units of
                         the trainable weights' bytes (RSS, XLA, device)
    memory_one_pass      per `configs.MEMORY_COMPARISONS` row (the one-pass
                         variants against their reference): the extra
                         persistent optimizer state (exact bytes) and the
                         extra transient step memory (RSS step peak; XLA's
                         temp bytes on JAX), in weight sizes
    targets              each of those with a target: its bound and whether
                         it is met (RSS verdicts only for weights of at least
                         `RSS_VERDICT_MIN_WEIGHT_MIB`); a ratio whose target
                         depends on the measured fraction of SAM steps
                         (`configs.fraction_target`) gets the bound computed
                         from that fraction, its rule, and the statistic held
                         against it (the pooled mean ratio) with its value
"""

import statistics

from .configs import (
    MEMORY_COMPARISONS,
    MEMORY_TARGET_WEIGHTS,
    MIXED_CONFIGS,
    RATIOS,
    RSS_VERDICT_MIN_WEIGHT_MIB,
    STATE_TOLERANCE_WEIGHTS,
    target_bound,
)


def summarize(res, backend):
    """Adds ratios, targets and SAM's extra memory to every model of one
    backend's result."""
    for entry in res["models"].values():
        entry["ratios"] = {
            f"{num}/{den}": r
            for num, den, _, _ in RATIOS
            if (r := ratio(entry["configs"], num, den)) is not None
        }
        _expected_from_fraction(entry)
        entry["targets"] = {}
        for num, den, _, t in RATIOS:
            r = entry["ratios"].get(f"{num}/{den}")
            bound = None if r is None or backend not in t else target_bound(t[backend], r)
            if bound is not None:
                statistic = getattr(t[backend], "statistic", "median")
                entry["targets"][f"{num}/{den}"] = {"max": bound, "met": r[statistic] <= bound}
                if hasattr(t[backend], "rule"):
                    entry["targets"][f"{num}/{den}"].update(rule=t[backend].rule, statistic=statistic,
                                                            value=r[statistic])
        entry["memory_sam_vs_plain"] = memory_extra(entry)
        rss_ok = entry["trainable_weight_bytes"] / 2**20 >= RSS_VERDICT_MIN_WEIGHT_MIB
        entry["memory_one_pass"] = one_pass_memory(entry)
        for key, m in entry["memory_one_pass"].items():
            if m.get("state_extra_weights") is not None:
                entry["targets"][f"memory_state/{key}"] = {
                    "max": m["state_max_weights"], "value": m["state_extra_weights"],
                    "met": m["state_extra_weights"] <= m["state_max_weights"] + STATE_TOLERANCE_WEIGHTS}
            for label in ("rss_step_peak", "xla_temp"):
                extra = m.get(f"{label}_extra_weights")
                if extra is not None and (rss_ok or label == "xla_temp"):
                    entry["targets"][f"memory_step/{label}/{key}"] = {
                        "max": m["step_max_weights"], "value": extra, "met": extra <= m["step_max_weights"]}
        for label in ("rss_step_peak", "rss_total_peak", "xla_peak"):
            extra = entry["memory_sam_vs_plain"].get(f"{label}_extra_weights")
            if extra is not None and (rss_ok or label == "xla_peak"):
                entry["targets"][f"memory_sam_extra_weights/{label}"] = {
                    "max": MEMORY_TARGET_WEIGHTS, "met": extra <= MEMORY_TARGET_WEIGHTS, "value": extra}


def ratio(configs, num, den):
    if num not in configs or den not in configs:
        return None
    statistic = "mean" if num in MIXED_CONFIGS or den in MIXED_CONFIGS else "median"
    a = configs[num]["step_s"][f"per_rep_{statistic}"]
    b = configs[den]["step_s"][f"per_rep_{statistic}"]
    per_rep = [p / q for p, q in zip(a, b)]
    out = {
        "median": statistics.median(per_rep),
        "min": min(per_rep),
        "max": max(per_rep),
        "per_rep": per_rep,
        "of_step": statistic,  # per-repetition median or mean step times
        "pooled_median_ratio": configs[num]["step_s"]["median"] / configs[den]["step_s"]["median"],
        "pooled_mean_ratio": configs[num]["step_s"]["mean"] / configs[den]["step_s"]["mean"],
    }
    blocks = configs[num].get("sam_steps_per_block")
    if blocks:
        steps = len(configs[num]["step_times_s"][0])
        out["sam_step_fraction"] = sum(blocks) / (steps * len(blocks))
    return out


def _expected_from_fraction(entry):
    """For a configuration that runs the perturbed pass on a fraction f of its
    timed steps, against plain: what those steps alone would cost,
    1 + f (SAM/plain - 1) with SAM/plain of the pooled mean steps. A ratio
    well above it is overhead on the steps that skip the pass."""
    cfgs = entry["configs"]
    # SAM/plain of the same compilation: the eager (default) or the _jit twins.
    for sam, plain in (("sam", "plain"), ("sam_jit", "plain_jit")):
        if sam not in cfgs or plain not in cfgs:
            continue
        sam_over_plain = cfgs[sam]["step_s"]["mean"] / cfgs[plain]["step_s"]["mean"]
        for key, r in entry["ratios"].items():
            if key.endswith(f"/{plain}") and "sam_step_fraction" in r:
                r["expected_from_fraction"] = 1 + r["sam_step_fraction"] * (sam_over_plain - 1)


def memory_extra(entry, num="sam", den="plain"):
    cfgs = entry["configs"]
    out = {}
    wmib = entry["trainable_weight_bytes"] / 2**20
    for key, label in (("step_peak_mib", "rss_step_peak"), ("total_peak_mib", "rss_total_peak")):
        try:
            a = cfgs[num]["memory"][key]
            b = cfgs[den]["memory"][key]
        except (KeyError, TypeError):
            continue
        if a is not None and b is not None:
            out[f"{label}_extra_mib"] = a - b
            out[f"{label}_extra_weights"] = (a - b) / wmib if wmib else None
    try:
        xa = cfgs[num]["memory"]["xla"]["peak_estimate_bytes"]
        xb = cfgs[den]["memory"]["xla"]["peak_estimate_bytes"]
        out["xla_peak_extra_mib"] = (xa - xb) / 2**20
        out["xla_peak_extra_weights"] = (xa - xb) / entry["trainable_weight_bytes"]
    except (KeyError, TypeError):
        pass
    try:
        da = cfgs[num]["memory"]["device_peak_mib"]
        db = cfgs[den]["memory"]["device_peak_mib"]
        if da is not None and db is not None:
            out["device_peak_extra_weights"] = (da - db) / wmib
    except (KeyError, TypeError):
        pass
    return out


def one_pass_memory(entry):
    """Per MEMORY_COMPARISONS row present: the numerator's extra persistent
    optimizer state (exact bytes of optimizer.variables) and extra transient
    step memory (RSS step peak; on JAX XLA's temp bytes, the step's own
    buffers) over its reference, in trainable-weight sizes."""
    cfgs = entry["configs"]
    wbytes = entry["trainable_weight_bytes"]
    out = {}
    for num, den, label, step_max, state_max in MEMORY_COMPARISONS:
        if num not in cfgs or den not in cfgs:
            continue
        m = {"label": label, "step_max_weights": step_max, "state_max_weights": state_max}
        a, b = cfgs[num].get("optimizer_state_bytes"), cfgs[den].get("optimizer_state_bytes")
        if a is not None and b is not None:
            m["state_extra_bytes"] = a - b
            m["state_extra_weights"] = (a - b) / wbytes
        extra = memory_extra(entry, num, den)
        for key in ("rss_step_peak_extra_mib", "rss_step_peak_extra_weights", "rss_total_peak_extra_weights",
                    "xla_peak_extra_weights"):
            if key in extra:
                m[key] = extra[key]
        try:
            ta = cfgs[num]["memory"]["xla"]["temp_bytes"]
            tb = cfgs[den]["memory"]["xla"]["temp_bytes"]
            m["xla_temp_extra_weights"] = (ta - tb) / wbytes
        except (KeyError, TypeError):
            pass
        out[f"{num}/{den}"] = m
    return out

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
    targets              each of those with a target: its bound and whether
                         it is met (RSS verdicts only for weights of at least
                         `RSS_VERDICT_MIN_WEIGHT_MIB`)
"""

import statistics

from .configs import MEMORY_TARGET_WEIGHTS, MIXED_CONFIGS, RATIOS, RSS_VERDICT_MIN_WEIGHT_MIB


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
        entry["targets"] = {
            f"{num}/{den}": {"max": t[backend], "met": entry["ratios"][f"{num}/{den}"]["median"] <= t[backend]}
            for num, den, _, t in RATIOS
            if backend in t and f"{num}/{den}" in entry["ratios"]
        }
        entry["memory_sam_vs_plain"] = memory_extra(entry)
        rss_ok = entry["trainable_weight_bytes"] / 2**20 >= RSS_VERDICT_MIN_WEIGHT_MIB
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
    if "sam" not in cfgs or "plain" not in cfgs:
        return
    sam_over_plain = cfgs["sam"]["step_s"]["mean"] / cfgs["plain"]["step_s"]["mean"]
    for key, r in entry["ratios"].items():
        if key.endswith("/plain") and "sam_step_fraction" in r:
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

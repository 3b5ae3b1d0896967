"""The outputs, written to `--out`: the printed tables (`bench.txt`: per
configuration the step times, traces and memory; the ratios with their target
verdicts; SAM's extra memory and the one-pass variants' extra state and step
memory; retracing), everything as JSON (`bench.json`:
{"meta": ..., "results": ...}) and the chart of the ratios (`bench.png`: bars
per backend, one panel per model, whiskers min-max over repetitions).
"""

import json
import os

from .configs import (
    MEASURED_SAM_STEPS,
    MEMORY_COMPARISONS,
    MEMORY_TARGET_WEIGHTS,
    MIXED_CONFIGS,
    MODELS,
    PEER_LEGEND,
    RATIOS,
    RSS_VERDICT_MIN_WEIGHT_MIB,
)


def write(results, meta, out):
    """Prints the tables and writes bench.json, bench.txt and bench.png to `out`."""
    os.makedirs(out, exist_ok=True)
    text = report(results, meta)
    print("\n" + text)
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    with open(os.path.join(out, "bench.txt"), "w") as f:
        f.write(text + "\n")
    png = os.path.join(out, "bench.png")
    if plot(results, png, meta):
        print(f"\nwrote {os.path.join(out, 'bench.json')}, bench.txt, bench.png "
              f"({meta['wall_s']:.0f} s)")


def rewrite(path):
    """Rewrites bench.txt and bench.png next to the bench.json at `path` from
    its stored measurements, filling in the per-kind step medians of runs
    that predate them (`children.step_kind_medians`, from `step_times_s`)."""
    from .children import step_kind_medians

    with open(path) as f:
        run = json.load(f)
    for res in run["results"].values():
        for entry in res.get("models", {}).values():
            for name, c in entry["configs"].items():
                if "step_kind_median_s" not in c and "step_times_s" in c:
                    c["step_kind_median_s"] = step_kind_medians(name, c["step_times_s"])
    write(run["results"], run["meta"], os.path.dirname(os.path.abspath(path)))
    return 0


def _fmt_ms(s):
    return f"{1000 * s:8.2f}"


def _fmt_mib(v):
    return "     -" if v is None else f"{v:6.1f}"


def _verdict(extra_weights, meta):
    if meta["mode"] == "smoke" or extra_weights is None:
        return ""
    return " ok" if extra_weights <= MEMORY_TARGET_WEIGHTS else " MISS"


def report(results, meta):
    lines = []
    p = lines.append
    p(f"keras_ssam benchmark  ({meta['mode']}: reps={meta['reps']} steps={meta['steps']} "
      f"batch={meta['batch_size']}, memory={meta['memory']})")
    p(f"machine: {meta['machine']}, {meta['cpu_count']} CPUs (children on {meta['child_cpus']}), load average "
      f"{meta['loadavg_start']} at start, {meta['loadavg_end']} at end")
    if meta["mode"] == "smoke":
        p("SMOKE MODE: tiny models, 1 repetition; checks the script runs, the numbers mean nothing.")
    for backend, res in results.items():
        if "error" in res:
            p(f"\n=== {backend}: FAILED ===\n{res['error']}")
            continue
        p(f"\n=== {backend}  (peer: {res['peer'] or 'none'}"
          + (
              f"; {res['peer_skipped_reason']}"
              if res.get("peer_skipped_reason") and res["peer"] is None and backend != "tensorflow"
              else ""
          )
          + ") ===")
        for model_name, entry in res["models"].items():
            p(f"-- {model_name}: {entry['trainable_params']:,} trainable parameters "
              f"({entry['trainable_weight_bytes'] / 2**20:.2f} MiB)")
            p(f"   {'config':<16} {'median ms':>9} {'rep min-max ms':>19} {'1st epoch s':>11} "
              f"{'of it compile s':>15} {'decision':>11} "
              f"{'traces warm/end':>15} {'step peak MiB':>13} {'persist MiB':>11} {'total MiB':>9}")
            for name, c in entry["configs"].items():
                s = c["step_s"]
                tr = c["traces"]
                if tr is None:
                    trs = "n/a"
                elif not tr["meaningful"]:
                    trs = "eager"
                else:
                    trs = (f"{tr['after_warmup']}/{tr['end']}"
                           + (" graphs" if tr.get("counts") == "torch.compile graphs" else ""))
                mem = c.get("memory") or {}
                extra = c.get("first_epoch_extra_s")
                p(f"   {name:<16} {_fmt_ms(s['median']):>9} "
                  f"{_fmt_ms(s['rep_median_min'])}-{_fmt_ms(s['rep_median_max']).strip():<9} "
                  f"{c['first_epoch_s']:11.2f} {'-' if extra is None else f'{extra:.2f}':>15} "
                  f"{c.get('step_decision') or '-':>11} {trs:>15} {_fmt_mib(mem.get('step_peak_mib')):>13} "
                  f"{_fmt_mib(mem.get('fit_persistent_mib')):>11} {_fmt_mib(mem.get('total_peak_mib')):>9}")
    p("\nRatios of step times: median over repetitions [min-max], then ok or MISS against the target "
      "(no verdicts in smoke mode); one line per ratio, one column per backend and model")
    rows = _ratio_rows(results)
    columns = [(backend, model_name, entry) for backend, res in results.items() if "error" not in res
               for model_name, entry in res["models"].items()]
    width = 36
    label_width = max([len(label) for _, _, label, _ in rows] + [5])
    p(f"{'ratio':<{label_width}}" + "".join(f" {b + ' ' + m:>{width}}" for b, m, _ in columns))
    for num, den, label, _ in rows:
        line = f"{label:<{label_width}}"
        for _, _, entry in columns:
            r = entry["ratios"].get(f"{num}/{den}")
            if r is None:
                line += f" {'-':>{width}}"
                continue
            cell = f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]"
            target = entry.get("targets", {}).get(f"{num}/{den}")
            if target is not None and meta["mode"] != "smoke":
                if target.get("statistic", "median") != "median":
                    cell += f" mean {target['value']:.2f}"
                cell += f" {'ok' if target['met'] else 'MISS'}<={target['max']:.2f}"
            line += f" {cell:>{width}}"
        p(line)
    rules = sorted({t["rule"] for res in results.values() if "error" not in res
                    for e in res["models"].values() for t in e.get("targets", {}).values() if "rule" in t})
    if rules:
        p("Targets that depend on the measured fraction f of SAM steps: " + ", ".join(rules)
          + " (" + ", ".join(label for num, _, label, _ in rows if num in MEASURED_SAM_STEPS) + ").")
    _mixed_report(p, results)
    if meta["memory"] == "off":
        p("\nMemory: not measured (--memory off).")
    else:
        _memory_report(p, results, meta)
    _one_pass_memory_report(p, results, meta)
    _traces_report(p, results)
    return "\n".join(lines)


def _ratio_rows(results):
    """The RATIOS rows that some backend and model has."""
    have = {k for res in results.values() if "error" not in res for e in res["models"].values()
            for k in e.get("ratios", {})}
    return [row for row in RATIOS if f"{row[0]}/{row[1]}" in have]


def _mixed_report(p, results):
    mixed = [(num, den, label) for num, den, label, _ in _ratio_rows(results)
             if num in MIXED_CONFIGS or den in MIXED_CONFIGS]
    if not mixed:
        return
    p("\nRatios of configurations that skip the perturbed pass on some steps ("
      + ", ".join(label for _, _, label in mixed)
      + ") are of the repetitions' mean steps, not their median steps. For each: the fraction f of timed "
      "steps that ran the perturbed pass (known in advance, or, for "
      + ", ".join(MEASURED_SAM_STEPS) + ", as its diagnostics logged it), and 1 + f (SAM/plain - 1), what "
      "those steps alone cost (SAM/plain of the pooled mean steps):")
    for backend, res in results.items():
        if "error" in res:
            continue
        for model_name, entry in res["models"].items():
            parts = []
            for num, den, label in mixed:
                r = entry["ratios"].get(f"{num}/{den}")
                if r is None or "sam_step_fraction" not in r:
                    continue
                part = f"{label} {r['median']:.2f} (f {r['sam_step_fraction']:.2f}"
                if "expected_from_fraction" in r:
                    part += f", expected {r['expected_from_fraction']:.2f}"
                parts.append(part + ")")
            if parts:
                p(f"{backend:<11} {model_name:<7} " + "; ".join(parts))
    _step_kind_report(p, results)


def _step_kind_report(p, results):
    """Median perturbed and skipped steps of the configurations whose steps are
    known in advance, against SAM's and plain's median steps (ms)."""
    lines = []
    for backend, res in results.items():
        if "error" in res:
            continue
        for model_name, entry in res["models"].items():
            cfgs = entry["configs"]
            parts = [f"{ref} {cfgs[ref]['step_s']['median'] * 1e3:.1f}" for ref in ("plain", "sam") if ref in cfgs]
            for name, c in cfgs.items():
                kinds = c.get("step_kind_median_s")
                if kinds:
                    parts.append(f"{name} {kinds['perturbed'] * 1e3:.1f}/{kinds['skipped'] * 1e3:.1f}")
            if len(parts) > 2:
                lines.append(f"{backend:<11} {model_name:<7} " + "; ".join(parts))
    if lines:
        p("\nMedian step by kind, ms: plain and sam, then each mixed configuration's perturbed/skipped steps "
          "(a perturbed step above SAM's, or a skipped one above plain's, is the configuration's own overhead):")
        for line in lines:
            p(line)


def _memory_report(p, results, meta):
    p(f"\nMemory of a SAM step minus a plain step, in MiB and in trainable-weight sizes "
      f"(target <= ~{MEMORY_TARGET_WEIGHTS:.0f}x). RSS step peak: above the RSS between steps; "
      "RSS total peak: above the RSS before fit (adds optimizer slots, kept gradients, compiled code); "
      "XLA: the compiled step's buffers (exact). No RSS verdict for weights under "
      f"{RSS_VERDICT_MIN_WEIGHT_MIB:.0f} MiB: below the RSS noise.")
    for backend, res in results.items():
        if "error" in res:
            continue
        for model_name, entry in res["models"].items():
            m = entry.get("memory_sam_vs_plain") or {}
            parts = []
            rss_ok = entry["trainable_weight_bytes"] / 2**20 >= RSS_VERDICT_MIN_WEIGHT_MIB
            for label, name in (("rss_step_peak", "RSS step peak"), ("rss_total_peak", "RSS total peak")):
                if f"{label}_extra_mib" in m:
                    parts.append(f"{name} {m[f'{label}_extra_mib']:+.1f} MiB = "
                                 f"{m[f'{label}_extra_weights']:+.2f}x"
                                 + (_verdict(m[f"{label}_extra_weights"], meta) if rss_ok else ""))
            if "xla_peak_extra_mib" in m:
                parts.append(f"XLA {m['xla_peak_extra_mib']:+.2f} MiB = {m['xla_peak_extra_weights']:+.2f}x"
                             + _verdict(m["xla_peak_extra_weights"], meta))
            if "device_peak_extra_weights" in m:
                parts.append(f"device {m['device_peak_extra_weights']:+.2f}x weights")
            p(f"{backend:<11} {model_name:<7} " + ("; ".join(parts) if parts else "not measured"))


def _one_pass_memory_report(p, results, meta):
    present = [(f"{num}/{den}", label, step, state) for num, den, label, step, state in MEMORY_COMPARISONS
               if any(f"{num}/{den}" in e.get("memory_one_pass", {}) for res in results.values()
                      if "error" not in res for e in res["models"].values())]
    if not present:
        return
    p("\nOne-pass variants against their reference, in trainable-weight sizes: extra persistent optimizer "
      "state (exact: the bytes of optimizer.variables) and extra transient step memory (RSS step peak; XLA temp "
      "bytes on JAX). Targets: " + "; ".join(f"{label} ({key}) state <= {state:g}, step <= {step:g}"
                                            for key, label, step, state in present))
    for backend, res in results.items():
        if "error" in res:
            continue
        for model_name, entry in res["models"].items():
            parts = []
            targets = entry.get("targets", {})
            for key, label, _, _ in present:
                m = entry.get("memory_one_pass", {}).get(key)
                if not m:
                    continue
                cell = f"{label}:"
                for name, value_key, target_key in (
                        ("state", "state_extra_weights", f"memory_state/{key}"),
                        ("RSS step", "rss_step_peak_extra_weights", f"memory_step/rss_step_peak/{key}"),
                        ("XLA temp", "xla_temp_extra_weights", f"memory_step/xla_temp/{key}")):
                    if m.get(value_key) is None:
                        continue
                    cell += f" {name} {m[value_key]:+.2f}x"
                    t = targets.get(target_key)
                    if t is not None and meta["mode"] != "smoke":
                        cell += " ok" if t["met"] else " MISS"
                parts.append(cell)
            if parts:
                p(f"{backend:<11} {model_name:<7} " + "; ".join(parts))


def _traces_report(p, results):
    p("\nTraces: train_step calls after the warm-up epoch / at the end; equal = no retracing "
      "(tensorflow, jax; torch runs eagerly, except with jit_compile=True: the graphs torch.compile compiled). "
      "Decision: how a step decides whether to run the perturbed pass (host: host dispatch, two compiled "
      "steps; conditional: in the step; static: known when tracing).")
    retraced = [
        f"{b}/{m}/{n}"
        for b, res in results.items() if "error" not in res
        for m, e in res["models"].items()
        for n, c in e["configs"].items()
        if c["traces"] and c["traces"]["meaningful"] and c["traces"]["retraces_after_warmup"]
    ]
    p("retracing after warm-up: " + (", ".join(retraced) if retraced else "none"))


def plot(results, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({m for r in results.values() if "error" not in r for m in r["models"]},
                    key=lambda m: MODELS.index(m) if m in MODELS else 99)
    backends = [b for b, r in results.items() if "error" not in r]
    if not models or not backends:
        return False
    rows = _ratio_rows(results)
    fig, axes = plt.subplots(1, len(models), figsize=(max(6.5, 0.2 * len(rows) * len(backends)) * len(models), 4.5),
                             squeeze=False)
    width = 0.8 / max(len(rows), 1)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#7f7f7f",
              "#17becf", "#bcbd22", "#e377c2", "#8c564b", "#d62728",
              "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"]
    for ax, model_name in zip(axes[0], models):
        for i, (num, den, label, _) in enumerate(rows):
            xs, ys, lo, hi = [], [], [], []
            for j, b in enumerate(backends):
                r = results[b]["models"].get(model_name, {}).get("ratios", {}).get(f"{num}/{den}")
                if r is None:
                    continue
                xs.append(j + (i - (len(rows) - 1) / 2) * width)
                ys.append(r["median"])
                lo.append(r["median"] - r["min"])
                hi.append(r["max"] - r["median"])
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, color=colors[i % len(colors)],
                       label=PEER_LEGEND if num == "peer_sam" else label)
                for xv, b in zip(xs, [b for b in backends if results[b]["models"].get(model_name, {})
                                      .get("ratios", {}).get(f"{num}/{den}")]):
                    t = results[b]["models"][model_name].get("targets", {}).get(f"{num}/{den}")
                    if t is not None:
                        ax.hlines(t["max"], xv - width / 2, xv + width / 2, colors="red", lw=1.5)
                for xv, yv, up in zip(xs, ys, hi):
                    ax.text(xv, yv + up, f"{yv:.2f}", ha="center", va="bottom", fontsize=6, rotation=90)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(2.0, color="k", lw=0.8, ls=":")
        ax.set_xticks(range(len(backends)))
        ax.set_xticklabels(backends)
        ax.set_title(f"{model_name}: step-time ratios (bars: median, whiskers: min-max over reps, "
                     "red: target)", fontsize=9)
        ax.set_ylabel("ratio of median step times")
    axes[0][0].legend(fontsize=7, loc="upper left")
    title = f"keras_ssam benchmark ({meta['mode']}, batch {meta['batch_size']}, {meta['machine']})"
    if meta["mode"] == "smoke":
        title += " - SMOKE: numbers meaningless"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

"""Cheaper sharpness-aware training on scikit-learn's digits: LookSAM, randomized and late-phase SAM.

    KERAS_BACKEND=jax python examples/efficient_sam.py --out docs/results     # ~20 minutes on 2 CPU cores
    KERAS_BACKEND=jax python examples/efficient_sam.py --quick                # seconds (CI smoke test)
    python examples/efficient_sam.py --methods SGD,SAM,LookSAM --seeds 0,1 --lrs 0.1

A SAM step runs two forward-backward passes; the variants here skip the
second (perturbed) pass on most steps:

  LookSAM         keras_ssam.LookSAM(k=5): the perturbed pass every 5th step;
                  in between, the clean gradient plus the stored part of the
                  last SAM gradient orthogonal to it (Liu et al., CVPR 2022).
  LookSAM-stable  the same with SSAM's ascent and renormalization
                  (normalize=False, stable=True): every update has the
                  clean gradient's norm.
  LookSAM-a0.3    LookSAM with alpha=0.3 instead of the default 0.7: the
                  reused direction is added with norm alpha ||g||, so alpha
                  sets how far a stale direction pushes between SAM steps.
  RST-SAM/SSAM    sam_probability=0.5: each step runs the perturbed pass
                  with probability 1/2 (randomized SAM, Zhao et al. 2022).
  late-SAM/SSAM   sam_probability = a step function of the iteration count:
                  plain SGD for the first 70% of the epochs, SAM/SSAM for the
                  last 30%.

against plain SGD, SAM and SSAM, on the small CNN and the train/test split
of examples/quickstart.py, 3 seeds (the seed sets the initial weights, the
batch order and the sam_probability draws; the split is fixed). Every method
uses SGD with momentum 0.9 as base; rho is the learning-rate sweep's
(examples/lr_sweep_digits.py): 0.05 for the normalized ascent (SAM, LookSAM,
RST-SAM, late-SAM), 0.5 for the unnormalized one (SSAM and its variants,
whose radius is rho ||g||). Two learning rates: 0.1, where SGD works, and
0.2, where in the sweep SGD (and USAM) fail, SAM degrades and SSAM works:
does a cheap variant keep SSAM's stability there?

Reported per method and learning rate: test accuracy (mean +- std over
seeds; runs that failed: training loss at the final weights NaN or > 2.0),
the fraction of steps that ran the perturbed pass (`sam_step_fraction`,
logged by `SAMModel(diagnostics=True)`), wall time per epoch relative to
SGD (each run's median epoch, epoch 1 excluded for compilation, averaged
over seeds, divided by SGD's; every SAM-family run logs its diagnostics,
SGD is a plain keras.Model), and at --flatness-lr the top eigenvalue of the
training loss's Hessian at the final weights
(`keras_ssam.flatness.hessian_top_eigenvalue`, power iteration on
--flatness-examples training examples, for the seeds in --flatness-seeds).

Outputs (under --out, default results/): efficient_sam.json (every number
and every run's history), efficient_sam.png ((a) accuracy per method at each
learning rate, (b) accuracy against relative time per epoch, (c) the
fraction of SAM steps per epoch, seed 0); the table is printed (in
markdown) and saved in the JSON. Timings on a tiny model are dominated by per-step
overhead (dispatch, the input pipeline, the diagnostics), which the skipped
passes do not remove: they understate the savings on a real network, where
the passes dominate (see benchmarks/ for step times on larger models).
"""

import argparse
import json
import os
import time

import keras
import numpy as np
from keras import ops
from lr_sweep_digits import floats, ints  # the sweep's argument parsers
from quickstart import EpochTimer, build_cnn, load_data  # same data split and network as the quick start

import keras_ssam
from keras_ssam import flatness

METHODS = ("SGD", "SAM", "SSAM", "LookSAM", "LookSAM-stable", "LookSAM-a0.3", "RST-SAM",
           "RST-SSAM", "late-SAM", "late-SSAM")
FAILED_LOSS = 2.0
LOOKSAM_K = 5
LOOKSAM_ALPHA = 0.7  # the paper's and keras_ssam's default
LOOKSAM_SMALL_ALPHA = 0.3
RST_PROBABILITY = 0.5
LATE_FRACTION = 0.3  # SAM in the last 30% of the epochs


def color(method, methods):
    i = list(methods).index(method)
    return f"C{i}" if i < 10 else ("k", "grey", "olive")[(i - 10) % 3]


def late_phase(start):
    """sam_probability of late-phase SAM: 0 before iteration `start`, 1 from
    it on (a step function of the iteration count, a float tensor)."""

    def probability(iteration):
        return ops.cast(ops.greater_equal(iteration, start), "float32")

    return probability


def make_optimizer(method, lr, seed, late_start, args):
    base = keras.optimizers.SGD(learning_rate=lr, momentum=0.9)
    sam, ssam = args.rho_sam, args.rho_ssam
    if method == "SGD":
        return base
    if method == "SAM":
        return keras_ssam.SAM(base, rho=sam)
    if method == "SSAM":
        return keras_ssam.SSAM(base, rho=ssam)
    if method == "LookSAM":
        return keras_ssam.LookSAM(base, rho=sam, k=args.k, alpha=LOOKSAM_ALPHA)
    if method == "LookSAM-stable":
        return keras_ssam.LookSAM(base, rho=ssam, k=args.k, alpha=LOOKSAM_ALPHA,
                                  normalize=False, stable=True)
    if method == "LookSAM-a0.3":
        return keras_ssam.LookSAM(base, rho=sam, k=args.k, alpha=LOOKSAM_SMALL_ALPHA)
    if method == "RST-SAM":
        return keras_ssam.SAM(base, rho=sam, sam_probability=RST_PROBABILITY, seed=seed)
    if method == "RST-SSAM":
        return keras_ssam.SSAM(base, rho=ssam, sam_probability=RST_PROBABILITY, seed=seed)
    if method == "late-SAM":
        return keras_ssam.SAM(base, rho=sam, sam_probability=late_phase(late_start), seed=seed)
    if method == "late-SSAM":
        return keras_ssam.SSAM(base, rho=ssam, sam_probability=late_phase(late_start), seed=seed)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def train(method, lr, seed, data, args, make=make_optimizer):
    x_train, x_test, y_train, y_test = data
    steps_per_epoch = -(-len(x_train) // args.batch_size)
    # Late phase: from the first step of epoch round(0.7 * epochs) (0-based) on.
    late_start = round((1 - LATE_FRACTION) * args.epochs) * steps_per_epoch
    keras.utils.set_random_seed(seed)  # same initial weights and batch order per seed
    model = build_cnn()
    if method != "SGD":
        model = keras_ssam.SAMModel(model, diagnostics=True)
    model.compile(
        optimizer=make(method, lr, seed, late_start, args),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    timer = EpochTimer()
    history = model.fit(
        x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
        callbacks=[keras.callbacks.TerminateOnNaN(), timer], verbose=0,
    )
    losses = history.history["loss"]
    _, accuracy = model.evaluate(x_test, y_test, verbose=0, batch_size=512)
    final, _ = model.evaluate(x_train, y_train, verbose=0, batch_size=512)
    failed = bool(len(losses) < args.epochs or not np.isfinite(final) or final > FAILED_LOSS)
    steady = timer.times[1:] or timer.times  # epoch 1 includes tracing and compilation
    fractions = history.history.get("sam_step_fraction", [0.0] * len(losses))
    run = {
        "method": method,
        "lr": lr,
        "seed": seed,
        "test_accuracy": float(accuracy),
        "final_train_loss": float(final),
        "failed": failed,
        "epoch_seconds": [float(t) for t in timer.times],
        "epoch_seconds_median": float(np.median(steady)),
        # Epoch means over equally many steps (the last batch included): the
        # run's fraction of steps that ran the perturbed pass is their mean.
        "sam_step_fraction": float(np.mean(fractions)),
        "late_start_iteration": late_start if method.startswith("late") else None,
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
    }
    return model, run


def summarize(runs, methods, lrs):
    rows = []
    for lr in lrs:
        sgd = [r["epoch_seconds_median"] for r in runs if r["method"] == "SGD" and r["lr"] == lr]
        for method in methods:
            rs = [r for r in runs if r["method"] == method and r["lr"] == lr]
            if not rs:
                continue
            accs = np.array([r["test_accuracy"] for r in rs])
            seconds = float(np.mean([r["epoch_seconds_median"] for r in rs]))
            eigs = [r["top_eigenvalue"] for r in rs if r.get("top_eigenvalue") is not None]
            rows.append({
                "method": method,
                "lr": lr,
                "mean": float(accs.mean()),
                "std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
                "min": float(accs.min()),
                "max": float(accs.max()),
                "n": len(rs),
                "failed": int(sum(r["failed"] for r in rs)),
                "sam_step_fraction": float(np.mean([r["sam_step_fraction"] for r in rs])),
                "epoch_seconds": seconds,
                "time_vs_sgd": seconds / float(np.mean(sgd)) if sgd else None,
                "top_eigenvalue_mean": float(np.mean(eigs)) if eigs else None,
                "top_eigenvalue_std": float(np.std(eigs, ddof=1)) if len(eigs) > 1 else None,
                "top_eigenvalue_n": len(eigs),
            })
    return rows


def accuracy_cell(row):
    cell = f"{row['mean']:.3f} +- {row['std']:.3f}"
    if row["failed"]:
        cell += f" ({row['failed']} failed)"
    return cell


def markdown_table(rows, lrs, flat_lr):
    """One row per method: accuracy at each lr, SAM-step fraction and time
    per epoch vs SGD (at the first lr), top Hessian eigenvalue at flat_lr."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["lr"]): r for r in rows}
    t_lr = lrs[0]
    head = ["method"] + [f"test acc, lr {lr:g}" for lr in lrs] + [
        "SAM steps", f"time/epoch vs SGD (lr {t_lr:g})", f"top Hessian eig (lr {flat_lr:g})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        cells = [m]
        for lr in lrs:
            cells.append(accuracy_cell(by[(m, lr)]) if (m, lr) in by else "-")
        r0 = by.get((m, t_lr))
        cells.append(f"{r0['sam_step_fraction']:.2f}" if r0 else "-")
        cells.append(f"{r0['time_vs_sgd']:.2f}" if r0 and r0["time_vs_sgd"] is not None else "-")
        rf = by.get((m, flat_lr))
        if rf and rf["top_eigenvalue_mean"] is not None:
            eig = f"{rf['top_eigenvalue_mean']:.2f}"
            if rf["top_eigenvalue_std"] is not None:
                eig += f" +- {rf['top_eigenvalue_std']:.2f}"
            if rf["top_eigenvalue_n"] == 1:
                eig += " (1 seed)"
            cells.append(eig)
        else:
            cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measure_flatness(models, data, args):
    x_train, _, y_train, _ = data
    n = min(args.flatness_examples, len(x_train))
    x, y = x_train[:n], y_train[:n]
    for run, model in models:
        start = time.perf_counter()
        if np.isfinite(run["final_train_loss"]):
            run["top_eigenvalue"] = float(flatness.hessian_top_eigenvalue(
                model, x, y, num_iterations=args.power_iterations, seed=0))
        else:
            run["top_eigenvalue"] = None
        run["flatness_seconds"] = time.perf_counter() - start
        print(f"  {run['method']:<15} seed {run['seed']}: top Hessian eigenvalue "
              f"{run['top_eigenvalue']}", flush=True)
    return n


def plot(rows, runs, methods, lrs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        pts = [(j, r) for j, lr in enumerate(lrs) for r in rows if r["method"] == m and r["lr"] == lr]
        if pts:
            ax.bar([j + (i - (len(methods) - 1) / 2) * width for j, _ in pts], [r["mean"] for _, r in pts],
                   width, yerr=[r["std"] for _, r in pts], capsize=2, color=color(m, methods), label=m)
    ax.set_xticks(range(len(lrs)))
    ax.set_xticklabels([f"lr {lr:g}" for lr in lrs])
    ax.set_ylabel("test accuracy (mean +- std over seeds)")
    ax.axhline(0.1, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0, 1.3)
    ax.set_title("(a) accuracy per method and learning rate")
    ax.legend(fontsize=7, ncol=3, loc="upper center")

    ax = axes[1]
    for r in rows:
        if r["lr"] != lrs[0] or r["time_vs_sgd"] is None:
            continue
        ax.errorbar(r["time_vs_sgd"], r["mean"], yerr=r["std"], marker="o", capsize=3,
                    color=color(r["method"], methods))
        ax.annotate(r["method"], (r["time_vs_sgd"], r["mean"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("wall time per epoch / SGD's")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"(b) accuracy vs cost at lr {lrs[0]:g}")

    ax = axes[2]
    seed = min(r["seed"] for r in runs)
    for m in methods:
        run = next((r for r in runs if r["method"] == m and r["lr"] == lrs[0] and r["seed"] == seed), None)
        if run and "sam_step_fraction" in run["history"]:
            f = run["history"]["sam_step_fraction"]
            ax.plot(range(1, len(f) + 1), f, marker=".", color=color(m, methods), label=m)
    ax.set_xlabel("epoch")
    ax.set_ylabel("fraction of steps with the perturbed pass")
    ax.set_title(f"(c) SAM steps per epoch (lr {lrs[0]:g}, seed {seed})")
    ax.set_ylim(-0.05, 1.05)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.suptitle(f"digits CNN, backend {keras.backend.backend()}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(methods_known=METHODS, make=make_optimizer, name="efficient_sam", description=__doc__):
    """The comparison's command line; other examples run it with their own
    methods (`make(method, lr, seed, late_start, args)` builds the
    optimizer) and output name."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--methods", default=",".join(methods_known),
                        help=f"comma-separated, from {','.join(methods_known)} (SGD is the time reference)")
    parser.add_argument("--lrs", type=floats, default=floats("0.1,0.2"),
                        help="learning rates; times are relative to SGD at the first")
    parser.add_argument("--seeds", type=ints, default=ints("0,1,2"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-examples", type=int, default=None,
                        help="train on the first N training examples (default: all 1347)")
    parser.add_argument("--rho-sam", type=float, default=0.05, help="rho of the normalized ascent")
    parser.add_argument("--rho-ssam", type=float, default=0.5, help="rho of the unnormalized ascent")
    parser.add_argument("--k", type=int, default=LOOKSAM_K, help="LookSAM's period")
    parser.add_argument("--flatness-lr", type=float, default=None,
                        help="learning rate whose minima are measured (default: the first)")
    parser.add_argument("--flatness-seeds", type=ints, default=None,
                        help="seeds whose minima are measured (default: all)")
    parser.add_argument("--flatness-examples", type=int, default=1000)
    parser.add_argument("--power-iterations", type=int, default=20)
    parser.add_argument("--out", default="results")
    parser.add_argument("--quick", action="store_true",
                        help="1 lr, 1 seed, 2 epochs on 320 examples, tiny flatness (smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.lrs, args.seeds, args.epochs, args.train_examples = args.lrs[:1], [0], 2, 320
        args.flatness_examples, args.power_iterations = 128, 2
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(methods_known))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {','.join(methods_known)}")
    if not args.lrs or not args.seeds:
        parser.error("--lrs and --seeds need at least one value each")
    flat_lr = args.lrs[0] if args.flatness_lr is None else args.flatness_lr
    if flat_lr not in args.lrs:
        parser.error(f"--flatness-lr {flat_lr} is not in --lrs {args.lrs}")
    flat_seeds = args.seeds if args.flatness_seeds is None else args.flatness_seeds

    start = time.perf_counter()
    data = load_data()
    if args.train_examples is not None:
        data[0], data[2] = data[0][: args.train_examples], data[2][: args.train_examples]
    print(
        f"backend {keras.backend.backend()}, train/test {len(data[0])}/{len(data[1])}, "
        f"methods {methods}, lrs {args.lrs}, seeds {args.seeds}, epochs {args.epochs}, "
        f"rho {args.rho_sam} (normalized) / {args.rho_ssam} (unnormalized), LookSAM k {args.k}"
    )
    runs, kept = [], []
    for lr in args.lrs:
        for seed in args.seeds:
            for method in methods:  # methods interleaved: a slow phase of the machine hits all
                model, run = train(method, lr, seed, data, args, make)
                runs.append(run)
                if lr == flat_lr and seed in flat_seeds:
                    kept.append((run, model))
                print(
                    f"  {method:<15} lr {lr:<5g} seed {seed}: test acc {run['test_accuracy']:.4f}"
                    f"  SAM steps {run['sam_step_fraction']:.2f}"
                    f"  {run['epoch_seconds_median']:.2f} s/epoch{'  FAILED' if run['failed'] else ''}",
                    flush=True,
                )
    train_seconds = time.perf_counter() - start
    print(f"\nTop Hessian eigenvalue of the training loss at lr {flat_lr:g} (seeds {flat_seeds})")
    n_flat = measure_flatness(kept, data, args)
    del kept

    rows = summarize(runs, methods, args.lrs)
    table = markdown_table(rows, args.lrs, flat_lr)
    note = (
        f"Digits CNN, SGD momentum 0.9, {args.epochs} epochs, batch {args.batch_size}, seeds "
        f"{','.join(map(str, args.seeds))}, backend {keras.backend.backend()}. Test accuracy mean +- "
        f"std over seeds (failed: training loss at the final weights NaN or > {FAILED_LOSS}); SAM steps: "
        f"fraction of steps that ran the perturbed pass; time per epoch: median epoch (epoch 1 "
        f"excluded) over SGD's; top Hessian eigenvalue: mean +- std over seeds "
        f"{','.join(map(str, flat_seeds))}, {n_flat} training examples, {args.power_iterations} power "
        "iterations."
    )
    print("\n" + note + "\n\n" + table)

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, f"{name}.png")
    plot(rows, runs, methods, args.lrs, png)
    total = time.perf_counter() - start
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(
            {
                "backend": keras.backend.backend(),
                "keras": keras.__version__,
                "args": vars(args),
                "flatness_lr": flat_lr,
                "flatness_seeds": flat_seeds,
                "summary": rows,
                "table_markdown": table,
                "runs": runs,
                "train_seconds": train_seconds,
                "total_seconds": total,
            },
            f,
            indent=1,
        )
    print(f"\nsaved {png} and {name}.json; training {train_seconds:.0f} s, "
          f"total {total:.0f} s")


if __name__ == "__main__":
    main()

"""Does it pay for itself? SAM variants that cost (nearly) one pass, against SGD given the same compute.

    KERAS_BACKEND=jax python examples/plain_cost_sam.py --out docs/results    # ~20 minutes on 2 shared CPU cores
    KERAS_BACKEND=jax python examples/plain_cost_sam.py --quick               # a minute (CI smoke test)
    python examples/plain_cost_sam.py --datasets madelon --methods SGD,SAM,MomentumSAM --seeds 0,1

A SAM step runs two forward-backward passes. The methods compared here run
fewer, on average:

  SGD          SGD with momentum 0.9 (the base of every other method): 1 pass.
  SAM          keras_ssam.SAM(rho=0.05): 2 passes (Foret et al., ICLR 2021).
  SSAM         keras_ssam.SSAM(rho=0.5): 2 passes, the unnormalized ascent
               e = rho g and the update rescaled to ||g||.
  MomentumSAM  keras_ssam.MomentumSAM(rho=0.3): 1 pass, at w - rho v/||v||,
               v the base SGD's momentum (Becker et al., 2024).
  RandomSAM    keras_ssam.RandomSAM(sigma=0.01): 1 pass, at w plus
               filter-wise Gaussian noise (RWP; Li et al., TMLR 2024).
  AE-SSAM      SSAM with sam_probability=schedules.AdaptiveSteps(total
               steps): the perturbed pass only on steps whose squared
               clean-gradient norm is large (AE-SAM; Jiang et al., ICLR 2023).
  LookSAM      keras_ssam.LookSAM(rho=0.05, k=5, alpha=0.3): the perturbed
               pass every 5th step, a reused direction in between (Liu et
               al., CVPR 2022; alpha 0.3, not the paper's 0.7: see
               examples/efficient_sam.py).
  late-SSAM    SSAM with sam_probability=schedules.LatePhase(start): plain
               steps for the first 70% of the epochs (Zhou et al., ICLR 2025).

on two problems that ship with scikit-learn (nothing is downloaded):

  digits       the quick start's 8x8 digits, train/test split and small CNN
               (examples/quickstart.py), 10 classes.
  madelon      sklearn.datasets.make_classification, the generator of the
               NIPS 2003 feature-selection challenge's MADELON (Guyon 2003):
               3000 examples, 40 features of which 10 informative, 4
               classes, 10% of the labels flipped; standardized, a stratified
               75/25 split (random_state 0); an MLP 40-64-64-4.

Every method trains --epochs epochs (10) at each learning rate (0.1, where
SGD works on digits; 0.2, where it starts to fail), batch 32, for each of 5
seeds (the seed sets the initial weights, the batch order and the methods'
draws).

Reported per dataset, method and learning rate:

  * test accuracy, mean +- std over seeds; a run "failed" when its training
    loss at the final weights is NaN or above chance (ln of the class count);
  * gradient evaluations (forward-backward passes) per step: 1 for SGD and
    the one-pass variants, 1 + f for a two-pass method that runs the
    perturbed pass on a fraction f of its steps (f logged by
    `SAMModel(diagnostics=True)`; a one-pass variant's single pass is its
    perturbed one);
  * wall time per epoch relative to SGD's (each run's median epoch, epoch 1
    excluded for compilation, averaged over seeds);
  * SGD at an equal budget: SGD is also trained for ceil(--budget-factor x
    epochs) epochs (the "SGD-budget" runs, same seeds), its test accuracy
    read after every epoch; a method's equal-time budget is
    floor(epochs x its time per epoch / SGD's) SGD epochs (its total
    steady-state training time, compilation excluded), its equal-gradient
    budget round(epochs x passes per step) SGD epochs. If the method beats
    SGD given its time, the extra pass paid for itself;
  * the top eigenvalue of the training loss's Hessian at the final weights
    (`keras_ssam.flatness.hessian_top_eigenvalue`, power iteration on
    --flatness-examples training examples, --flatness-seeds, power-iteration
    seed 0), at --flatness-lr.

Outputs, under --out (default results/): plain_cost_sam.json (every number,
every run's history) and plain_cost_sam.png (per dataset: (a) accuracy per
method and learning rate, SGD at each method's equal-time budget marked; (b)
accuracy against compute at the first learning rate, SGD's accuracy after
each epoch as a curve; (c) the top Hessian eigenvalue); the markdown tables
are printed and saved in the JSON. On models this small a step's time is
mostly per-step overhead (dispatch, the input pipeline, the diagnostics), so
the time ratios understate what a skipped pass saves on a network where the
passes dominate: see benchmarks/ for step times on larger models.
"""

import argparse
import json
import math
import os
import time

import keras
import numpy as np
from efficient_sam import LATE_FRACTION, LOOKSAM_K, accuracy_cell, color, measure_flatness, summarize
from lr_sweep_digits import floats, ints  # the sweep's argument parsers
from quickstart import EpochTimer, build_cnn, load_data  # the digits split and CNN

import keras_ssam
from keras_ssam import schedules

METHODS = ("SGD", "SAM", "SSAM", "MomentumSAM", "RandomSAM", "AE-SSAM", "LookSAM", "late-SSAM")
DATASETS = ("digits", "madelon")
BUDGET = "SGD-budget"  # the long SGD runs that give SGD's accuracy at any budget
LOOKSAM_ALPHA = 0.3
# make_classification's MADELON-style problem (Guyon 2003); fixed: the seeds
# vary the training, not the data.
MADELON = {"n_samples": 3000, "n_features": 40, "n_informative": 10, "n_classes": 4, "flip_y": 0.1,
           "random_state": 0}


def load_madelon(n_samples=None):
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    spec = dict(MADELON, n_samples=n_samples or MADELON["n_samples"])
    x, y = make_classification(**spec)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    scaler = StandardScaler().fit(x_train)
    return [scaler.transform(x_train).astype("float32"), scaler.transform(x_test).astype("float32"),
            y_train, y_test]


def build_mlp():
    return keras.Sequential([
        keras.Input((MADELON["n_features"],)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(MADELON["n_classes"], activation="softmax"),
    ])


def dataset(name, quick):
    """(data [x_train, x_test, y_train, y_test], model builder, class count)."""
    if name == "digits":
        data = load_data()
        if quick:
            data[0], data[2] = data[0][:320], data[2][:320]
        return data, build_cnn, 10
    if name == "madelon":
        return load_madelon(400 if quick else None), build_mlp, MADELON["n_classes"]
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")


def make_optimizer(method, lr, seed, total_steps, args):
    base = keras.optimizers.SGD(learning_rate=lr, momentum=0.9)
    if method in ("SGD", BUDGET):
        return base
    if method == "SAM":
        return keras_ssam.SAM(base, rho=args.rho_sam)
    if method == "SSAM":
        return keras_ssam.SSAM(base, rho=args.rho_ssam)
    if method == "MomentumSAM":
        return keras_ssam.MomentumSAM(base, rho=args.rho_msam)
    if method == "RandomSAM":
        return keras_ssam.RandomSAM(base, sigma=args.sigma, seed=seed)
    if method == "AE-SSAM":
        return keras_ssam.SSAM(base, rho=args.rho_ssam,
                               sam_probability=schedules.AdaptiveSteps(total_steps=total_steps), seed=seed)
    if method == "LookSAM":
        return keras_ssam.LookSAM(base, rho=args.rho_sam, k=LOOKSAM_K, alpha=LOOKSAM_ALPHA)
    if method == "late-SSAM":
        # From the first step of epoch round(0.7 * epochs) (0-based) on.
        steps_per_epoch = total_steps // args.epochs
        start = round((1 - LATE_FRACTION) * args.epochs) * steps_per_epoch
        return keras_ssam.SSAM(base, rho=args.rho_ssam, sam_probability=schedules.LatePhase(start), seed=seed)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def train(method, lr, seed, data, build, num_classes, args):
    """One run; returns (model, run record). The SGD-budget run trains
    ceil(budget_factor x epochs) epochs and records the test accuracy after
    each (validation on the test split, outside the timed epoch)."""
    x_train, x_test, y_train, y_test = data
    steps_per_epoch = -(-len(x_train) // args.batch_size)
    epochs = math.ceil(args.budget_factor * args.epochs) if method == BUDGET else args.epochs
    keras.utils.set_random_seed(seed)  # same initial weights and batch order per seed
    model = build()
    optimizer = make_optimizer(method, lr, seed, args.epochs * steps_per_epoch, args)
    if method not in ("SGD", BUDGET):
        model = keras_ssam.SAMModel(model, diagnostics=True)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    timer = EpochTimer()
    history = model.fit(
        x_train, y_train, batch_size=args.batch_size, epochs=epochs, verbose=0,
        validation_data=(x_test, y_test) if method == BUDGET else None,
        callbacks=[keras.callbacks.TerminateOnNaN(), timer],
    )
    losses = history.history["loss"]
    _, accuracy = model.evaluate(x_test, y_test, verbose=0, batch_size=512)
    final, _ = model.evaluate(x_train, y_train, verbose=0, batch_size=512)
    chance = math.log(num_classes)
    fractions = history.history.get("sam_step_fraction", [0.0] * len(losses))
    # Epoch means over equally many steps: the run's fraction is their mean.
    fraction = float(np.mean(fractions))
    one_pass = bool(getattr(optimizer, "single_pass", False))
    run = {
        "method": method,
        "lr": lr,
        "seed": seed,
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "test_accuracy": float(accuracy),
        "final_train_loss": float(final),
        "failed": bool(len(losses) < epochs or not np.isfinite(final) or final > chance),
        "epoch_seconds": [float(t) for t in timer.times],
        "epoch_seconds_median": float(np.median(timer.times[1:] or timer.times)),
        "sam_step_fraction": fraction,
        "single_pass": one_pass,
        # Forward-backward passes per step: the clean pass, plus the perturbed
        # one on a fraction f of the steps; a one-pass variant's only pass is
        # its perturbed one.
        "gradient_evaluations_per_step": 1.0 if one_pass else 1.0 + fraction,
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
    }
    if method == BUDGET:
        run["test_accuracy_per_epoch"] = run["history"].get("val_accuracy", [])
    return model, run


def budget_accuracy(runs, row, budget_epochs_of):
    """SGD's test accuracy (mean, std over seeds) after the number of epochs
    `budget_epochs_of(method run, SGD run)` gives, per seed, from the
    SGD-budget runs; and whether a budget exceeded their length (capped)."""
    values, capped, epochs_used = [], False, []
    for r in runs:
        if r["method"] != row["method"] or r["lr"] != row["lr"]:
            continue
        sgd = next((s for s in runs if s["method"] == "SGD" and s["lr"] == r["lr"] and s["seed"] == r["seed"]), None)
        long = next((s for s in runs if s["method"] == BUDGET and s["lr"] == r["lr"] and s["seed"] == r["seed"]),
                    None)
        if sgd is None or long is None or not long["test_accuracy_per_epoch"]:
            continue
        curve = long["test_accuracy_per_epoch"]
        n = max(1, budget_epochs_of(r, sgd))
        if n > len(curve):
            capped, n = True, len(curve)
        values.append(curve[n - 1])
        epochs_used.append(n)
    if not values:
        return None
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "epochs": epochs_used, "capped": capped}


def add_budgets(rows, runs, epochs):
    """Adds to each summary row its passes per step and SGD's accuracy at
    the method's equal-time and equal-gradient-evaluation budgets."""
    for row in rows:
        rs = [r for r in runs if r["method"] == row["method"] and r["lr"] == row["lr"]]
        row["gradient_evaluations_per_step"] = float(np.mean([r["gradient_evaluations_per_step"] for r in rs]))
        row["sgd_at_equal_time"] = budget_accuracy(
            runs, row, lambda r, sgd: math.floor(epochs * r["epoch_seconds_median"]
                                                         / sgd["epoch_seconds_median"] + 1e-9))
        row["sgd_at_equal_gradients"] = budget_accuracy(
            runs, row, lambda r, sgd: round(epochs * r["gradient_evaluations_per_step"]))
    return rows


def budget_cell(b):
    if b is None:
        return "-"
    cell = f"{b['mean']:.3f} +- {b['std']:.3f} ({np.mean(b['epochs']):.3g} ep)"
    return cell + " capped" if b["capped"] else cell


def markdown_table(rows, lrs, flat_lr):
    """Per dataset: one row per (method, lr)."""
    head = ["method", "lr", "test acc", "grad evals/step", "time/epoch vs SGD", "SGD at equal time",
            "SGD at equal grad evals", f"top Hessian eig (lr {flat_lr:g})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lr in lrs:
        for row in (r for r in rows if r["lr"] == lr):
            eig = "-"
            if row["top_eigenvalue_mean"] is not None:
                eig = f"{row['top_eigenvalue_mean']:.3g}"
                if row["top_eigenvalue_std"] is not None:
                    eig += f" +- {row['top_eigenvalue_std']:.2g}"
            time_ratio = "-" if row["time_vs_sgd"] is None else f"{row['time_vs_sgd']:.2f}"
            lines.append("| " + " | ".join([
                row["method"], f"{lr:g}", accuracy_cell(row), f"{row['gradient_evaluations_per_step']:.2f}",
                time_ratio, budget_cell(row["sgd_at_equal_time"]) if row["method"] != "SGD" else "-",
                budget_cell(row["sgd_at_equal_gradients"]) if row["method"] != "SGD" else "-", eig]) + " |")
    return "\n".join(lines)


def plot(results, methods, lrs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(len(names), 3, figsize=(18, 4.8 * len(names)), squeeze=False)
    for axrow, name in zip(axes, names):
        rows, runs = results[name]["summary"], results[name]["runs"]
        ax = axrow[0]
        width = 0.8 / max(len(methods), 1)
        for i, m in enumerate(methods):
            pts = [(j, r) for j, lr in enumerate(lrs) for r in rows if r["method"] == m and r["lr"] == lr]
            if not pts:
                continue
            xs = [j + (i - (len(methods) - 1) / 2) * width for j, _ in pts]
            ax.bar(xs, [r["mean"] for _, r in pts], width, yerr=[r["std"] for _, r in pts], capsize=2,
                   color=color(m, methods), label=m)
            budget = [(x, r["sgd_at_equal_time"]["mean"]) for x, (_, r) in zip(xs, pts)
                      if m != "SGD" and r["sgd_at_equal_time"] is not None]
            if budget:
                ax.scatter(*zip(*budget), marker="_", s=60, color="k", zorder=3,
                           label="SGD at equal time" if i == 1 else None)
        ax.set_xticks(range(len(lrs)))
        ax.set_xticklabels([f"lr {lr:g}" for lr in lrs])
        ax.set_ylabel("test accuracy (mean +- std over seeds)")
        ax.set_ylim(0, 1.25)
        ax.set_title(f"(a) {name}: accuracy; black ticks: SGD given the method's time")
        ax.legend(fontsize=7, ncol=3, loc="upper center")

        ax = axrow[1]
        lr0 = lrs[0]
        curves = [r["test_accuracy_per_epoch"] for r in runs if r["method"] == BUDGET and r["lr"] == lr0]
        if curves:
            n = min(len(c) for c in curves)
            mean = np.mean([c[:n] for c in curves], axis=0)
            epochs = results[name]["epochs"]
            ax.plot(np.arange(1, n + 1) / epochs, mean, color="k", lw=1, label="SGD, epochs / E (seed mean)")
        for r in rows:
            if r["lr"] != lr0 or r["time_vs_sgd"] is None:
                continue
            ax.errorbar(r["time_vs_sgd"], r["mean"], yerr=r["std"], marker="o", capsize=3,
                        color=color(r["method"], methods))
            ax.scatter(r["gradient_evaluations_per_step"], r["mean"], marker="x", color=color(r["method"], methods))
            ax.annotate(r["method"], (r["time_vs_sgd"], r["mean"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel("compute relative to E epochs of SGD (o: wall time, x: gradient evaluations)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"(b) {name}: accuracy vs compute, lr {lr0:g}")
        ax.legend(fontsize=7, loc="lower right")

        ax = axrow[2]
        flat_lr = results[name]["flatness_lr"]
        eig_rows = [r for r in rows if r["lr"] == flat_lr and r["top_eigenvalue_mean"] is not None]
        ax.bar(range(len(eig_rows)), [r["top_eigenvalue_mean"] for r in eig_rows],
               yerr=[r["top_eigenvalue_std"] or 0 for r in eig_rows], capsize=2,
               color=[color(r["method"], methods) for r in eig_rows])
        ax.set_xticks(range(len(eig_rows)))
        ax.set_xticklabels([r["method"] for r in eig_rows], rotation=30, fontsize=8)
        ax.set_ylabel("top Hessian eigenvalue of the training loss")
        ax.set_title(f"(c) {name}: sharpness of the final weights, lr {flat_lr:g}")
    fig.suptitle(f"Plain-cost SAM variants against SGD given the same compute, backend {keras.backend.backend()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_dataset(name, methods, args, flat_lr, flat_seeds):
    data, build, num_classes = dataset(name, args.quick)
    print(f"\n== {name}: train/test {len(data[0])}/{len(data[1])}, {num_classes} classes", flush=True)
    runs, kept = [], []
    for lr in args.lrs:
        for seed in args.seeds:
            for method in [*methods, BUDGET]:  # interleaved: a slow phase of the machine hits all
                model, run = train(method, lr, seed, data, build, num_classes, args)
                run["dataset"] = name
                runs.append(run)
                if method != BUDGET and lr == flat_lr and seed in flat_seeds:
                    kept.append((run, model))
                print(f"  {method:<12} lr {lr:<4g} seed {seed}: test acc {run['test_accuracy']:.4f}  "
                      f"passes/step {run['gradient_evaluations_per_step']:.2f}  "
                      f"{run['epoch_seconds_median']:.3f} s/epoch{'  FAILED' if run['failed'] else ''}",
                      flush=True)
    print(f"  top Hessian eigenvalue at lr {flat_lr:g}, seeds {flat_seeds}:")
    n_flat = measure_flatness(kept, data, args)
    del kept
    rows = add_budgets(summarize(runs, methods, args.lrs), runs, args.epochs)
    return {"summary": rows, "runs": runs, "flatness_examples": n_flat, "flatness_lr": flat_lr,
            "epochs": args.epochs, "train_test": [len(data[0]), len(data[1])], "classes": num_classes,
            "table_markdown": markdown_table(rows, args.lrs, flat_lr)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from {','.join(METHODS)} (SGD is always run: the reference)")
    parser.add_argument("--lrs", type=floats, default=floats("0.1,0.2"),
                        help="learning rates; the plot's accuracy-vs-compute panel is at the first")
    parser.add_argument("--seeds", type=ints, default=ints("0,1,2,3,4"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--budget-factor", type=float, default=2.5,
                        help="the SGD-budget runs train ceil(factor x epochs) epochs")
    parser.add_argument("--rho-sam", type=float, default=0.05, help="rho of SAM and LookSAM")
    parser.add_argument("--rho-ssam", type=float, default=0.5, help="rho of SSAM, AE-SSAM and late-SSAM")
    parser.add_argument("--rho-msam", type=float, default=0.3, help="MomentumSAM's rho (the authors' SGD default)")
    parser.add_argument("--sigma", type=float, default=0.01, help="RandomSAM's relative noise scale")
    parser.add_argument("--flatness-lr", type=float, default=None, help="default: the first learning rate")
    parser.add_argument("--flatness-seeds", type=ints, default=ints("0,1,2"))
    parser.add_argument("--flatness-examples", type=int, default=1000)
    parser.add_argument("--power-iterations", type=int, default=20)
    parser.add_argument("--out", default="results")
    parser.add_argument("--quick", action="store_true",
                        help="1 lr, 1 seed, 2 epochs on ~300 training examples, tiny flatness (smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.lrs, args.seeds, args.epochs = args.lrs[:1], args.seeds[:1], 2
        args.flatness_seeds, args.flatness_examples, args.power_iterations = args.seeds, 128, 2
    methods = [m for m in args.methods.split(",") if m]
    methods = ["SGD"] + [m for m in methods if m != "SGD"]
    names = [d for d in args.datasets.split(",") if d]
    for kind, chosen, known in (("method", methods, METHODS), ("dataset", names, DATASETS)):
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            parser.error(f"unknown {kind}(s) {unknown}; choose from {','.join(known)}")
    if not args.lrs or not args.seeds:
        parser.error("--lrs and --seeds need at least one value each")
    flat_lr = args.lrs[0] if args.flatness_lr is None else args.flatness_lr
    if flat_lr not in args.lrs:
        parser.error(f"--flatness-lr {flat_lr} is not in --lrs {args.lrs}")

    start = time.perf_counter()
    print(f"backend {keras.backend.backend()}, datasets {names}, methods {methods}, lrs {args.lrs}, "
          f"seeds {args.seeds}, epochs {args.epochs} (SGD-budget {math.ceil(args.budget_factor * args.epochs)}), "
          f"load average {os.getloadavg()}")
    results = {name: run_dataset(name, methods, args, flat_lr, args.flatness_seeds) for name in names}
    note = (
        f"SGD momentum 0.9 base, {args.epochs} epochs, batch {args.batch_size}, seeds "
        f"{','.join(map(str, args.seeds))}, backend {keras.backend.backend()}. Test accuracy: mean +- std over "
        "seeds (failed: final training loss NaN or above chance, ln(classes)). Grad evals/step: forward-backward "
        "passes per step. Time/epoch: median epoch (epoch 1 excluded) over SGD's. SGD at equal time / grad evals: "
        "SGD's test accuracy after floor(E x time ratio) / round(E x grad evals) epochs (E = "
        f"{args.epochs}; 'capped': beyond the {math.ceil(args.budget_factor * args.epochs)} SGD-budget epochs). "
        f"Top Hessian eigenvalue: seeds {','.join(map(str, args.flatness_seeds))}, "
        f"{args.flatness_examples} training examples at most, {args.power_iterations} power iterations."
    )
    print("\n" + note)
    for name, res in results.items():
        print(f"\n### {name}\n\n{res['table_markdown']}")

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "plain_cost_sam.png")
    plot(results, methods, args.lrs, png)
    total = time.perf_counter() - start
    with open(os.path.join(args.out, "plain_cost_sam.json"), "w") as f:
        json.dump({"backend": keras.backend.backend(), "keras": keras.__version__, "args": vars(args),
                   "madelon": MADELON, "note": note, "results": results, "total_seconds": total,
                   "loadavg_end": os.getloadavg(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")},
                  f, indent=1)
    print(f"\nsaved {png} and plain_cost_sam.json; total {total:.0f} s")


if __name__ == "__main__":
    main()

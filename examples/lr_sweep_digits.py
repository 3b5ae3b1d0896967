"""Learning-rate sweep on scikit-learn's digits: SGD vs SAM vs SSAM (and USAM).

    KERAS_BACKEND=jax python examples/lr_sweep_digits.py             # a few minutes on 2 CPU cores
    KERAS_BACKEND=jax python examples/lr_sweep_digits.py --quick     # seconds (CI smoke test)
    python examples/lr_sweep_digits.py --lrs 0.01,0.1,1 --seeds 0,1,2,3 --epochs 15 --out results/
    python examples/lr_sweep_digits.py --methods SGD,SAM,SSAM           # the three-way comparison only

Trains a small CNN on the 8x8 digits that ship with scikit-learn (nothing is
downloaded) with each method, over a grid of learning rates and several seeds
(the seed sets the initial weights and the batch order, the same for every
method; the train/test split is fixed), and reports the test accuracy's mean
and spread at each point. All methods use the same base optimizer, SGD with
momentum 0.9; SAM perturbs by e = rho g / ||g|| (rho = --rho-sam), USAM and
SSAM by e = rho g (rho = --rho-ssam: ||e|| = rho ||g||, so rho is larger
than SAM's for a perturbation of similar size), and SSAM rescales the
perturbed gradient by gamma = ||g|| / ||g_asc|| (Tan et al., JMLR 2025,
arXiv 2401.07250).

Outputs (under --out, default results/):
  lr_sweep_digits.png   (a) test accuracy vs learning rate, mean +- std over
                        seeds, per method; (b) SSAM's renormalization factor
                        gamma per epoch (epoch mean, `diagnostics=True`), one
                        line per learning rate; (c) the sharpness diagnostic
                        (batch loss at w + e minus at w, each method with
                        its own e) per epoch at --flatness-lr.
  lr_sweep_digits.json  every number printed.
and three tables on stdout: the sweep, gamma per epoch, and the flatness of
the minima found at --flatness-lr (seed = the first seed): the top
eigenvalue of the training-loss Hessian (power iteration) and its trace
(Hutchinson), from `keras_ssam.flatness`, on --flatness-examples training
examples.

A run counts as failed when its training loss at the final weights is NaN
(training stops at a NaN, keras.callbacks.TerminateOnNaN) or above 2.0 (chance level is ln 10 = 2.30):
at large learning rates the network dies (dead ReLUs, loss stuck at ln 10)
rather than overflowing. Its test accuracy is that of its last weights.
Numbers are from a small model on a small dataset:
read them as a demonstration of the tools, and rerun on your own machine.
On a busy machine the torch backend can be much faster with
OMP_NUM_THREADS=1 (torch's CPU threads otherwise spin waiting for each other
on this tiny model).
"""

import argparse
import json
import os
import time

import keras
import numpy as np
from quickstart import build_cnn, load_data  # same data split and network as the quick start

import keras_ssam
from keras_ssam import flatness

METHODS = ("SGD", "SAM", "USAM", "SSAM")
FAILED_LOSS = 2.0
COLORS = {"SGD": "C0", "SAM": "C1", "USAM": "C2", "SSAM": "C3"}


def make_model(method, lr, args):
    base = keras.optimizers.SGD(learning_rate=lr, momentum=0.9)
    model = build_cnn()
    if method == "SGD":
        optimizer = base
    else:
        if method == "SAM":
            optimizer = keras_ssam.SAM(base, rho=args.rho_sam)
        elif method == "USAM":
            optimizer = keras_ssam.USAM(base, rho=args.rho_ssam)
        elif method == "SSAM":
            optimizer = keras_ssam.SSAM(base, rho=args.rho_ssam)
        else:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        model = keras_ssam.SAMModel(model, diagnostics=True)
    model.compile(
        optimizer=optimizer,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def train(method, lr, seed, data, args):
    x_train, x_test, y_train, y_test = data
    keras.utils.set_random_seed(seed)  # same initial weights and batch order per seed
    model = make_model(method, lr, args)
    history = model.fit(
        x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
        callbacks=[keras.callbacks.TerminateOnNaN()], verbose=0,
    )
    losses = history.history["loss"]
    _, accuracy = model.evaluate(x_test, y_test, verbose=0, batch_size=512)
    # The training loss at the final weights (history's is an epoch mean).
    final, _ = model.evaluate(x_train, y_train, verbose=0, batch_size=512)
    failed = bool(
        len(losses) < args.epochs or not np.isfinite(final) or final > FAILED_LOSS
    )
    run = {
        "method": method,
        "lr": lr,
        "seed": seed,
        "test_accuracy": float(accuracy),
        "final_train_loss": float(final),
        "failed": failed,
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
    }
    return model, run


def sweep_table(runs, methods, lrs):
    rows = []
    for method in methods:
        for lr in lrs:
            accs = np.array(
                [r["test_accuracy"] for r in runs if r["method"] == method and r["lr"] == lr]
            )
            failed = sum(r["failed"] for r in runs if r["method"] == method and r["lr"] == lr)
            rows.append(
                {
                    "method": method,
                    "lr": lr,
                    "mean": float(accs.mean()),
                    "std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
                    "min": float(accs.min()),
                    "max": float(accs.max()),
                    "n": int(len(accs)),
                    "failed": int(failed),
                }
            )
    return rows


def print_sweep(rows):
    print(
        "\nTest accuracy over seeds (std: sample standard deviation; failed: training "
        f"loss at the final weights NaN or > {FAILED_LOSS})"
    )
    print(f"{'method':<7}{'lr':>8}{'mean':>9}{'std':>9}{'min':>9}{'max':>9}{'seeds':>7}{'failed':>8}")
    for r in rows:
        print(
            f"{r['method']:<7}{r['lr']:>8g}{r['mean']:>9.4f}{r['std']:>9.4f}"
            f"{r['min']:>9.4f}{r['max']:>9.4f}{r['n']:>7d}{r['failed']:>8d}"
        )


def print_gamma(runs, lrs, seed):
    print(f"\nSSAM renormalization factor gamma = ||g|| / ||g_asc||, epoch means (seed {seed})")
    ssam = {r["lr"]: r for r in runs if r["method"] == "SSAM" and r["seed"] == seed}
    for lr in lrs:
        if lr not in ssam:
            continue
        gammas = ssam[lr]["history"].get("renorm_factor", [])
        print(f"  lr {lr:<8g}" + " ".join(f"{g:.3f}" for g in gammas))


def measure_flatness(models, data, args):
    x_train, _, y_train, _ = data
    n = min(args.flatness_examples, len(x_train))
    x, y = x_train[:n], y_train[:n]
    rows = []
    for run, model in models:
        method = run["method"]
        start = time.perf_counter()
        if not np.isfinite(run["final_train_loss"]):
            eig = trace = float("nan")
        else:
            eig = flatness.hessian_top_eigenvalue(
                model, x, y, num_iterations=args.power_iterations, seed=0
            )
            trace = flatness.hessian_trace(
                model, x, y, num_samples=args.trace_samples, seed=0
            )
        rows.append(
            {
                "method": method,
                "lr": run["lr"],
                "seed": run["seed"],
                "test_accuracy": run["test_accuracy"],
                "final_train_loss": run["final_train_loss"],
                "failed": run["failed"],
                "top_eigenvalue": eig,
                "trace": trace,
                "seconds": time.perf_counter() - start,
            }
        )
    return rows, n


def print_flatness(rows, n, args):
    print(
        f"\nFlatness of the minima (training loss on {n} training examples; "
        f"power iteration <= {args.power_iterations} steps, Hutchinson with "
        f"{args.trace_samples} Rademacher probes)"
    )
    print(
        f"{'method':<7}{'lr':>8}{'seed':>6}{'test acc':>10}{'train loss':>12}{'top eig':>11}{'trace':>11}{'s':>7}  note"
    )
    for r in rows:
        print(
            f"{r['method']:<7}{r['lr']:>8g}{r['seed']:>6d}{r['test_accuracy']:>10.4f}"
            f"{r['final_train_loss']:>12.4g}{r['top_eigenvalue']:>11.4g}{r['trace']:>11.4g}"
            f"{r['seconds']:>7.1f}  {'failed run' if r['failed'] else ''}"
        )


def plot(rows, runs, methods, lrs, flat_lr, seed, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    for method in methods:
        pts = [r for r in rows if r["method"] == method]
        ax.errorbar(
            [r["lr"] for r in pts], [r["mean"] for r in pts],
            yerr=[r["std"] for r in pts], marker="o", capsize=3, label=method,
            color=COLORS[method],
        )
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(lrs)
    ax.set_xticklabels([f"{lr:g}" for lr in lrs])
    ax.set_xlabel("learning rate (SGD, momentum 0.9)")
    ax.set_ylabel("test accuracy (mean +- std over seeds)")
    ax.set_title("(a) where each method works")
    ax.axhline(0.1, color="grey", lw=0.8, ls=":")
    ax.legend()

    ax = axes[1]
    for lr in lrs:
        run = next(
            (r for r in runs if r["method"] == "SSAM" and r["lr"] == lr and r["seed"] == seed),
            None,
        )
        if run and "renorm_factor" in run["history"]:
            g = run["history"]["renorm_factor"]
            ax.plot(range(1, len(g) + 1), g, marker=".", label=f"lr {lr:g}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("gamma = ||g|| / ||g_asc|| (epoch mean)")
    ax.set_title(f"(b) SSAM renormalization factor (seed {seed})")
    if ax.lines:
        ax.legend(fontsize=8)

    ax = axes[2]
    for method in methods:
        run = next(
            (r for r in runs if r["method"] == method and r["lr"] == flat_lr and r["seed"] == seed),
            None,
        )
        if run and "sharpness" in run["history"]:
            s = run["history"]["sharpness"]
            ax.plot(range(1, len(s) + 1), s, marker=".", label=method, color=COLORS[method])
    ax.set_xlabel("epoch")
    ax.set_ylabel("L(w + e) - L(w) (epoch mean)")
    ax.set_title(f"(c) sharpness diagnostic at lr {flat_lr:g}")
    if ax.lines:
        ax.legend()
    fig.suptitle(f"digits CNN, backend {keras.backend.backend()}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def floats(text):
    return [float(t) for t in text.split(",") if t]


def ints(text):
    return [int(t) for t in text.split(",") if t]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", type=floats, default=floats("0.03,0.1,0.2,0.3"))
    parser.add_argument("--seeds", type=ints, default=ints("0,1,2"))
    parser.add_argument("--methods", default="SGD,SAM,USAM,SSAM",
                        help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-examples", type=int, default=None,
                        help="train on the first N training examples (default: all 1347)")
    parser.add_argument("--rho-sam", type=float, default=0.05)
    parser.add_argument("--rho-ssam", type=float, default=0.5,
                        help="rho of USAM and SSAM (unnormalized ascent)")
    parser.add_argument("--flatness-lr", type=float, default=None,
                        help="learning rate whose minima are compared (default: 0.1 if swept, else the first)")
    parser.add_argument("--flatness-examples", type=int, default=1000)
    parser.add_argument("--power-iterations", type=int, default=20)
    parser.add_argument("--trace-samples", type=int, default=20)
    parser.add_argument("--out", default="results")
    parser.add_argument("--quick", action="store_true",
                        help="1 lr, 1 seed, 1 epoch, tiny flatness estimates (smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.lrs, args.seeds, args.epochs, args.train_examples = [0.1], [0], 1, 320
        args.flatness_examples, args.power_iterations, args.trace_samples = 256, 2, 2
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {','.join(METHODS)}")
    if not args.lrs or not args.seeds:
        parser.error("--lrs and --seeds need at least one value each")
    flat_lr = args.flatness_lr
    if flat_lr is None:
        flat_lr = 0.1 if 0.1 in args.lrs else args.lrs[0]
    elif flat_lr not in args.lrs:
        parser.error(f"--flatness-lr {flat_lr} is not in --lrs {args.lrs}")

    start = time.perf_counter()
    data = load_data()
    if args.train_examples is not None:
        data[0], data[2] = data[0][: args.train_examples], data[2][: args.train_examples]
    print(
        f"backend {keras.backend.backend()}, train/test {len(data[0])}/{len(data[1])}, "
        f"methods {methods}, lrs {args.lrs}, seeds {args.seeds}, epochs {args.epochs}, "
        f"rho SAM {args.rho_sam}, rho USAM/SSAM {args.rho_ssam}"
    )
    runs = []
    kept = []  # (run, model) at the flatness learning rate, first seed
    for method in methods:
        for lr in args.lrs:
            for seed in args.seeds:
                t0 = time.perf_counter()
                model, run = train(method, lr, seed, data, args)
                runs.append(run)
                if lr == flat_lr and seed == args.seeds[0]:
                    kept.append((run, model))
                print(
                    f"  {method:<5} lr {lr:<7g} seed {seed}: test acc {run['test_accuracy']:.4f}"
                    f"{'  FAILED' if run['failed'] else ''}  ({time.perf_counter() - t0:.1f} s)",
                    flush=True,
                )
    train_seconds = time.perf_counter() - start

    rows = sweep_table(runs, methods, args.lrs)
    print_sweep(rows)
    if "SSAM" in methods:
        print_gamma(runs, args.lrs, args.seeds[0])
    flat_rows, n = measure_flatness(kept, data, args)
    print_flatness(flat_rows, n, args)

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "lr_sweep_digits.png")
    plot(rows, runs, methods, args.lrs, flat_lr, args.seeds[0], png)
    total = time.perf_counter() - start
    with open(os.path.join(args.out, "lr_sweep_digits.json"), "w") as f:
        json.dump(
            {
                "backend": keras.backend.backend(),
                "keras": keras.__version__,
                "args": {k: v for k, v in vars(args).items()},
                "sweep": rows,
                "flatness": flat_rows,
                "runs": runs,
                "train_seconds": train_seconds,
                "total_seconds": total,
            },
            f,
            indent=1,
        )
    print(f"\nsaved {png} and lr_sweep_digits.json; training {train_seconds:.0f} s, total {total:.0f} s")


if __name__ == "__main__":
    main()

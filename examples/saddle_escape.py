"""Escaping a saddle with SGD, SAM, USAM and SSAM, trained by keras_ssam.

    KERAS_BACKEND=jax python examples/saddle_escape.py            # or tensorflow, torch
    KERAS_BACKEND=jax python examples/saddle_escape.py --quick    # a few seconds (CI)
    python examples/saddle_escape.py --out results/ --lr 0.2 --max-steps 250

f(x, y) = 1/2 (x^2 - y^2) has a saddle at 0 (Hessian eigenvalues +1 and -1).
Every run starts at (x0, y0) = (1, 1e-3), just off the stable manifold y = 0,
and counts the full-batch steps until |y| >= 1 (escaped; f <= -1/2 soon after)
for each method and perturbation radius rho. The model's only weight is
w = (x, y), its output is f(w), its loss returns that output, and keras_ssam
takes the steps. Prints the numbers, checks them against the closed forms
below (exit status 1 if a check fails) and saves `saddle_escape.png` to `--out`.

What the papers claim
---------------------
Tan et al. (JMLR 2025, arXiv 2401.07250, abstract): compared with SGD, SAM "is
more prone to getting stuck at the saddle points", and SSAM's renormalization
is proposed to address this. Kim et al. (ICML 2023, arXiv 2301.06308) and
Compagnoni et al. (ICML 2023, arXiv 2301.08203) show that saddles can attract
SAM. The SSAM paper analyses the unnormalized ascent e = rho g (USAM here).

What the update maps say (g = (x, -y), lr = learning rate)
----------------------------------------------------------
SGD:  y <- (1 + lr) y, so T_GD = ceil(log(1/|y0|) / log(1 + lr)) steps.
USAM: w + e = ((1 + rho) x, (1 - rho) y), so y <- (1 + lr (1 - rho)) y exactly:
      T = ceil(log(1/|y0|) / log(1 + lr (1 - rho))) for rho < 1, and for
      1 <= rho <= 1 + 2/lr the saddle attracts (rho >= 1/|lambda_min|, Kim et al.).
SSAM (e = rho g, step rescaled by gamma = ||g|| / ||g_asc|| > 0):
      y <- (1 + lr gamma (1 - rho)) y. A positive factor cannot change the sign
      of (1 - rho): SSAM escapes exactly when USAM does (rho < 1) and is stuck
      exactly when USAM is. It changes the speed: gamma (1 - rho) <= 1, so it is
      never faster than GD, and as x dies out gamma -> 1/(1 - rho) and y grows at
      GD's rate 1 + lr, so for rho near 1 it escapes far sooner than USAM.
SAM  (e = rho g/||g||, here ||g|| = ||w||): y <- (1 + lr (1 - rho/||w||)) y, so y
      shrinks whenever the iterate is within rho of the saddle. If GD's path comes
      closer than about rho, SAM is captured: x settles in the period-2 cycle
      |x| = lr rho / (2 - lr) (see quadratic_lr_regimes.py, lambda = 1), where y is
      multiplied by 1 + lr - (2 - lr) = 2 lr - 1 each step, |2 lr - 1| < 1 for
      lr < 1. The iterate bounces next to the saddle forever.
SSAM with the normalized ascent: within the rho-ball, g_asc ~ (rho/||w||) (x, y)
      points along w itself and is rescaled to norm ||w||, so w <- ~(1 - lr) w:
      the renormalization removes SAM's bounce and the run converges *into* the
      saddle (to ||w|| ~ 1e-19 in float32, where the epsilon = 1e-12 added to
      ||g|| in the normalization takes over).
SSAM at rho = 1 exactly: the ascent point has y = 0, so g_asc = (2x, 0) and
      gamma = ||w|| / (2 |x|) is unbounded as x -> 0 (keras_ssam, like the
      authors' code, leaves gamma unclipped unless `max_scale` is set); x then
      bounces at about lr |y| while y stays put.

So keras_ssam shows (see the printed table): SSAM fixes USAM's slow escape
for rho < 1, but neither it nor the normalized form removes the trap: for
rho >= 1 (unnormalized) or rho above the closest approach (normalized) every
sharpness-aware method here stays at the saddle, where SGD escapes. The claim
"SSAM escapes saddles better" holds only in the first sense.
"""

import argparse
import math
import os
import sys
import time

import keras
import numpy as np
from keras import ops
from toy_objectives import METHODS, make_optimizer, value_loss

import keras_ssam

X0, Y0 = 1.0, 1e-3
THRESHOLD = 1.0
LR = 0.2
LABELS = {
    "SGD": "SGD (GD)",
    "SAM": "SAM  e = rho g/||g||",
    "USAM": "USAM  e = rho g",
    "SSAM": "SSAM  e = rho g",
    "SSAM-norm": "SSAM  e = rho g/||g||",
}
COLORS = {"SGD": "k", "SAM": "C0", "USAM": "C1", "SSAM": "C2", "SSAM-norm": "C3"}


# -- Closed forms. --


def gd_escape_steps(lr, y0=Y0, threshold=THRESHOLD):
    """Steps until |y| >= threshold under y <- (1 + lr) y."""
    return math.ceil(math.log(threshold / abs(y0)) / math.log(1.0 + lr))


def usam_escape_steps(lr, rho, y0=Y0, threshold=THRESHOLD):
    """USAM's escape time, y <- (1 + lr (1 - rho)) y; None if it never escapes."""
    factor = 1.0 + lr * (1.0 - rho)
    if abs(factor) <= 1.0:
        return None
    return math.ceil(math.log(threshold / abs(y0)) / math.log(abs(factor)))


def sam_cycle_amplitude(lr, rho):
    """|x| on SAM's period-2 cycle next to the saddle (eigenvalue +1)."""
    return lr * rho / (2.0 - lr)


# -- The saddle as a Keras model trained by keras_ssam. --


class Saddle(keras.layers.Layer):
    """Holds w = (x, y); outputs f(w) = 1/2 (x^2 - y^2) once per input row."""

    def __init__(self, w0=(X0, Y0), **kwargs):
        super().__init__(**kwargs)
        self.w0 = tuple(float(v) for v in w0)

    def build(self, input_shape):
        self.w = self.add_weight(
            shape=(2,), initializer=keras.initializers.Constant(self.w0), name="w"
        )

    def call(self, x):
        f = 0.5 * (ops.square(self.w[0]) - ops.square(self.w[1]))
        return ops.ones_like(x) * f



class RecordAndStop(keras.callbacks.Callback):
    """Records w after every step; stops training once |y| >= threshold."""

    def __init__(self, threshold):
        super().__init__()
        self.threshold = threshold
        self.path = []

    def on_train_begin(self, logs=None):
        self.path = [self.model.get_weights()[0].astype("float64")]

    def on_train_batch_end(self, batch, logs=None):
        # On JAX, `self.model` syncs the weights from the training state.
        w = self.model.get_weights()[0].astype("float64")
        self.path.append(w)
        if not abs(w[1]) < self.threshold:  # also stops on NaN
            self.model.stop_training = True


def escape_run(method, rho, lr=LR, max_steps=250, w0=(X0, Y0), threshold=THRESHOLD):
    """Trains from w0 with `method`; returns (steps to escape or None, path).

    `path[t]` is w after t steps (path[0] = w0).
    """
    inputs = keras.Input((1,))
    model = keras.Model(inputs, Saddle(w0)(inputs))
    if method != "SGD":
        model = keras_ssam.SAMModel(model)
    model.compile(optimizer=make_optimizer(method, lr, rho), loss=value_loss)
    recorder = RecordAndStop(threshold)
    x = np.zeros((max_steps, 1), "float32")
    model.fit(x, x, batch_size=1, epochs=1, shuffle=False, verbose=0,
              callbacks=[recorder])
    path = np.stack(recorder.path)
    escaped = np.nonzero(~(np.abs(path[:, 1]) < threshold))[0]
    return (int(escaped[0]) if escaped.size else None), path


# -- The experiment and its checks. --


def check_runs(results, lr, max_steps):
    """Checks the runs against the closed forms; returns a list of failures."""
    failures = []
    t_gd = gd_escape_steps(lr)
    steps_gd = results[("SGD", 0.0)][0]
    if steps_gd is None or abs(steps_gd - t_gd) > 1:
        failures.append(f"SGD escaped after {steps_gd} steps, closed form {t_gd}")
    for (method, rho), (steps, path) in results.items():
        if method == "USAM":
            expected = usam_escape_steps(lr, rho)
            if expected is not None and expected > max_steps:
                expected = None
            if (steps is None) != (expected is None) or (
                steps is not None and abs(steps - expected) > 1
            ):
                failures.append(f"USAM rho={rho}: {steps} steps, closed form {expected}")
        if method == "SSAM":
            if rho >= 1 and steps is not None:
                failures.append(f"SSAM rho={rho} escaped ({steps} steps); theory: stuck")
            if steps is not None and steps < t_gd - 1:
                failures.append(f"SSAM rho={rho} escaped faster than GD ({steps} < {t_gd})")
        if method == "SAM" and steps is None:
            # Captured: bouncing in x at lr rho/(2 - lr), y shrinking.
            amp = sam_cycle_amplitude(lr, rho)
            err = abs(abs(path[-1, 0]) - amp) / amp
            flips = path[-1, 0] * path[-2, 0] < 0
            if err > 0.02 or not flips or abs(path[-1, 1]) > abs(Y0):
                failures.append(
                    f"SAM rho={rho}: final x={path[-1, 0]:.4g} (cycle amplitude "
                    f"{amp:.4g}), y={path[-1, 1]:.3g}")
    return failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="directory for the PNG")
    parser.add_argument("--quick", action="store_true",
                        help="two rhos, short runs (CI smoke test)")
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--max-steps", type=int, default=None,
                        help="step budget per run (default 250, 100 with --quick)")
    args = parser.parse_args(argv)
    lr = args.lr
    max_steps = args.max_steps or (100 if args.quick else 250)
    rhos = (0.5, 1.5) if args.quick else (
        0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 0.8, 0.9, 1.0, 1.5)
    start = time.perf_counter()
    print(f"backend: {keras.backend.backend()}, f = (x^2 - y^2)/2 from "
          f"({X0}, {Y0}), lr: {lr}, escape: |y| >= {THRESHOLD}, "
          f"budget: {max_steps} steps")

    results = {("SGD", 0.0): escape_run("SGD", 0.0, lr, max_steps)}
    for method in METHODS[1:]:
        for rho in rhos:
            results[(method, rho)] = escape_run(method, rho, lr, max_steps)

    def cell(steps):
        return f"{steps}" if steps is not None else f">{max_steps}"

    print(f"\nSteps to escape (>{max_steps}: not escaped; GD: {cell(results[('SGD', 0.0)][0])}, "
          f"closed form {gd_escape_steps(lr)})")
    print(f"{'rho':>7}" + "".join(f"{m:>11}" for m in METHODS[1:])
          + f"{'USAM closed form':>18}")
    for rho in rhos:
        closed = usam_escape_steps(lr, rho)
        print(f"{rho:>7}" + "".join(f"{cell(results[(m, rho)][0]):>11}" for m in METHODS[1:])
              + f"{(closed if closed is not None else 'never'):>18}")

    print(f"\nWhere the runs that did not escape ended (after {max_steps} steps)")
    print(f"{'method':<11}{'rho':>7}{'x':>12}{'y':>12}{'||w||':>11}"
          f"{'SAM cycle |x| = lr rho/(2-lr)':>31}")
    for (method, rho), (steps, path) in results.items():
        if steps is None:
            x, y = path[-1]
            amp = f"{sam_cycle_amplitude(lr, rho):.4g}" if method == "SAM" else ""
            print(f"{method:<11}{rho:>7}{x:>12.3e}{y:>12.3e}{math.hypot(x, y):>11.3e}"
                  f"{amp:>31}")

    failures = check_runs(results, lr, max_steps)
    for f in failures:
        print("FAIL:", f)
    if not args.quick:
        print(f"\nsaved {plot(args.out, results, rhos, lr, max_steps)}")
    print(f"\n{'all checks passed' if not failures else f'{len(failures)} check(s) FAILED'}"
          f" ({time.perf_counter() - start:.1f} s)")
    return 1 if failures else 0


def plot(out_dir, results, rhos, lr, max_steps, example_rho=0.5):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    rhos = np.array(rhos)
    ax.axhline(results[("SGD", 0.0)][0], color=COLORS["SGD"], lw=1.5, label="SGD (GD)")
    for i, (m, marker) in enumerate(zip(METHODS[1:], "s^vd")):
        steps = np.array([results[(m, r)][0] or np.nan for r in rhos], dtype=float)
        stuck = np.isnan(steps)
        ax.plot(rhos, np.where(stuck, np.nan, steps), marker + "-", color=COLORS[m],
                label=LABELS[m], ms=5)
        ax.plot(rhos[stuck], np.full(stuck.sum(), max_steps * (1.08 + 0.08 * i)),
                marker, mfc="none", color=COLORS[m], ms=7)
    fine = np.geomspace(rhos[0], 0.999, 200)
    ax.plot(fine, [usam_escape_steps(lr, r) for r in fine], "k:", lw=1,
            label="USAM closed form")
    ax.axhline(max_steps, color="gray", lw=0.8, ls="--")
    ax.text(rhos[0], max_steps * 1.45, f"open markers: not escaped in {max_steps} steps",
            fontsize=7, color="gray")
    ax.axvline(1.0, color="r", lw=0.8, ls="--", label=r"$\rho = 1/|\lambda_{min}|$")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(top=max_steps * 1.7)
    ax.set_xlabel(r"$\rho$")
    ax.set_ylabel(f"steps until |y| ≥ {THRESHOLD}")
    ax.set_title(f"f = (x² − y²)/2 from ({X0}, {Y0}), lr = {lr}")
    ax.legend(fontsize=7, loc="center left")

    for m in METHODS:
        key = ("SGD", 0.0) if m == "SGD" else (m, example_rho)
        if key not in results:
            continue
        path = results[key][1]
        ax2.plot(np.abs(path[:, 1]), color=COLORS[m], label=LABELS[m])
    ax2.axhline(THRESHOLD, color="gray", lw=0.8, ls="--")
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("|y|")
    ax2.set_title(rf"|y| along the runs, $\rho$ = {example_rho}")
    ax2.legend(fontsize=7)
    fig.suptitle(f"keras_ssam on backend {keras.backend.backend()}")
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "saddle_escape.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())

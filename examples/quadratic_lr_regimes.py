"""Learning-rate regimes of SGD, SAM, USAM and SSAM on a quadratic, with keras_ssam.

    KERAS_BACKEND=jax python examples/quadratic_lr_regimes.py            # or tensorflow, torch
    KERAS_BACKEND=jax python examples/quadratic_lr_regimes.py --quick    # a few seconds (CI)
    python examples/quadratic_lr_regimes.py --out results/ --rho 0.5 --steps 100

Minimizes f(w) = 1/2 w^T H w with H = diag(lambda) (default lambda = 2, 1, 0.5)
from w0 = (1, 1, 1) with full-batch gradient descent steps of each method, all
run by keras_ssam itself: the model's only weight is w, its output is f(w), and
its loss returns that output. It prints a table of the final loss against the
learning rate, checks the runs against the closed forms below (the script
exits with status 1 if a check fails) and saves `quadratic_lr_regimes.png` to
`--out`.

Closed forms (g = H w; lambda = lambda_max; all eigenvalues > 0)
-----------------------------------------------------------------
SGD (gradient descent): w <- (I - lr H) w. Each eigen-coordinate is multiplied
    by 1 - lr lambda_i, so GD converges iff lr < 2 / lambda_max.

USAM, e = rho g: the ascent gradient is H (w + rho H w) = (H + rho H^2) w, so
    w <- (I - lr (H + rho H^2)) w, a factor 1 - lr lambda_i (1 + rho lambda_i)
    per coordinate: USAM converges iff lr < 2 / (lambda_max (1 + rho lambda_max)),
    an edge 1 + rho lambda_max times below GD's.

SAM, e = rho g / ||g||: w <- w - lr H w - lr rho H^2 w / ||H w||. On the top
    eigenvector (coordinate u) this is u <- (1 - lr lambda) u - lr lambda rho sign(u).
    A period-2 cycle u = +a -> -a -> +a needs (1 - lr lambda) a - lr lambda rho = -a:
        a = lr lambda rho / (2 - lr lambda),  final loss 1/2 lambda a^2.
    A deviation d from the cycle becomes (1 - lr lambda) d per step, so the cycle
    attracts iff lr < 2 / lambda; above, |u'| >= |1 - lr lambda| |u| - lr lambda rho
    grows without bound. On the cycle (||H w|| = lambda a) every other coordinate
    is multiplied by 1 - s x - (2 - s) x^2, with x = lambda_i / lambda in (0, 1) and
    s = lr lambda in (0, 2): this falls monotonically from 1 to -1, so the other
    coordinates die out. SAM therefore never converges for rho > 0: below GD's edge
    it ends bouncing along the top eigenvector with amplitude a; above, it diverges.

SSAM, the descent gradient rescaled to ||g|| (gamma = ||g|| / ||g_asc||):
    In one dimension g_asc is parallel to g, so gamma g_asc = g exactly, for both
    ascents: unnormalized, gamma = 1 / (1 + rho lambda); normalized,
    g_asc = lambda sign(w) (|w| + rho) and gamma = |w| / (|w| + rho). 1-D SSAM *is*
    gradient descent (no period-2 cycle either), with edge 2 / lambda.
    In several dimensions the step keeps GD's norm lr ||H w|| but not its direction.
    On the top eigenvector it is GD's step exactly (factor 1 - lr lambda_max), and
    near that line the other coordinates are multiplied by
        1 - lr lambda_i (1 + rho lambda_i) / (1 + rho lambda_max)    (SSAM)
        1 - lr lambda_i (|u| + rho lambda_i / lambda_max) / (|u| + rho)  (SSAM, normalized ascent)
    both in (-1, 1) when lr < 2 / lambda_max. So (a local argument, checked by the
    runs) SSAM keeps GD's edge 2 / lambda_max whatever rho: the wider stable
    learning-rate range that Tan et al. (JMLR 2025, arXiv 2401.07250) claim for
    SSAM over (U)SAM; and the renormalized SAM converges where SAM cycles.
    The normalized-ascent SSAM converges more slowly than GD, though: near the
    minimum its ascent term rho H^2 w / ||H w|| dominates, so the lower
    coordinates shrink by only lr lambda_i^2 / lambda_max per step (the table
    shows a ~1e-13 plateau after 100 steps; the float64 update map,
    `reference_step`, gives the same).

Checks (printed, and failures make the exit status 1)
------------------------------------------------------
* For every method: at 0.9x its edge it converges (SAM: settles in the 2-cycle),
  at 1.1x it diverges. The outcome is read off the last iterates: the loss ratio
  over two steps (> 1 diverging, < 1 converging, ~1 with the top coordinate
  flipping sign: the 2-cycle).
* SAM's 2-cycle amplitude matches lr lambda rho / (2 - lr lambda).
* In 1-D, both SSAM forms follow the gradient-descent trajectory, and USAM
  follows (1 - lr lambda (1 + rho lambda))^t w0.
"""

import argparse
import os
import sys
import time

import keras
import numpy as np
from keras import ops
from toy_objectives import METHODS, make_optimizer, value_loss

import keras_ssam

EIGENVALUES = (2.0, 1.0, 0.5)
RHO = 0.5
LABELS = {
    "SGD": "SGD (GD)",
    "SAM": "SAM  e = rho g/||g||",
    "USAM": "USAM  e = rho g",
    "SSAM": "SSAM  e = rho g",
    "SSAM-norm": "SSAM  e = rho g/||g||",
}


# -- The closed forms. --


def gd_edge(eigenvalues):
    """Largest stable learning rate of gradient descent: 2 / lambda_max."""
    return 2.0 / max(eigenvalues)


def usam_edge(eigenvalues, rho):
    """USAM's edge: 2 / (lambda_max (1 + rho lambda_max))."""
    lam = max(eigenvalues)
    return 2.0 / (lam * (1.0 + rho * lam))


def predicted_edge(method, eigenvalues, rho):
    """The learning rate above which `method` diverges (module docstring)."""
    if method == "USAM":
        return usam_edge(eigenvalues, rho)
    return gd_edge(eigenvalues)  # SGD, SAM, and SSAM (both ascents)


def sam_cycle_amplitude(lr, lam, rho):
    """|u| on SAM's period-2 cycle along an eigenvector with eigenvalue lam."""
    return lr * lam * rho / (2.0 - lr * lam)


def quadratic_loss(w, eigenvalues):
    w = np.asarray(w, dtype="float64")
    with np.errstate(over="ignore", invalid="ignore"):
        return 0.5 * float(np.sum(np.asarray(eigenvalues) * w * w))


def reference_step(w, eigenvalues, lr, rho, method):
    """One step of `method` in float64 numpy: the update maps of the docstring."""
    lam = np.asarray(eigenvalues, dtype="float64")
    w = np.asarray(w, dtype="float64")
    g = lam * w
    if method == "SGD" or rho == 0:
        return w - lr * g
    norm = np.linalg.norm(g)
    normalize = method in ("SAM", "SSAM-norm")
    e = (rho * g / norm if norm > 0 else 0 * g) if normalize else rho * g
    g_asc = lam * (w + e)
    if method in ("SSAM", "SSAM-norm"):
        asc_norm = np.linalg.norm(g_asc)
        g_asc = g_asc * (norm / asc_norm if asc_norm > 0 else 1.0)
    return w - lr * g_asc


# -- f(w) as a Keras model, trained by keras_ssam. --


class Quadratic(keras.layers.Layer):
    """Holds w; outputs f(w) = 1/2 sum_i lambda_i w_i^2 once per input row."""

    def __init__(self, eigenvalues, **kwargs):
        super().__init__(**kwargs)
        self.eigenvalues = tuple(float(v) for v in eigenvalues)

    def build(self, input_shape):
        self.w = self.add_weight(
            shape=(len(self.eigenvalues),), initializer="ones", name="w"
        )

    def call(self, x):
        lam = ops.convert_to_tensor(np.asarray(self.eigenvalues, "float32"))
        f = 0.5 * ops.sum(lam * ops.square(self.w))
        return ops.ones_like(x) * f



class QuadraticProblem:
    """One compiled model per (method, rho), reused across learning rates.

    The learning rate is an optimizer variable and w is reset by assignment,
    so changing either recompiles nothing.
    """

    def __init__(self, method, eigenvalues=EIGENVALUES, rho=RHO):
        self.method = method
        self.eigenvalues = tuple(eigenvalues)
        self.rho = rho
        self.layer = Quadratic(self.eigenvalues)
        inputs = keras.Input((1,))
        model = keras.Model(inputs, self.layer(inputs))
        if method != "SGD":
            model = keras_ssam.SAMModel(model)  # the two-pass SAM train step
        model.compile(optimizer=make_optimizer(method, 0.1, rho), loss=value_loss)
        self.model = model
        self._batch = np.zeros((1, 1), "float32")

    def reset(self, w0, lr):
        self.layer.w.assign(np.asarray(w0, "float32"))
        self.model.optimizer.learning_rate = lr

    def weights(self):
        return np.asarray(ops.convert_to_numpy(self.layer.w), dtype="float64")

    def fit_steps(self, steps):
        """`steps` full-batch steps in one `fit` call (low per-step overhead)."""
        if steps > 0:
            x = np.zeros((steps, 1), "float32")
            self.model.fit(x, x, batch_size=1, epochs=1, shuffle=False, verbose=0)

    def step(self):
        self.model.train_on_batch(self._batch, self._batch)

    def trajectory(self, w0, lr, steps):
        """w_0 .. w_steps, one `train_on_batch` per step."""
        self.reset(w0, lr)
        path = [self.weights()]
        for _ in range(steps):
            self.step()
            path.append(self.weights())
        return np.stack(path)

    def run(self, w0, lr, steps):
        """`steps` steps, then two more one at a time; returns the last three
        iterates and the outcome read off them."""
        self.reset(w0, lr)
        self.fit_steps(steps - 2)
        last = [self.weights()]
        for _ in range(2):
            self.step()
            last.append(self.weights())
        return last, classify(last, self.eigenvalues, quadratic_loss(w0, self.eigenvalues))


def classify(last, eigenvalues, initial_loss):
    """'converges', 'diverges' or '2-cycle', from the last three iterates."""
    losses = [quadratic_loss(w, eigenvalues) for w in last]
    if not all(np.isfinite(losses)) or not all(np.all(np.isfinite(w)) for w in last):
        return "diverges"
    if losses[2] <= 1e-20 * initial_loss:
        return "converges"
    ratio = losses[2] / losses[0] if losses[0] > 0 else np.inf
    if ratio > 1.02:
        return "diverges"
    if ratio < 0.98:
        return "converges"
    top = int(np.argmax(eigenvalues))
    if last[0][top] * last[1][top] < 0 and last[1][top] * last[2][top] < 0:
        return "2-cycle"
    return "stalls"


# -- The experiment. --


def expected_outcome(method, below_edge):
    if not below_edge:
        return "diverges"
    return "2-cycle" if method == "SAM" else "converges"


def edge_checks(problems, w0, steps, rho):
    """Each method at 0.9x and 1.1x its predicted edge."""
    rows = []
    for method, problem in problems.items():
        edge = predicted_edge(method, problem.eigenvalues, rho)
        for factor in (0.9, 1.1):
            lr = factor * edge
            last, outcome = problem.run(w0, lr, steps)
            expected = expected_outcome(method, factor < 1)
            rows.append(
                dict(method=method, edge=edge, factor=factor, lr=lr,
                     loss=quadratic_loss(last[-1], problem.eigenvalues),
                     outcome=outcome, expected=expected, ok=outcome == expected)
            )
    return rows


def sam_amplitude_checks(problem, w0, steps, rho, lr_lambdas=(0.5, 1.0, 1.5)):
    """SAM's cycle amplitude on the top eigenvector vs lr lambda rho / (2 - lr lambda)."""
    lam = max(problem.eigenvalues)
    top = int(np.argmax(problem.eigenvalues))
    rows = []
    for s in lr_lambdas:
        lr = s / lam
        last, outcome = problem.run(w0, lr, steps)
        measured = [abs(w[top]) for w in last]
        predicted = sam_cycle_amplitude(lr, lam, rho)
        rel_err = max(abs(m - predicted) for m in measured) / predicted
        rows.append(dict(lr=lr, predicted=predicted, measured=measured[-1],
                         rel_err=rel_err, outcome=outcome,
                         ok=outcome == "2-cycle" and rel_err < 0.02))
    return rows


def one_dimensional_checks(rho, lr=0.3, lam=2.0, steps=20, w0=1.0):
    """In 1-D: both SSAM forms reproduce GD's trajectory; USAM its closed form."""
    t = np.arange(steps + 1)
    gd = w0 * (1 - lr * lam) ** t
    usam = w0 * (1 - lr * lam * (1 + rho * lam)) ** t
    rows = []
    for method, expected in (("SGD", gd), ("SSAM", gd), ("SSAM-norm", gd), ("USAM", usam)):
        path = QuadraticProblem(method, (lam,), rho).trajectory([w0], lr, steps)[:, 0]
        err = float(np.max(np.abs(path - expected) / np.maximum(np.abs(expected), 1e-30)))
        rows.append(dict(method=method, max_rel_err=err, ok=err < 1e-4))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="directory for the PNG")
    parser.add_argument("--quick", action="store_true",
                        help="the checks only, on short runs (CI smoke test)")
    parser.add_argument("--rho", type=float, default=RHO)
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per run (default 100, 60 with --quick)")
    args = parser.parse_args(argv)
    steps = args.steps or (60 if args.quick else 100)
    rho, eig = args.rho, EIGENVALUES
    w0 = np.ones(len(eig))
    start = time.perf_counter()
    print(f"backend: {keras.backend.backend()}, eigenvalues: {eig}, rho: {rho}, "
          f"steps per run: {steps}, w0: {tuple(float(v) for v in w0)}")
    print(f"closed-form edges: GD/SAM/SSAM 2/lambda_max = {gd_edge(eig):.4f}, "
          f"USAM 2/(lambda_max (1 + rho lambda_max)) = {usam_edge(eig, rho):.4f}")

    problems = {m: QuadraticProblem(m, eig, rho) for m in METHODS}
    failures = 0

    print("\nEdge checks: each method at 0.9x and 1.1x its predicted edge")
    print(f"{'method':<11}{'edge':>8}{'x edge':>8}{'lr':>8}{'final loss':>13}"
          f"{'outcome':>11}{'expected':>11}")
    for r in edge_checks(problems, w0, steps, rho):
        failures += not r["ok"]
        print(f"{r['method']:<11}{r['edge']:>8.4f}{r['factor']:>8.1f}{r['lr']:>8.4f}"
              f"{r['loss']:>13.3e}{r['outcome']:>11}{r['expected']:>11}"
              f"{'' if r['ok'] else '   FAIL'}")

    print("\nSAM's period-2 cycle on the top eigenvector: |u| vs lr lambda rho/(2 - lr lambda)")
    print(f"{'lr':>8}{'predicted':>12}{'measured':>12}{'rel err':>10}{'outcome':>10}")
    amp_rows = sam_amplitude_checks(problems["SAM"], w0, steps, rho)
    for r in amp_rows:
        failures += not r["ok"]
        print(f"{r['lr']:>8.4f}{r['predicted']:>12.6f}{r['measured']:>12.6f}"
              f"{r['rel_err']:>10.2e}{r['outcome']:>10}{'' if r['ok'] else '   FAIL'}")

    print("\n1-D (lambda = 2, lr = 0.3): trajectory vs closed form, 20 steps")
    for r in one_dimensional_checks(rho):
        failures += not r["ok"]
        closed = "(1 - lr lam (1 + rho lam))^t" if r["method"] == "USAM" else "GD (1 - lr lam)^t"
        print(f"{r['method']:<11} max rel. deviation from {closed}: {r['max_rel_err']:.2e}"
              f"{'' if r['ok'] else '   FAIL'}")

    if not args.quick:
        lrs = gd_edge(eig) * np.linspace(0.075, 1.2, 16)
        grid = {m: [] for m in METHODS}
        sam_amp = []
        for lr in lrs:
            for m in METHODS:
                last, outcome = problems[m].run(w0, lr, steps)
                grid[m].append((quadratic_loss(last[-1], eig), outcome))
                if m == "SAM":
                    sam_amp.append(abs(last[-1][int(np.argmax(eig))]))
        print(f"\nFinal loss after {steps} steps (outcome: c converges, "
              f"2 2-cycle, d diverges, s stalls)")
        print(f"{'lr':>8}{'lr/edge':>9}" + "".join(f"{m:>16}" for m in METHODS))
        for i, lr in enumerate(lrs):
            cells = "".join(
                f"{grid[m][i][0]:>14.2e} {grid[m][i][1][0]}" for m in METHODS
            )
            print(f"{lr:>8.4f}{lr / gd_edge(eig):>9.3f}{cells}")
        path = plot(args.out, eig, rho, steps, lrs, grid, sam_amp)
        print(f"\nsaved {path}")

    print(f"\n{'all checks passed' if not failures else f'{failures} check(s) FAILED'}"
          f" ({time.perf_counter() - start:.1f} s)")
    return 1 if failures else 0


def plot(out_dir, eig, rho, steps, lrs, grid, sam_amp):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ceiling = 1e12
    lam = max(eig)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for m, style in zip(METHODS, ("o-", "s-", "^-", "v--", "d:")):
        losses = np.array([loss for loss, _ in grid[m]])
        bad = ~np.isfinite(losses) | (losses > ceiling)
        shown = np.where(bad, ceiling, np.maximum(losses, 1e-40))
        (line,) = ax.plot(lrs, shown, style, label=LABELS[m], ms=4)
        ax.plot(lrs[bad], shown[bad], "x", color=line.get_color(), ms=9)
    ax.axvline(gd_edge(eig), color="k", ls="--", lw=1,
               label=r"$2/\lambda_{max}$ (GD, SAM, SSAM)")
    ax.axvline(usam_edge(eig, rho), color="r", ls="--", lw=1,
               label=r"$2/(\lambda_{max}(1+\rho\lambda_{max}))$ (USAM)")
    fine = np.linspace(lrs[0], 0.999 * gd_edge(eig), 200)
    ax.plot(fine, 0.5 * lam * sam_cycle_amplitude(fine, lam, rho) ** 2, "k:", lw=1,
            label=r"SAM cycle loss $\frac{1}{2}\lambda a^2$")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"loss after {steps} steps (x: diverged, clipped)")
    ax.set_title(f"f = ½ wᵀHw, λ = {eig}, ρ = {rho}")
    ax.legend(fontsize=7, loc="lower left")

    ax2.plot(fine, sam_cycle_amplitude(fine, lam, rho), "k-", lw=1,
             label=r"$a = \eta\lambda\rho/(2-\eta\lambda)$")
    amp = np.array(sam_amp)
    ok = np.isfinite(amp) & (lrs < gd_edge(eig))
    ax2.plot(lrs[ok], amp[ok], "s", label="SAM, keras_ssam: |w_top| at the end")
    ax2.set_yscale("log")
    ax2.set_xlabel("learning rate")
    ax2.set_ylabel("amplitude of the period-2 cycle")
    ax2.set_title("SAM does not converge: it bounces along the top eigenvector")
    ax2.legend(fontsize=8)
    fig.suptitle(f"keras_ssam on backend {keras.backend.backend()}")
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "quadratic_lr_regimes.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())

"""A float64 NumPy reference of the plain-cost SAM variants, written by hand:
Momentum-SAM, random weight perturbation (RWP, m-RWP, ARWP) and the step
policies `EveryK`, `LatePhase` and `AdaptiveSteps` (AE-SAM).

No Keras, no autodiff and no keras_ssam code: `loss_and_grads(params, x, y)`
is a hand-written loss and gradient (e.g. `reference.TanhMLP.loss_and_grads`),
and the base optimizers below (Keras `SGD`, Keras `Adam`) are spelled out.
Norms `||.||` are one global L2 norm over all weights.

Momentum-SAM (Becker et al., arXiv 2401.12033). With `v` the accumulated
gradient before the step (read from the base optimizer's state, or an own
moving average):

    e = -rho v / (||v|| + epsilon)             (e = 0 while ||v|| = 0)
    g = gradient at w + e                      (the step's only gradient)
    w <- base optimizer update of w with g

where `v` is `-m` for Keras's SGD with momentum (which stores `m <- mu m -
lr g`), Adam's first moment `m`, or, for a base without a usable momentum,
`a <- beta a + (1 - beta) g` over every step's `g` (a_0 = 0). A step a
schedule skips takes `e = 0` (its `g` still feeds the moving average).

The authors' code (MarlonBecker/MSAM, `optimizer/msam.py`, weight_decay=0,
constant lr) keeps the parameters at `w_hat = w - rho v / (||v|| + 1e-12)`
between steps and runs, per step, with `g` the gradient at the stored
parameters:

    p <- p + rho v / (||v|| + 1e-12)       (back to w; 0 before the first step)
    v <- mu v + g
    p <- p - lr v                          (the SGD step: the new w)
    p <- p - rho v / (||v|| + 1e-12)       (ahead again)

`OfficialMSAM.w` is that `w`.

Random weight perturbation (Li et al., TMLR 2024; nblt/mARWP). With `z` the
step's standard normals (shaped as the weights), per output unit `j` (the
last axis) of a weight with two or more axes:

    eps[..., j] = sigma ||W[..., j]|| z[..., j] / sqrt(1 + eta F_j)

with `F_j = sum F[..., j]`; for a vector or scalar weight, `sigma (||w|| +
1e-16) z / sqrt(1 + eta F)` (F elementwise). Without `adaptive` the
division is left out. Then

    mix=None:  u = g(w + eps)
    mix=lam:   u = lam g(w + eps) + (1 - lam) g(w)
    adaptive:  F <- beta F + g(w + eps)^2     (F_0 = 0)

AE-SAM's policy (Jiang et al., ICLR 2023), with `g_t` the clean gradient at
`w` and `n_t = ||g_t||^2`:

    mu_t  = delta mu_{t-1} + (1 - delta) n_t
    var_t = delta var_{t-1} + (1 - delta) (n_t - mu_t)^2      (the new mu_t)
    c_t   = c_start + (c_end - c_start) min(t / total_steps, 1)
    perturbed pass  iff  n_t >= mu_t + c_t sqrt(var_t)

(mu_0 = var_0 = 0 before the first step). `EveryK(k, offset)`: the
perturbed pass iff `t % k == offset`; `LatePhase(s)`: iff `t >= s`.
"""

import numpy as np
from efficient_reference import EfficientSAM


def norm(arrays):
    return float(np.sqrt(sum(np.sum(np.square(a)) for a in arrays)))


# --------------------------------------------------------------------------
# Base optimizers (Keras's, line by line).
# --------------------------------------------------------------------------


class SGD:
    """Keras `SGD(lr, momentum)`, nesterov=False:

        m <- momentum m - lr g;  w <- w + m      (momentum != 0)
        w <- w - lr g                            (momentum == 0)
    """

    def __init__(self, lr, momentum=0.0):
        self.lr = lr
        self.momentum = momentum
        self.m = None
        self.t = 0

    def first_moment(self, params):
        """`v` up to a positive factor: `-m` (zeros before the first step)."""
        if self.m is None:
            return [np.zeros_like(p) for p in params]
        return [-a for a in self.m]

    def apply(self, params, grads):
        self.t += 1
        if self.momentum == 0:
            return [p - self.lr * g for p, g in zip(params, grads)]
        if self.m is None:
            self.m = [np.zeros_like(p) for p in params]
        self.m = [self.momentum * m - self.lr * g for m, g in zip(self.m, grads)]
        return [p + m for p, m in zip(params, self.m)]


class Adam:
    """Keras `Adam(lr, beta_1, beta_2, epsilon)` (amsgrad=False), at step
    `t` (1-based):

        m <- m + (g - m)(1 - beta_1);  v <- v + (g^2 - v)(1 - beta_2)
        w <- w - lr sqrt(1 - beta_2^t) / (1 - beta_1^t) m / (sqrt(v) + epsilon)
    """

    def __init__(self, lr, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        self.lr, self.beta_1, self.beta_2, self.epsilon = lr, beta_1, beta_2, epsilon
        self.m = self.v = None
        self.t = 0

    def first_moment(self, params):
        if self.m is None:
            return [np.zeros_like(p) for p in params]
        return [a.copy() for a in self.m]

    def apply(self, params, grads):
        if self.m is None:
            self.m = [np.zeros_like(p) for p in params]
            self.v = [np.zeros_like(p) for p in params]
        self.t += 1
        alpha = self.lr * np.sqrt(1 - self.beta_2**self.t) / (1 - self.beta_1**self.t)
        self.m = [m + (g - m) * (1 - self.beta_1) for m, g in zip(self.m, grads)]
        self.v = [v + (g * g - v) * (1 - self.beta_2) for v, g in zip(self.v, grads)]
        return [p - alpha * m / (np.sqrt(v) + self.epsilon) for p, m, v in zip(params, self.m, self.v)]


# --------------------------------------------------------------------------
# Momentum-SAM.
# --------------------------------------------------------------------------


class MomentumSAM:
    """Momentum-SAM as in the module docstring.

    `source` is `"base"` (the base optimizer's `first_moment`) or `"own"`
    (the moving average with decay `beta`). `schedule(t) -> bool` says
    which steps are perturbed (all by default)."""

    def __init__(self, loss_and_grads, optimizer, rho, *, source="base", beta=0.9, epsilon=1e-12,
                 schedule=None):
        if source not in ("base", "own"):
            raise ValueError(source)
        self.loss_and_grads = loss_and_grads
        self.optimizer = optimizer
        self.rho, self.source, self.beta, self.epsilon = rho, source, beta, epsilon
        self.schedule = schedule
        self.average = None

    def direction(self, params):
        if self.source == "base":
            return self.optimizer.first_moment(params)
        return self.average if self.average is not None else [np.zeros_like(p) for p in params]

    def step(self, params, x, y):
        """The new weights and the step's record."""
        t = self.optimizer.t
        v = self.direction(params)
        v_norm = norm(v)
        factor = -self.rho / (v_norm + self.epsilon) if v_norm > 0 else 0.0
        perturbed = self.schedule is None or bool(self.schedule(t))
        e = [factor * a if perturbed else np.zeros_like(a) for a in v]
        point = [p + a for p, a in zip(params, e)]
        loss, g = self.loss_and_grads(point, x, y)
        if self.source == "own":
            previous = self.direction(params)
            self.average = [self.beta * a + (1 - self.beta) * b for a, b in zip(previous, g)]
        new = self.optimizer.apply(params, g)
        rec = dict(t=t, loss=loss, e=e, point=point, grads=g, direction_norm=v_norm,
                   perturbed_grad_norm=norm(g), perturbed=perturbed)
        return new, rec


class OfficialMSAM:
    """MarlonBecker/MSAM `optimizer/msam.py` (nesterov=False,
    weight_decay=0, constant lr), line by line; `p` holds `w_hat`."""

    def __init__(self, loss_and_grads, params, *, lr, momentum, rho):
        self.loss_and_grads = loss_and_grads
        self.lr, self.momentum, self.rho = lr, momentum, rho
        self.p = [np.array(a, np.float64) for a in params]
        self.buf = [np.zeros_like(a) for a in self.p]
        self.inverse_norm = 0.0

    @property
    def w(self):
        """The weights without the ascent (what keras_ssam holds)."""
        return [p + self.rho * self.inverse_norm * b for p, b in zip(self.p, self.buf)]

    def step(self, x, y):
        _, g = self.loss_and_grads(self.p, x, y)
        for i in range(len(self.p)):
            self.p[i] = self.p[i] + self.rho * self.inverse_norm * self.buf[i]
            self.buf[i] = self.momentum * self.buf[i] + g[i]
            self.p[i] = self.p[i] - self.lr * self.buf[i]
        self.inverse_norm = 1.0 / (norm(self.buf) + 1e-12)
        for i in range(len(self.p)):
            self.p[i] = self.p[i] - self.rho * self.inverse_norm * self.buf[i]


# --------------------------------------------------------------------------
# Random weight perturbation.
# --------------------------------------------------------------------------


def filter_wise_noise(params, normals, sigma, *, fisher=None, eta=1.0, unit_axis=-1):
    """`eps` per weight (module docstring). `unit_axis` is the output-unit
    axis of weights with two or more axes (-1, Keras's layout; 0 models the
    torch layout, a wrong one for Keras weights)."""
    out = []
    for i, (w, z) in enumerate(zip(params, normals)):
        f = None if fisher is None else fisher[i]
        if w.ndim >= 2:
            axes = tuple(a for a in range(w.ndim) if a != unit_axis % w.ndim)
            std = sigma * np.sqrt(np.sum(np.square(w), axis=axes, keepdims=True))
            if f is not None:
                f = np.sum(f, axis=axes, keepdims=True)
        else:
            std = sigma * (np.sqrt(np.sum(np.square(w))) + 1e-16)
        if f is not None:
            std = std / np.sqrt(1.0 + eta * f)
        out.append(std * z)
    return out


class RandomSAM:
    """RWP / m-RWP / ARWP as in the module docstring. `normals(t)` gives the
    step's standard normals (a list shaped as the weights)."""

    def __init__(self, loss_and_grads, optimizer, sigma, normals, *, mix=None, adaptive=False, eta=1.0,
                 beta=0.9, unit_axis=-1):
        self.loss_and_grads = loss_and_grads
        self.optimizer = optimizer
        self.sigma, self.normals = sigma, normals
        self.mix, self.adaptive, self.eta, self.beta = mix, adaptive, eta, beta
        self.unit_axis = unit_axis
        self.fisher = None

    def step(self, params, x, y):
        t = self.optimizer.t
        fisher = None
        if self.adaptive:
            fisher = self.fisher if self.fisher is not None else [np.zeros_like(p) for p in params]
        eps = filter_wise_noise(params, self.normals(t), self.sigma, fisher=fisher, eta=self.eta,
                                unit_axis=self.unit_axis)
        point = [p + e for p, e in zip(params, eps)]
        loss_eps, g_eps = self.loss_and_grads(point, x, y)
        rec = dict(t=t, eps=eps, point=point, grads_eps=g_eps, loss=loss_eps)
        if self.mix is None:
            update = g_eps
        else:
            loss, g = self.loss_and_grads(params, x, y)
            update = [self.mix * a + (1 - self.mix) * b for a, b in zip(g_eps, g)]
            rec.update(loss=loss, clean_grads=g, sharpness=loss_eps - loss)
        if self.adaptive:
            self.fisher = [self.beta * f + np.square(a) for f, a in zip(fisher, g_eps)]
            rec["fisher"] = [f.copy() for f in self.fisher]
        return self.optimizer.apply(params, update), rec


# --------------------------------------------------------------------------
# Step policies.
# --------------------------------------------------------------------------


def every_k(k, offset=0):
    return lambda t: t % k == offset


def late_phase(start_step):
    return lambda t: t >= start_step


class AdaptiveSteps:
    """AE-SAM's decision and statistics (module docstring)."""

    def __init__(self, total_steps, delta=0.9, c_start=1.0, c_end=-1.0):
        self.total_steps, self.delta, self.c_start, self.c_end = total_steps, delta, c_start, c_end
        self.mean = 0.0
        self.variance = 0.0

    def threshold_scale(self, t):
        return self.c_start + (self.c_end - self.c_start) * min(t / self.total_steps, 1.0)

    def decide(self, t, grad_norm):
        """Updates the statistics; `(decision, n_t, threshold)`."""
        n = grad_norm**2
        self.mean = self.delta * self.mean + (1 - self.delta) * n
        self.variance = self.delta * self.variance + (1 - self.delta) * (n - self.mean) ** 2
        threshold = self.mean + self.threshold_scale(t) * np.sqrt(self.variance)
        return bool(n >= threshold), n, threshold


def run_adaptive(policy, sam, params, batches, optimizer, *, k=None):
    """Trains with an `efficient_reference.EfficientSAM` (SSAM, or LookSAM
    with `k`) whose perturbed steps `policy` decides (and, for LookSAM,
    `t % k == 0`). Returns `(trajectory, records)`; each record holds the
    decision, `n_t`, the threshold and the statistics after the step."""
    assert isinstance(sam, EfficientSAM)
    params = [np.array(p, np.float64) for p in params]
    trajectory, records = [], []
    for x, y in batches:
        t = optimizer.t
        _, g = sam.loss_and_grads(params, x, y)
        decision, n, threshold = policy.decide(t, norm(g))
        on_cycle = k is None or t % k == 0
        sam.mask = lambda _t, d=decision and on_cycle: d
        update, rec = sam.step(params, x, y, t)
        params = optimizer.apply(params, update)
        rec.update(decision=decision, n=n, threshold=threshold, mean=policy.mean, variance=policy.variance)
        trajectory.append(params)
        records.append(rec)
    return trajectory, records


def run(method, params, batches):
    """Trains `params` over `batches` with `method` (a `MomentumSAM` or
    `RandomSAM`, holding its base optimizer). Returns `(trajectory,
    records)`: the weights after each step and each step's record."""
    params = [np.array(p, np.float64) for p in params]
    trajectory, records = [], []
    for x, y in batches:
        params, rec = method.step(params, x, y)
        trajectory.append(params)
        records.append(rec)
    return trajectory, records


def run_official(loss_and_grads, params, batches, *, lr, momentum, rho):
    """The authors' Momentum-SAM over `batches`: its `w` after each step."""
    official = OfficialMSAM(loss_and_grads, params, lr=lr, momentum=momentum, rho=rho)
    trajectory = []
    for x, y in batches:
        official.step(x, y)
        trajectory.append(official.w)
    return trajectory

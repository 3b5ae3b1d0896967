"""A float64 NumPy reference of the efficient SAM variants (issue 10), by hand.

No Keras, no autodiff and no keras_ssam code: `loss_and_grads(params, x, y)`
is a hand-written loss and gradient (e.g. `test_features.linear_mse`), and the
base optimizer is any object with `apply(params, grads)` and `iterations`
(e.g. `test_features.NumpyOptimizer`).

1. Which steps run the perturbed pass. At the base optimizer's iteration `t`
   (before this step's update, 0-based) with `p_t = sam_probability(t)` (a
   float, or a function of t):

       T   = np.random.default_rng(seed).random(65536, dtype=np.float32)
       s   = T[t % 65536] + T[(t // 65536) % 65536]       (float32)
       u_t = s - floor(s)                                  (float32)
       perturbed pass  iff  u_t < p_t  (and t % k == 0 for LookSAM)

2. A step with the perturbed pass (all variants), g the clean gradient:

       e     = rho g / (||g|| + epsilon)    normalize=True
       e     = rho g                        normalize=False
       g_s   = gradient at w + e
       gamma = min(||g|| / (||g_s|| + epsilon), max_scale)  if stable, else 1
       update = gamma g_s;  g_s == 0 while g != 0: update = g (clean fallback)

   LookSAM then stores (unless it fell back, which keeps the old g_v)

       g_v = g_s - (<g, g_s> / ||g||^2) g          (g_v = g_s if ||g|| == 0)

   with global inner products and norms, or per weight tensor if layerwise.

3. A step without it: SAM/USAM/SSAM hand the base optimizer `g`. LookSAM:

       u = g + alpha (||g|| / ||g_v||) g_v   (per tensor if layerwise; a g_v of
                                              norm 0 contributes 0)
       update = u ||g|| / ||u||  if stable (global norms), else u

   (Liu et al., "Towards Efficient and Scalable Sharpness-Aware
   Minimization", CVPR 2022, Algorithm 1.)
"""

import numpy as np

TABLE_SIZE = 65536
DIAGNOSTICS = ("grad_norm", "perturbed_grad_norm", "renorm_factor", "sharpness", "clean_fallback")


def step_draws(seed, iterations):
    """u_t for every t in `iterations` (float32), as defined above."""
    table = np.random.default_rng(seed).random(TABLE_SIZE, dtype=np.float32)
    t = np.asarray(iterations, dtype=np.int64)
    s = table[t % TABLE_SIZE] + table[(t // TABLE_SIZE) % TABLE_SIZE]
    assert s.dtype == np.float32
    return (s - np.floor(s)).astype(np.float32)


def probability_at(probability, t):
    """p_t as a Python float (a bool counts as 0 or 1)."""
    p = probability(t) if callable(probability) else probability
    return float(p)


def runs_perturbed_pass(t, *, seed, probability=1.0, k=None):
    """Whether iteration `t` runs the perturbed pass."""
    if k is not None and t % k:
        return False
    return bool(step_draws(seed, [t])[0] < probability_at(probability, t))


def relu_linear_mse(params, x, y):
    """Loss and gradients of Keras "mse" for `y_hat = relu(x W + b)`: where
    every pre-activation is negative the gradient is exactly 0."""
    kernel, bias = params
    z = x @ kernel + bias
    r = np.maximum(z, 0.0) - y
    dz = 2.0 * r / r.size * (z > 0)
    return float(np.mean(r**2)), [x.T @ dz, dz.sum(0)]


def _norm(arrays):
    return float(np.sqrt(sum(np.sum(np.square(a)) for a in arrays)))


def _dot(a, b):
    return float(sum(np.sum(ai * bi) for ai, bi in zip(a, b)))


class EfficientSAM:
    """One optimizer's SAM gradient, step by step, with LookSAM's `g_v`.

    `k=None` is SAM/USAM/SSAM (a step without the perturbed pass hands the
    base optimizer `g`); an int `k` is LookSAM. `mask`, if given, overrides
    the draw: a function `t -> bool` (the perturbed pass runs iff it is true;
    only to build references of other schedules). `reuse_epsilon` is added
    to `||g_v||` in the reuse (0 in our definition; 1e-8 models
    pytorch_optimizer's LookSAM). `rho` may be a function of t.
    `fallback_overwrites_g_v` models a wrong implementation that stores
    the projection of a vanished g_s (0) on a clean-fallback step."""

    def __init__(self, loss_and_grads, *, rho, normalize=True, stable=False,
                 max_scale=None, epsilon=1e-12, k=None, alpha=0.7,
                 layerwise=False, probability=1.0, seed=0, mask=None,
                 reuse_epsilon=0.0, fallback_overwrites_g_v=False):
        self.loss_and_grads = loss_and_grads
        self.rho = rho
        self.normalize = normalize
        self.stable = stable
        self.max_scale = max_scale
        self.epsilon = epsilon
        self.k = k
        self.alpha = alpha
        self.layerwise = layerwise
        self.probability = probability
        self.seed = seed
        self.mask = mask
        self.reuse_epsilon = reuse_epsilon
        self.fallback_overwrites_g_v = fallback_overwrites_g_v
        self.g_v = None

    def perturbed_at(self, t):
        if self.mask is not None:
            return bool(self.mask(t))
        return runs_perturbed_pass(t, seed=self.seed, probability=self.probability, k=self.k)

    # -- the two kinds of step --

    def _projection(self, g, g_s):
        """g_v = g_s - (<g, g_s> / ||g||^2) g, global or per tensor."""
        groups = [[i] for i in range(len(g))] if self.layerwise else [list(range(len(g)))]
        g_v = [None] * len(g)
        for idx in groups:
            gi, gsi = [g[i] for i in idx], [g_s[i] for i in idx]
            sq = _norm(gi) ** 2
            coef = _dot(gi, gsi) / sq if sq > 0 else 0.0
            for i, a, b in zip(idx, gi, gsi):
                g_v[i] = b - coef * a
        return g_v

    def _reuse(self, g):
        """u = g + alpha (||g|| / ||g_v||) g_v, global or per tensor."""
        g_v = self.g_v if self.g_v is not None else [np.zeros_like(a) for a in g]
        groups = [[i] for i in range(len(g))] if self.layerwise else [list(range(len(g)))]
        u = [None] * len(g)
        for idx in groups:
            gi, gvi = [g[i] for i in idx], [g_v[i] for i in idx]
            nv = _norm(gvi)
            coef = self.alpha * _norm(gi) / (nv + self.reuse_epsilon) if nv > 0 else 0.0
            for i, a, b in zip(idx, gi, gvi):
                u[i] = a + coef * b
        return u

    def step(self, params, x, y, t):
        """`(update, record)` for iteration `t` at `params`."""
        loss, g = self.loss_and_grads(params, x, y)
        grad_norm = _norm(g)
        rec = {"loss": loss, "grads": g, "grad_norm": grad_norm, "t": t}
        if not self.perturbed_at(t):
            rec["perturbed"] = False
            if self.k is None:
                update = list(g)
            else:
                update = self._reuse(g)
                if self.stable:
                    nu = _norm(update)
                    if nu > 0:
                        update = [a * grad_norm / nu for a in update]
            rec["update"] = update
            return update, rec
        rho = self.rho(t) if callable(self.rho) else self.rho
        factor = rho / (grad_norm + self.epsilon) if self.normalize else rho
        perturbed = [p + factor * a for p, a in zip(params, g)]
        pert_loss, g_s = self.loss_and_grads(perturbed, x, y)
        pert_norm = _norm(g_s)
        gamma = 1.0
        if self.stable:
            gamma = grad_norm / (pert_norm + self.epsilon)
            if self.max_scale is not None:
                gamma = min(gamma, self.max_scale)
        update = [gamma * a for a in g_s]
        fallback = pert_norm == 0.0 and grad_norm > 0.0
        if fallback:
            gamma, update = 1.0, list(g)
        if self.k is not None and (not fallback or self.fallback_overwrites_g_v):
            self.g_v = self._projection(g, g_s)
        rec.update(
            perturbed=True, perturbed_grads=g_s, perturbed_grad_norm=pert_norm,
            renorm_factor=gamma, sharpness=pert_loss - loss,
            clean_fallback=float(fallback), update=update,
        )
        return update, rec


def run(ref, params, batches, optimizer):
    """Trains `params` on `batches` (an iterable of `(x, y)`) with the
    reference `ref` and `optimizer`. Returns `(trajectory, records)`: the
    weights after each step and each step's record."""
    params = [np.array(p, dtype=np.float64) for p in params]
    trajectory, records = [], []
    for x, y in batches:
        update, rec = ref.step(params, x, y, optimizer.iterations)
        params = optimizer.apply(params, update)
        trajectory.append(params)
        records.append(rec)
    return trajectory, records


def epoch_diagnostics(records):
    """The logged epoch means: the diagnostics over the steps that ran the
    perturbed pass, `sam_step_fraction` over all, `loss` over all."""
    sam = [r for r in records if r["perturbed"]]
    out = {key: float(np.mean([r[key] for r in sam])) for key in DIAGNOSTICS} if sam else {}
    out["sam_step_fraction"] = len(sam) / len(records)
    out["loss"] = float(np.mean([r["loss"] for r in records]))
    return out

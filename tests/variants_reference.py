"""A float64 NumPy reference of GSAM, FriendlySAM and WSAM, written by hand.

No Keras, no autodiff and no keras_ssam code: `loss_and_grads(params, x, y)`
is a hand-written loss and gradient (e.g. `reference.TanhMLP.loss_and_grads`)
and the base optimizer is `KerasSGD` below (Keras SGD, nesterov=False, with
the learning rate a function of the iteration count).

Notation: `g` the clean batch gradient at `w`, `||.||` one global L2 norm
over all weights, `<a, b>` the global inner product.

A step that runs the perturbed pass (see `efficient_reference.
runs_perturbed_pass` for which do, with `sam_probability`/`seed`):

    e     = rho_t d / (||d|| + epsilon)         d = g (GSAM, WSAM), F-SAM below
    g_s   = gradient at w + e
    gamma = ||g|| / (||g_s|| + epsilon) if stable, else 1   (clean ||g||)
    u     = gamma g_s;  u = g if g_s == 0 while g != 0 (clean fallback)

GSAM (Zhuang et al. 2022, Algorithm 1):

    c      = <g, u> / ||u||^2     (pytorch_optimizer: <g, g_s> / (||g_s|| ||g||
                                   + eps) * ||g|| / (||g_s|| + eps), gsam_eps)
    update = u - alpha (g - c u) = (1 + alpha c) u - alpha g
    (on a clean fallback step c = 1: the update is g)
    rho_t  = clip(rho_min + (rho - rho_min) (lr_t - lr_min) / (lr_max - lr_min),
                  rho_min, rho)        with rho_min set; lr_t the base
                                       optimizer's learning rate at the step
                                       (pytorch_optimizer's ProportionScheduler
                                       does not clip: clip_rho=False)

FriendlySAM (Li et al. 2024, Algorithm 1), state m:

    paper convention (keras_ssam):      m_0 = 0
        m_t = lmbda m_{t-1} + (1 - lmbda) g_t;   d_t = g_t - sigma m_t
    pytorch_optimizer convention (and the authors' code):
        t = 1:  m_1 = g_1, d_1 = g_1
        t > 1:  d_t = g_t - sigma m_{t-1};   m_t = lmbda m_{t-1} + (1 - lmbda) g_t
    update = u;  m changes only on steps that run the perturbed pass.

WSAM (Yue et al. 2023), a = gamma / (1 - gamma):

    decouple=False:  the base optimizer gets g + a (u - g)
    decouple=True:   the base optimizer gets g, then w <- w - lr_t a (u - g)

A step without the perturbed pass hands the base optimizer the whole
batch's `g` (WSAM adds no decoupled term, F-SAM leaves m unchanged).

With `splits` > 1 (m-sharpness, `num_batch_splits`) the batch is cut into
`splits` chunks (`np.array_split`); each chunk does the above from the same
`w` with its own gradient `g_i` (its own e, g_s, gamma, c); the base
gradient and WSAM's decoupled term are the chunks' values weighted by the
chunk sizes (their mean for equal chunks). F-SAM: chunk i's `d_i = g_i -
sigma m_t^i` with `m_t^i = lmbda m_{t-1} + (1 - lmbda) g_i`, and the new m
is the chunks' weighted mean of `m_t^i` (= lmbda m_{t-1} + (1 - lmbda) *
mean g_i).
"""

import numpy as np
from efficient_reference import runs_perturbed_pass

KINDS = ("gsam", "friendly", "wsam")
DIAGNOSTICS = ("grad_norm", "perturbed_grad_norm", "renorm_factor", "sharpness", "clean_fallback")


def norm(arrays):
    return float(np.sqrt(sum(np.sum(np.square(a)) for a in arrays)))


def dot(a, b):
    return float(sum(np.sum(x * y) for x, y in zip(a, b)))


class KerasSGD:
    """Keras `SGD(learning_rate, momentum)`, nesterov=False, learning rate
    `lr(t)` read at the iteration `t` before the update:

        v <- momentum v - lr_t grad;  w <- w + v    (momentum != 0)
        w <- w - lr_t grad                          (momentum == 0)

    (torch's SGD, `v <- momentum v + grad; w <- w - lr_t v`, is the same for
    a constant learning rate, or momentum 0.)
    """

    def __init__(self, lr, momentum=0.0):
        self.lr = lr if callable(lr) else (lambda t, lr=lr: lr)
        self.momentum = momentum
        self.v = None
        self.t = 0

    @property
    def iterations(self):
        return self.t

    def apply(self, params, grads):
        lr = self.lr(self.t)
        if self.momentum == 0:
            new = [p - lr * g for p, g in zip(params, grads)]
        else:
            if self.v is None:
                self.v = [np.zeros_like(p) for p in params]
            self.v = [self.momentum * v - lr * g for v, g in zip(self.v, grads)]
            new = [p + v for p, v in zip(params, self.v)]
        self.t += 1
        return new


class Variant:
    """One of GSAM / FriendlySAM / WSAM (`kind`), step by step.

    Keyword arguments mirror the keras_ssam classes (see the module
    docstring); the reference-only ones model other implementations or
    wrong ones: `clip_rho` (GSAM's rho clip), `gsam_eps`
    (pytorch_optimizer's eps terms in GSAM's cosine), `convention`
    ("paper" or "pytorch_optimizer", F-SAM)."""

    def __init__(self, loss_and_grads, kind, *, rho, stable=False, epsilon=1e-12,
                 splits=1, probability=1.0, seed=0,
                 alpha=0.4, rho_min=None, lr_max=None, lr_min=0.0, clip_rho=True, gsam_eps=None,
                 sigma=1.0, lmbda=0.9, convention="paper",
                 gamma=0.9, decouple=True):
        if kind not in KINDS:
            raise ValueError(kind)
        if convention not in ("paper", "pytorch_optimizer"):
            raise ValueError(convention)
        self.loss_and_grads = loss_and_grads
        self.kind = kind
        self.rho = rho
        self.stable = stable
        self.epsilon = epsilon
        self.splits = splits
        self.probability = probability
        self.seed = seed
        self.alpha = alpha
        self.rho_min, self.lr_max, self.lr_min = rho_min, lr_max, lr_min
        self.clip_rho = clip_rho
        self.gsam_eps = gsam_eps
        self.sigma, self.lmbda = sigma, lmbda
        self.convention = convention
        self.gamma, self.decouple = gamma, decouple
        self.m = None  # F-SAM's moving average (None: not started)

    def rho_at(self, lr):
        """`(rho_t, unclipped rho_t)` at the learning rate `lr`."""
        if self.rho_min is None:
            return self.rho, self.rho
        raw = self.rho_min + (self.rho - self.rho_min) * (lr - self.lr_min) / (self.lr_max - self.lr_min)
        return (min(max(raw, self.rho_min), self.rho) if self.clip_rho else raw), raw

    def _chunk(self, params, x, y, rho):
        """One chunk's `(base, decoupled term or None, new m or None, record)`."""
        loss, g = self.loss_and_grads(params, x, y)
        grad_norm = norm(g)
        new_m = None
        if self.kind == "friendly":
            if self.convention == "paper":
                m = self.m if self.m is not None else [np.zeros_like(a) for a in g]
                new_m = [self.lmbda * mi + (1 - self.lmbda) * gi for mi, gi in zip(m, g)]
                d = [gi - self.sigma * mi for gi, mi in zip(g, new_m)]
            elif self.m is None:
                new_m, d = [a.copy() for a in g], list(g)
            else:
                d = [gi - self.sigma * mi for gi, mi in zip(g, self.m)]
                new_m = [self.lmbda * mi + (1 - self.lmbda) * gi for mi, gi in zip(self.m, g)]
        else:
            d = g
        d_norm = norm(d)
        factor = rho / (d_norm + self.epsilon) if d_norm > 0 else 0.0
        perturbed = [p + factor * a for p, a in zip(params, d)]
        pert_loss, g_s = self.loss_and_grads(perturbed, x, y)
        pert_norm = norm(g_s)
        gamma_s = grad_norm / (pert_norm + self.epsilon) if self.stable else 1.0
        u = [gamma_s * a for a in g_s]
        fallback = pert_norm == 0.0 and grad_norm > 0.0
        if fallback:
            gamma_s, u = 1.0, list(g)
        term = None
        if self.kind == "gsam":
            if fallback:
                c = 1.0
            elif self.gsam_eps is None:
                uu = dot(u, u)
                c = dot(g, u) / uu if uu > 0 else 0.0
            else:  # pytorch_optimizer's gradient_decompose, on g_s (no stable there)
                eps = self.gsam_eps
                cosine = dot(g, u) / (pert_norm * grad_norm + eps)
                c = cosine * grad_norm / (pert_norm + eps)
            base = [(1 + self.alpha * c) * ui - self.alpha * gi for ui, gi in zip(u, g)]
        elif self.kind == "friendly":
            base = u
        else:
            a = self.gamma / (1 - self.gamma)
            if self.decouple:
                base, term = list(g), [a * (ui - gi) for ui, gi in zip(u, g)]
            else:
                base = [gi + a * (ui - gi) for ui, gi in zip(u, g)]
        rec = dict(loss=loss, grads=g, grad_norm=grad_norm, perturbed_grad_norm=pert_norm,
                   renorm_factor=gamma_s, sharpness=pert_loss - loss,
                   clean_fallback=float(fallback), direction=d, e=[factor * a for a in d])
        return base, term, new_m, rec

    def step(self, params, x, y, t, lr):
        """`(base_grads, decoupled_term or None, record)` for iteration `t`
        at `params`, with `lr` the base learning rate of the step."""
        rho, raw_rho = self.rho_at(lr)
        if not runs_perturbed_pass(t, seed=self.seed, probability=self.probability):
            loss, g = self.loss_and_grads(params, x, y)
            return list(g), None, dict(perturbed=False, loss=loss, grads=g, rho=rho, raw_rho=raw_rho, t=t)
        pairs = [(cx, cy) for cx, cy in zip(np.array_split(x, self.splits), np.array_split(y, self.splits))
                 if len(cx)]
        weights = [len(cx) / len(x) for cx, _ in pairs]
        chunks = [self._chunk(params, cx, cy, rho) for cx, cy in pairs]

        def mean(parts):
            return [sum(w * p[i] for w, p in zip(weights, parts)) for i in range(len(parts[0]))]

        base = mean([c[0] for c in chunks])
        term = None if chunks[0][1] is None else mean([c[1] for c in chunks])
        if self.kind == "friendly":
            self.m = mean([c[2] for c in chunks])
        rec = {key: float(np.dot(weights, [c[3][key] for c in chunks])) for key in DIAGNOSTICS}
        rec.update(perturbed=True, loss=self.loss_and_grads(params, x, y)[0], rho=rho, raw_rho=raw_rho,
                   t=t, chunks=[c[3] for c in chunks],
                   m=None if self.m is None else [a.copy() for a in self.m])
        return base, term, rec


def run(ref, params, batches, optimizer, lr_shift=0):
    """Trains `params` over `batches` with the reference `ref` and a
    `KerasSGD`; the decoupled WSAM term is applied after the base update with
    the step's learning rate. Returns `(trajectory, records)`.

    `lr_shift` models a wrong implementation: GSAM's rho and WSAM's
    decoupled term read the learning rate `lr_shift` steps later (1: after
    the base optimizer advanced its iteration) while the base update keeps
    the step's."""
    params = [np.array(p, dtype=np.float64) for p in params]
    trajectory, records = [], []
    for x, y in batches:
        t = optimizer.iterations
        lr = optimizer.lr(t + lr_shift)
        base, term, rec = ref.step(params, x, y, t, lr)
        params = optimizer.apply(params, base)
        if term is not None:
            params = [p - lr * d for p, d in zip(params, term)]
        rec["lr"] = lr
        trajectory.append(params)
        records.append(rec)
    return trajectory, records

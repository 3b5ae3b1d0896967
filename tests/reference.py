"""A float64 NumPy reference of the SAM family, written out by hand.

No autodiff library is used: the models below have hand-written forward and
backward passes, and the SAM step and the base optimizer (Keras SGD with
momentum) are spelled out line by line, so that `keras_ssam` can be checked
against arithmetic that shares none of its code.

With `g` the gradient of the batch loss at `w` and `T = |w| + eta` when
adaptive (else 1), one step is (all norms global L2 over every weight):

    e     = rho * T^2 g / (||T g|| + epsilon)      normalize=True  (SAM, ASAM)
    e     = rho * T^2 g                            normalize=False (USAM)
    g_asc = gradient of the same batch loss at w + e
    gamma = ||T(w) g|| / (||T(w+e) g_asc|| + epsilon),
            then min(gamma, max_scale) if max_scale  (stable=True, SSAM)
    w     <- base optimizer update of w with gamma * g_asc (or g_asc),
             or with g on a step where g_asc == 0 while g != 0

Keras SGD (keras/src/optimizers/sgd.py, nesterov=False):
    v <- momentum * v - lr * grad;  w <- w + v       (momentum != 0)
    w <- w - lr * grad                               (momentum == 0)
"""

import dataclasses

import numpy as np

# --------------------------------------------------------------------------
# Models: loss and gradient of one batch, by hand.
# --------------------------------------------------------------------------


class TanhMLP:
    """`y = tanh(x W1 + b1) W2 + b2` with Keras's "mse" loss.

    The loss is `mean((y - t)^2)` over all `N * out` elements, as Keras's
    `"mse"` with the default "sum_over_batch_size" reduction gives. The
    parameters are `[W1 (in, hidden), b1 (hidden,), W2 (hidden, out),
    b2 (out,)]`, the order of `keras.Sequential([Dense(hidden, "tanh"),
    Dense(out)]).get_weights()`.
    """

    @staticmethod
    def init_params(rng, n_in=4, n_hidden=5, n_out=2, scale=0.7):
        """Random parameters, rounded to float32 and held in float64 so that a
        float32 Keras model can start from exactly the same values. Biases are
        non-zero so that ASAM with eta=0 perturbs them too."""
        shapes = [(n_in, n_hidden), (n_hidden,), (n_hidden, n_out), (n_out,)]
        return [
            (scale * rng.standard_normal(s)).astype(np.float32).astype(np.float64)
            for s in shapes
        ]

    @staticmethod
    def loss(params, x, t):
        """The batch loss at `params`."""
        w1, b1, w2, b2 = params
        y = np.tanh(x @ w1 + b1) @ w2 + b2
        return np.mean((y - t) ** 2)

    @staticmethod
    def loss_and_grads(params, x, t):
        """`(loss, [dL/dW1, dL/db1, dL/dW2, dL/db2])` by backpropagation."""
        w1, b1, w2, b2 = params
        h = np.tanh(x @ w1 + b1)
        y = h @ w2 + b2
        r = y - t
        loss = np.mean(r**2)
        dy = 2.0 * r / r.size  # d mean(r^2) / dy
        dw2 = h.T @ dy
        db2 = dy.sum(axis=0)
        dz = (dy @ w2.T) * (1.0 - h**2)  # tanh' = 1 - tanh^2
        dw1 = x.T @ dz
        db1 = dz.sum(axis=0)
        return loss, [dw1, db1, dw2, db2]


class ScalarLinear:
    """One weight `w` (a `(1, 1)` kernel, no bias) and `y = w x`, with
    Keras's "mse" loss `mean((w x - t)^2)` (a quadratic in `w`) or its
    "log_cosh" loss `mean(log cosh(w x - t))` (convex, not quadratic)."""

    def __init__(self, loss="mse"):
        if loss not in ("mse", "log_cosh"):
            raise ValueError(f"unknown loss {loss!r}")
        self.loss_name = loss

    def loss(self, params, x, t):
        (w,) = params
        r = x @ w - t
        if self.loss_name == "mse":
            return np.mean(r**2)
        return np.mean(np.log(np.cosh(r)))

    def loss_and_grads(self, params, x, t):
        (w,) = params
        r = x @ w - t
        if self.loss_name == "mse":
            return np.mean(r**2), [x.T @ (2.0 * r / r.size)]
        return np.mean(np.log(np.cosh(r))), [x.T @ (np.tanh(r) / r.size)]


# --------------------------------------------------------------------------
# The SAM step.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SAMConfig:
    """The hyper-parameters of `keras_ssam.SAM`, with the same defaults."""

    rho: float = 0.05
    normalize: bool = True
    stable: bool = False
    adaptive: bool = False
    eta: float = 0.0
    max_scale: float | None = None
    epsilon: float = 1e-12

    def keras_kwargs(self):
        """Keyword arguments for `keras_ssam.SAM(base, **kwargs)`."""
        return dataclasses.asdict(self)


def global_norm(arrays):
    """`sqrt(sum_i ||a_i||^2)`: one L2 norm over all the arrays."""
    return np.sqrt(sum(np.sum(np.square(a)) for a in arrays))


def adaptive_scale(params, config):
    """ASAM's `T(w) = |w| + eta` per weight, or 1 when not adaptive."""
    if config.adaptive:
        return [np.abs(p) + config.eta for p in params]
    return [np.ones_like(p) for p in params]


def perturbation(params, grads, config):
    """The ascent step `e` and `||T g||`."""
    t = adaptive_scale(params, config)
    t_grads = [ti * gi for ti, gi in zip(t, grads)]
    grad_norm = global_norm(t_grads)
    factor = config.rho
    if config.normalize:
        factor = config.rho / (grad_norm + config.epsilon)
    return [factor * ti * tg for ti, tg in zip(t, t_grads)], grad_norm


def sam_step_gradient(loss_and_grads, params, x, t, config, ascent_at=None):
    """The gradient SAM hands to the base optimizer, and the intermediates.

    Args:
        loss_and_grads: `f(params, x, t) -> (loss, grads)`.
        params: the weights `w`.
        x, t: the batch.
        config: a `SAMConfig`.
        ascent_at: where to take the second gradient instead of `w + e`
            (only to model wrong implementations); `None` is correct SAM.

    Returns:
        `(update, info)`; `info` holds `loss`, `g`, `e`, `perturbed` (`w + e`),
        `g_asc`, `grad_norm`, `perturbed_norm`, `gamma_raw` (before
        `max_scale`), `gamma` (1 when not stable) and `fallback` (the step
        took the clean gradient `g`: `g_asc` is 0 while `g` is not).
    """
    loss, g = loss_and_grads(params, x, t)
    e, grad_norm = perturbation(params, g, config)
    perturbed = [p + ei for p, ei in zip(params, e)]
    where = perturbed if ascent_at is None else ascent_at
    _, g_asc = loss_and_grads(where, x, t)
    t_pert = adaptive_scale(where, config)
    perturbed_norm = global_norm([ti * gi for ti, gi in zip(t_pert, g_asc)])
    gamma_raw = gamma = 1.0
    if config.stable:
        gamma_raw = grad_norm / (perturbed_norm + config.epsilon)
        gamma = gamma_raw if config.max_scale is None else min(gamma_raw, config.max_scale)
    update = [gamma * gi for gi in g_asc]
    # A perturbed gradient that vanishes (the ascent saturated the loss)
    # while the clean one does not: the step takes the clean gradient.
    fallback = perturbed_norm == 0.0 and grad_norm > 0.0
    if fallback:
        update = list(g)
    info = dict(
        fallback=fallback,
        loss=loss,
        g=g,
        e=e,
        perturbed=perturbed,
        g_asc=g_asc,
        grad_norm=grad_norm,
        perturbed_norm=perturbed_norm,
        gamma_raw=gamma_raw,
        gamma=gamma,
    )
    return update, info


# --------------------------------------------------------------------------
# The base optimizer and training loops.
# --------------------------------------------------------------------------


class SGD:
    """Keras's `SGD(learning_rate, momentum)` with `nesterov=False`."""

    def __init__(self, learning_rate, momentum=0.0):
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.velocities = None

    def step(self, params, grads):
        """The new weights after one update of `params` with `grads`."""
        if self.momentum == 0:
            return [p - self.learning_rate * g for p, g in zip(params, grads)]
        if self.velocities is None:
            self.velocities = [np.zeros_like(p) for p in params]
        self.velocities = [
            self.momentum * v - self.learning_rate * g
            for v, g in zip(self.velocities, grads)
        ]
        return [p + v for p, v in zip(params, self.velocities)]


# Step orders: the correct one and the wrong ones a buggy implementation might
# use (the "perturbation applied after the second gradient" family).
CORRECT = "correct"
# The second gradient is taken at w (the perturbation comes too late to
# matter): the base optimizer sees the plain gradient.
ASCENT_AT_W = "ascent_gradient_at_w"
# The update is applied to w + e instead of w (the ascent is never undone).
UPDATE_AT_PERTURBED = "update_applied_at_w_plus_e"
# The perturbation is applied after the second gradient and kept for the next
# step: step k's second gradient is taken at w_k + e_{k-1}.
STALE_PERTURBATION = "stale_perturbation_from_previous_step"
WRONG_ORDERS = (ASCENT_AT_W, UPDATE_AT_PERTURBED, STALE_PERTURBATION)


def train(loss_and_grads, params, batches, config, optimizer, order=CORRECT):
    """Runs SAM over `batches` and records the weights after every step.

    Args:
        loss_and_grads: `f(params, x, t) -> (loss, grads)`.
        params: the initial weights (not modified).
        batches: an iterable of `(x, t)`.
        config: a `SAMConfig`, or `None` for plain training with `optimizer`.
        optimizer: an `SGD` (its state is advanced).
        order: `CORRECT` or one of `WRONG_ORDERS`.

    Returns:
        `(trajectory, infos)`: the weights after each step, and each step's
        `info` from `sam_step_gradient` (empty dicts when `config` is None).
    """
    params = [np.array(p, dtype=np.float64) for p in params]
    trajectory, infos = [], []
    previous_e = [np.zeros_like(p) for p in params]
    for x, t in batches:
        if config is None:
            _, update = loss_and_grads(params, x, t)
            info = {}
        else:
            ascent_at = None
            if order == ASCENT_AT_W:
                ascent_at = params
            elif order == STALE_PERTURBATION:
                ascent_at = [p + e for p, e in zip(params, previous_e)]
            elif order not in (CORRECT, UPDATE_AT_PERTURBED):
                raise ValueError(f"unknown order {order!r}")
            update, info = sam_step_gradient(
                loss_and_grads, params, x, t, config, ascent_at=ascent_at
            )
            previous_e = info["e"]
            if order == UPDATE_AT_PERTURBED:
                params = info["perturbed"]
        params = optimizer.step(params, update)
        trajectory.append(params)
        infos.append(info)
    return trajectory, infos

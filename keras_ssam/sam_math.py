"""The SAM family's arithmetic as small pure functions in `keras.ops`.

Every norm is one global L2 norm over all trainable weights, accumulated in
float32 (float64 when the weights are float64), so it is the same on every
backend and under mixed precision. Gradients may be `None` (a weight the loss
does not reach): they count as zero in norms and stay `None` in outputs.

References:
  SAM:  Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
        Generalization", ICLR 2021 (arXiv 2010.01412).
  ASAM: Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for
        Scale-Invariant Learning of Deep Neural Networks", ICML 2021
        (arXiv 2102.11600).
  SSAM: Tan et al., "Stabilizing Sharpness-aware Minimization Through A Simple
        Renormalization Strategy", JMLR 2025 (arXiv 2401.07250), Algorithm 1.
  GSAM: Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization",
        ICLR 2022 (arXiv 2203.08065), Algorithm 1.
  F-SAM: Li et al., "Friendly Sharpness-Aware Minimization", CVPR 2024
        (arXiv 2403.12350), Algorithm 1.
  WSAM: Yue et al., "Sharpness-Aware Minimization Revisited: Weighted
        Sharpness as a Regularization Term", KDD 2023 (arXiv 2305.15817).
"""

from keras import ops

from keras_ssam import _kernels


def _norm_dtype(tensors):
    for t in tensors:
        if t is not None and ops.dtype(t) == "float64":
            return "float64"
    return "float32"


def global_norm(tensors):
    """`sqrt(sum_i ||t_i||^2)` over the tensors that are not `None`."""
    present = [t for t in tensors if t is not None]
    if not present:
        return ops.zeros((), "float32")
    dtype = _norm_dtype(present)
    return ops.sqrt(_kernels.sum_of_squares([ops.cast(t, dtype) for t in present]))


def safe_divide(numerator, denominator, default):
    """`numerator / denominator`, or `default` where the denominator is 0.

    Neither branch produces NaN, so a zero gradient never yields one.
    """
    positive = ops.greater(denominator, 0)
    safe = ops.where(positive, denominator, ops.ones_like(denominator))
    return ops.where(positive, numerator / safe, default)


def adaptive_scale(weights, eta):
    """ASAM's elementwise operator `T(w) = |w| + eta` (Kwon et al., eq. 10)."""
    return [None if w is None else ops.abs(w) + eta for w in weights]


def _scale_list(tensors, factor, overwrite=False):
    return (_kernels.scale_ if overwrite else _kernels.scale)(tensors, factor)


def sam_perturbation(
    grads,
    weights,
    rho,
    *,
    normalize=True,
    adaptive=False,
    eta=0.0,
    epsilon=1e-12,
    grad_scale=None,
    overwrite_grads=False,
    mask=None,
):
    """The ascent step `e` of SAM, USAM and ASAM.

        T = |w| + eta (adaptive) or 1
        e = rho * T^2 g / (||T g|| + epsilon)     if normalize  (SAM, ASAM)
        e = rho * T^2 g                           otherwise     (USAM)

    Args:
        grads: gradients of the batch loss at `weights`, possibly multiplied by
            a loss scale `grad_scale` (mixed precision); `e` is computed from
            the unscaled gradient `g = grads / grad_scale`.
        weights: the current weight values `w`.
        rho: the perturbation radius, a scalar.
        normalize: as in `keras_ssam.SAM`.
        adaptive: as in `keras_ssam.SAM`.
        eta: as in `keras_ssam.SAM`.
        epsilon: as in `keras_ssam.SAM`.
        grad_scale: the factor the loss was multiplied by, or `None`.
        overwrite_grads: the caller gives `grads` up; `e` may be computed in
            their memory (torch does, saving one copy of the gradients).
        mask: a bool per weight, or `None` (all): the weights left out get
            no perturbation and are left out of `||T g||` (see
            `keras_ssam.SAM`'s `perturb`).

    Returns:
        `(e, grad_norm)`: the perturbation per weight (`None` where the
        gradient is `None` or the weight is masked out) and `||T g||` of the
        unscaled gradient over all weights.
    """
    full_norm = None
    if mask is not None:
        # gamma and the diagnostics take the norm over every weight.
        full_norm = weighted_grad_norm(grads, weights, adaptive=adaptive, eta=eta, grad_scale=grad_scale)
        grads = [g if keep else None for g, keep in zip(grads, mask)]
        weights = [w if keep else None for w, keep in zip(weights, mask)]
    if adaptive:
        t_weights = adaptive_scale(weights, eta)
        t_grads = [
            None if g is None else g * ops.cast(t, ops.dtype(g))
            for g, t in zip(grads, t_weights)
        ]
        owned = True  # T g is a new tensor
    else:
        t_weights = None
        t_grads = list(grads)
        owned = overwrite_grads
    grad_norm = global_norm(t_grads)
    inv_scale = 1.0 if grad_scale is None else 1.0 / ops.cast(grad_scale, ops.dtype(grad_norm))
    grad_norm = grad_norm * inv_scale
    if normalize:
        # rho / ||T g|| applied to the scaled gradient needs one more 1/scale.
        zero = ops.zeros_like(grad_norm)
        factor = safe_divide(rho * inv_scale, grad_norm + epsilon, zero)
    else:
        factor = rho * inv_scale
    if adaptive:
        t_grads = [
            None if g is None else g * ops.cast(t, ops.dtype(g))
            for g, t in zip(t_grads, t_weights)
        ]
    return _scale_list(t_grads, factor, overwrite=owned), (grad_norm if full_norm is None else full_norm)


def weighted_grad_norm(grads, weights, *, adaptive=False, eta=0.0, grad_scale=None):
    """`||T(w) g||` of the unscaled gradient `g = grads / grad_scale` at
    `weights` (`T = 1` unless `adaptive`): the clean `||T(w) g||` at `w`,
    or `||T(w + e) g_asc||` at `w + e`."""
    if adaptive:
        t_weights = adaptive_scale(weights, eta)
        grads = [
            None if g is None else g * ops.cast(t, ops.dtype(g))
            for g, t in zip(grads, t_weights)
        ]
    norm = global_norm(grads)
    if grad_scale is not None:
        norm = norm / ops.cast(grad_scale, ops.dtype(norm))
    return norm


def renormalization_factor(grad_norm, perturbed_norm, *, epsilon=1e-12, max_scale=None):
    """SSAM's `gamma = ||T(w) g|| / (||T(w+e) g_asc|| + epsilon)`.

    Optionally clipped to `max_scale` (the authors' code keeps a commented
    `min(1, gamma)` for extra stability). Where the denominator is zero the
    perturbed gradient is zero too, and gamma is reported as 1.
    """
    gamma = safe_divide(grad_norm, perturbed_norm + epsilon, ops.ones_like(grad_norm))
    if max_scale is not None:
        gamma = ops.minimum(gamma, ops.cast(max_scale, ops.dtype(gamma)))
    return gamma


def perturbed_gradient_vanished(grad_norm, perturbed_norm):
    """Whether the gradient at `w + e` is exactly zero while the one at `w`
    is not: a scalar boolean.

    It happens when the ascent saturates the loss, e.g. a softmax output
    whose probabilities all fall below the cross-entropy's clip at
    `w + e`: every variant's update gradient (`g_asc`, or SSAM's
    `gamma g_asc`) is then 0, and training would silently stop.
    """
    return ops.logical_and(ops.equal(perturbed_norm, 0), ops.greater(grad_norm, 0))


def clean_gradient_fallback(update_grads, grads, vanished, overwrite=False):
    """The clean gradient `g` where `vanished`, else the update gradient.

    With `overwrite`, the caller gives `update_grads` up and torch selects
    in place.
    """
    return (_kernels.select_ if overwrite else _kernels.select)(vanished, grads, update_grads)


def scale_gradients(grads, factor, overwrite=False):
    """`factor * g` for each gradient that is not `None`.

    With `overwrite`, the caller gives `grads` up and torch scales in place.
    """
    return _scale_list(grads, factor, overwrite=overwrite)


def _dot(a, b):
    """`<a, b>` over the pairs where both are present, in float32."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs:
        return ops.zeros((), "float32")
    dtype = _norm_dtype([x for x, _ in pairs])
    if all(ops.dtype(x) == dtype and ops.dtype(y) == dtype for x, y in pairs):
        return _kernels.dot([x for x, _ in pairs], [y for _, y in pairs])
    return sum(ops.sum(ops.cast(x, dtype) * ops.cast(y, dtype)) for x, y in pairs)


def _per_tensor_or_global(fn, *tensor_lists, layerwise):
    """`fn` of each tensor (tuple) when `layerwise`, else of the whole lists,
    repeated for each tensor."""
    if layerwise:
        return [
            None if ts[0] is None else fn(*[[t] for t in ts]) for ts in zip(*tensor_lists)
        ]
    value = fn(*tensor_lists)
    return [value] * len(tensor_lists[0])


def orthogonal_component(grads, perturbed_grads, *, layerwise=False):
    """The part of `b = perturbed_grads` orthogonal to `a = grads`:

        b - (<a, b> / ||a||^2) a

    with the inner product and norm over all weights, or per weight tensor
    when `layerwise`; where `a` is 0, `b` itself.

    LookSAM's stored direction `g_v = g_s - (<g, g_s> / ||g||^2) g` (Liu et
    al., "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR
    2022, Algorithm 1; `layerwise` is its large-batch variant) is
    `orthogonal_component(g, g_s)`; GSAM's `g_perp` is
    `orthogonal_component(g_asc, g)`.
    """

    def coefficient(g, g_s):
        return safe_divide(_dot(g, g_s), _dot(g, g), ops.zeros((), "float32"))

    coefficients = _per_tensor_or_global(coefficient, grads, perturbed_grads, layerwise=layerwise)
    both = [i for i, (g, g_s) in enumerate(zip(grads, perturbed_grads)) if g is not None and g_s is not None]
    new = _kernels.add_scaled(
        [perturbed_grads[i] for i in both],
        [grads[i] for i in both],
        [-ops.cast(coefficients[i], ops.dtype(perturbed_grads[i])) for i in both],
    )
    result = list(perturbed_grads)
    for i, value in zip(both, new):
        result[i] = value
    return result


def reuse_orthogonal_component(grads, orthogonal, alpha, *, layerwise=False, overwrite_grads=False):
    """LookSAM's gradient on a step without the perturbed pass (Liu et al.
    2022, Algorithm 1):

        g + alpha (||g|| / ||g_v||) g_v

    with norms over all weights, or per weight tensor when `layerwise`; a
    `g_v` of norm 0 adds nothing. With `overwrite_grads`, the caller gives
    `grads` up and torch computes the result in their memory.
    """

    def coefficient(g, g_v):
        zero = ops.zeros((), "float32")
        return alpha * safe_divide(global_norm(g), global_norm(g_v), zero)

    coefficients = _per_tensor_or_global(coefficient, grads, orthogonal, layerwise=layerwise)
    if overwrite_grads:
        return _kernels.add_scaled_(grads, orthogonal, coefficients)
    return [
        None if g is None else g + ops.cast(c, ops.dtype(g)) * g_v
        for g, g_v, c in zip(grads, orthogonal, coefficients)
    ]


def rescale_to_norm(tensors, norm):
    """`tensors * norm / ||tensors||` (unchanged where their norm is 0)."""
    factor = safe_divide(norm, global_norm(tensors), ops.ones_like(norm))
    return _kernels.scale(tensors, factor)


def surrogate_gap_coefficient(perturbed_grads, grads):
    """`<g, g_asc> / ||g_asc||^2` over all weights (0 where `g_asc` is 0)."""
    return safe_divide(_dot(grads, perturbed_grads), _dot(perturbed_grads, perturbed_grads), ops.zeros((), "float32"))


def surrogate_gap_update(perturbed_grads, grads, alpha, *, coefficient=None):
    """GSAM's update gradient (Zhuang et al. 2022, Algorithm 1):

        g_perp = g - c g_asc,   c = <g, g_asc> / ||g_asc||^2
        update = g_asc - alpha * g_perp = (1 + alpha c) g_asc - alpha g

    `g_perp`, the clean gradient's component orthogonal to the perturbed
    one, ascends the surrogate gap `L(w + e) - L(w)`; subtracting it lowers
    the gap without changing the descent along `g_asc`. `coefficient` is `c`
    when the caller has it (from all-reduced gradients while `grads` are a
    replica's share: the update is linear in the gradients, so the
    replicas' shares sum to the global update).
    """
    if coefficient is None:
        coefficient = surrogate_gap_coefficient(perturbed_grads, grads)
    return [
        None if g_asc is None else (
            g_asc if g is None
            else (1.0 + alpha * ops.cast(coefficient, ops.dtype(g_asc))) * g_asc - alpha * g
        )
        for g_asc, g in zip(perturbed_grads, grads)
    ]


def gradient_moving_average(momentum, grads, lmbda, *, grad_scale=None):
    """An exponential moving average of the unscaled batch gradients:

        m_t = lmbda * m_{t-1} + (1 - lmbda) * g_t       (m_0 = 0)

    F-SAM's estimate of the full gradient (Li et al. 2024, Algorithm 1), and
    Momentum-SAM's direction when the base optimizer has none; a `None`
    gradient leaves its entry unchanged.
    """
    inv_scale = 1.0 if grad_scale is None else 1.0 / grad_scale
    return [
        m if g is None else lmbda * m + (1.0 - lmbda) * ops.cast(g, m.dtype) * ops.cast(inv_scale, m.dtype)
        for m, g in zip(momentum, grads)
    ]


def friendly_ascent_direction(grads, momentum, sigma, *, grad_scale=None):
    """F-SAM's ascent direction (Li et al. 2024, Algorithm 1):

        d_t = g_t - sigma * m_t

    the batch gradient less (sigma times) the estimate of the full gradient,
    in the units of `grads` (times `grad_scale` when they carry one); SAM's
    ascent then normalizes `d_t` instead of `g_t`.
    """
    scale = 1.0 if grad_scale is None else grad_scale
    return [
        None if g is None else g - ops.cast(sigma * ops.cast(scale, m.dtype) * m, ops.dtype(g))
        for g, m in zip(grads, momentum)
    ]


def weighted_sharpness_gradient(perturbed_grads, grads, gamma):
    """WSAM's gradient of `L(w) + gamma / (1 - gamma) * (L(w + e) - L(w))`
    (Yue et al. 2023):

        g + gamma / (1 - gamma) * (g_asc - g)

    gamma = 1/2 is SAM's `g_asc`, gamma = 0 the clean gradient.
    """
    weight = gamma / (1.0 - gamma)
    return [
        None if g_asc is None else g_asc if g is None else g + weight * (g_asc - g)
        for g_asc, g in zip(perturbed_grads, grads)
    ]


def decoupled_sharpness_term(perturbed_grads, grads, gamma):
    """WSAM's decoupled sharpness term (Yue et al. 2023, Algorithm 1):

        gamma / (1 - gamma) * (g_asc - g)

    subtracted from the weights after the base optimizer's update with `g`,
    times its learning rate (see `decoupled_step`); `None` where either
    gradient is.
    """
    weight = gamma / (1.0 - gamma)
    return [
        None if g_asc is None or g is None else weight * (g_asc - g)
        for g_asc, g in zip(perturbed_grads, grads)
    ]


def decoupled_step(weights, terms, learning_rate):
    """WSAM's decoupled sharpness step after the base optimizer's update
    (Yue et al. 2023, Algorithm 1):

        w <- w - lr * term,   term = gamma / (1 - gamma) * (g_asc - g)

    for each weight with a term (`None`: unchanged). A step whose terms are
    not all finite (a mixed-precision overflow) leaves the weights as they
    are, as `LossScaleOptimizer` does with a non-finite gradient.
    """
    present = [t for t in terms if t is not None]
    if not present:
        return list(weights)
    finite = ops.all(ops.stack([ops.all(ops.isfinite(t)) for t in present]))
    return [
        w if t is None else ops.where(
            finite, w - ops.cast(learning_rate, ops.dtype(w)) * ops.cast(t, ops.dtype(w)), w
        )
        for w, t in zip(weights, terms)
    ]


def momentum_ascent(direction, rho, *, sign=1.0, epsilon=1e-12):
    """Momentum-SAM's perturbation (Becker et al., "Momentum-SAM: Sharpness
    Aware Minimization without Computational Overhead", arXiv 2401.12033,
    Algorithm 1; the authors' `optimizer/msam.py`):

        e = -rho * v / (||v|| + epsilon)

    with `v` the accumulated gradient (the momentum `v <- mu v + g`, or any
    positive multiple of it such as Adam's first moment), so that the step's
    gradient is taken at `w - rho v / ||v||`, ahead along the descent the
    momentum is making. `direction` is what the optimizer stores, `sign * v`
    up to a positive factor (Keras's SGD stores `-lr v`: `sign=-1`); entries
    `None` are not perturbed and stay out of the norm. A zero momentum (the
    first step) gives `e = 0`.

    Returns:
        `(e, ||v||)`.
    """
    norm = global_norm(direction)
    factor = safe_divide(-sign * rho, norm + epsilon, ops.zeros_like(norm))
    return _kernels.scale(direction, factor), norm


def filter_wise_noise(weights, normals, sigma, *, fisher=None, eta=1.0):
    """Random weight perturbation's noise (Li et al., "Revisiting Random
    Weight Perturbation for Efficiently Improving Generalization", TMLR 2024;
    the authors' code nblt/mARWP):

        eps_j = sigma * ||W_j|| * z_j / sqrt(1 + eta * F_j)

    for each output unit `j` of a weight with two or more axes (Keras keeps
    output units on the last axis: `W_j = W[..., j]`, and `F_j` sums `F`
    over that slice), and with the whole tensor's norm plus 1e-16 (and `F`
    elementwise) for a vector or scalar, as the authors' code does. `normals`
    are standard normal draws `z` shaped as the weights; `fisher` (the
    adaptive variant, ARWP) is `F`, a running sum of squared perturbed
    gradients, or `None`. Entries `None` in `normals` are not perturbed.
    """
    result = []
    for i, (w, z) in enumerate(zip(weights, normals)):
        if z is None:
            result.append(None)
            continue
        w = ops.cast(w, ops.dtype(z))
        f = None if fisher is None else ops.cast(fisher[i], ops.dtype(z))
        if len(w.shape) >= 2:
            axes = tuple(range(len(w.shape) - 1))
            std = sigma * ops.sqrt(ops.sum(ops.square(w), axis=axes, keepdims=True))
            if f is not None:
                f = ops.sum(f, axis=axes, keepdims=True)
        else:
            std = sigma * (ops.sqrt(ops.sum(ops.square(w))) + 1e-16)
        if f is not None:
            std = std / ops.sqrt(1.0 + eta * f)
        result.append(std * z)
    return result


def mixed_gradient(perturbed_grads, grads, mix):
    """m-RWP's gradient (Li et al. 2024): `mix * g(w + eps) + (1 - mix) * g(w)`."""
    return [
        None if g_p is None else g_p if g is None else mix * g_p + (1.0 - mix) * g
        for g_p, g in zip(perturbed_grads, grads)
    ]


def squared_gradient_sum(fisher, grads, beta, *, grad_scale=None):
    """ARWP's curvature estimate (Li et al. 2024; the authors' code):

        F <- beta * F + g_eps**2

    of the unscaled gradients at the perturbed point; a `None` gradient
    leaves its entry unchanged.
    """
    inv_scale = 1.0 if grad_scale is None else 1.0 / grad_scale
    return [
        f if g is None else beta * f + ops.square(ops.cast(g, f.dtype) * ops.cast(inv_scale, f.dtype))
        for f, g in zip(fisher, grads)
    ]

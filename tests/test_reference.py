"""keras_ssam against a float64 NumPy reference (tests/reference.py).

Every variant (SAM, SAM+stable, USAM, SSAM, SSAM with max_scale, ASAM with
and without eta, adaptive SSAM, rho=0) trains a small tanh MLP with
`SAMModel.train_on_batch` and SGD with momentum, and its weights are compared
with the reference after every step. Further tests pin the order of the two
passes, rho=0 against plain `fit`, and SSAM's closed form in one dimension.
Runs on whichever backend KERAS_BACKEND selects.
"""

import os
import sys

import keras
import numpy as np
import pytest

import keras_ssam

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402

# Keras runs in float32 and the reference in float64. Over a few steps the
# float32 rounding stays around 1e-6 of each weight tensor's scale, so 1e-5
# relative (plus the absolute term below) is tight but safe.
RTOL = 1e-5
# The absolute tolerance for a weight tensor is ATOL_FRACTION times its largest
# magnitude. Float32 rounding errors scale with the size of the numbers being
# added (the tensor's entries, its gradient and momentum terms), not with the
# one entry: an entry that passes close to zero carries an absolute error of
# order 1e-7 times the tensor's scale, which a purely relative test would
# flag. 1e-5 of the tensor's scale is the largest atol allowed here.
ATOL_FRACTION = 1e-5
# "Visibly different": trajectories that must not match differ, relative to
# the weights' scale, by at least this much (100 times the tolerance).
DISTINCT = 100 * RTOL

LR, MOMENTUM, RHO = 0.1, 0.9, 0.2
ETA = 0.1
# Reference gammas of SSAM on this problem lie in about [0.71, 0.84]; 0.75
# clips most steps but not all (asserted in the test).
MAX_SCALE = 0.75
N_IN, N_HIDDEN, N_OUT = 4, 5, 2
BATCH, STEPS = 8, 5

# name -> (reference config, constructor of the keras_ssam optimizer).
# The named subclasses are used as a user would (USAM, SSAM) so that their
# defaults are checked too.
VARIANTS = {
    "sam": (
        ref.SAMConfig(rho=RHO),
        lambda base: keras_ssam.SAM(base, rho=RHO),
    ),
    "sam_stable": (
        ref.SAMConfig(rho=RHO, stable=True),
        lambda base: keras_ssam.SAM(base, rho=RHO, stable=True),
    ),
    "usam": (
        ref.SAMConfig(rho=RHO, normalize=False),
        lambda base: keras_ssam.USAM(base, rho=RHO),
    ),
    "ssam": (
        ref.SAMConfig(rho=RHO, normalize=False, stable=True),
        lambda base: keras_ssam.SSAM(base, rho=RHO),
    ),
    "ssam_max_scale": (
        ref.SAMConfig(rho=RHO, normalize=False, stable=True, max_scale=MAX_SCALE),
        lambda base: keras_ssam.SSAM(base, rho=RHO, max_scale=MAX_SCALE),
    ),
    "ssam_normalized": (
        ref.SAMConfig(rho=RHO, normalize=True, stable=True),
        lambda base: keras_ssam.SSAM(base, rho=RHO, normalize=True),
    ),
    "asam": (
        ref.SAMConfig(rho=RHO, adaptive=True),
        lambda base: keras_ssam.SAM(base, rho=RHO, adaptive=True),
    ),
    "asam_eta": (
        ref.SAMConfig(rho=RHO, adaptive=True, eta=ETA),
        lambda base: keras_ssam.SAM(base, rho=RHO, adaptive=True, eta=ETA),
    ),
    "adaptive_ssam": (
        ref.SAMConfig(rho=RHO, normalize=False, stable=True, adaptive=True),
        lambda base: keras_ssam.SSAM(base, rho=RHO, adaptive=True),
    ),
    "adaptive_ssam_normalized_eta": (
        ref.SAMConfig(rho=RHO, normalize=True, stable=True, adaptive=True, eta=ETA),
        lambda base: keras_ssam.SSAM(
            base, rho=RHO, normalize=True, adaptive=True, eta=ETA
        ),
    ),
    "rho0": (
        ref.SAMConfig(rho=0.0),
        lambda base: keras_ssam.SAM(base, rho=0.0),
    ),
}


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _f32(a):
    """Rounds to float32 and returns float64, so Keras and the reference see
    the very same numbers."""
    return np.asarray(a, np.float32).astype(np.float64)


def mlp_problem(seed=0, steps=STEPS):
    """Initial MLP parameters and `steps` different batches of a smooth
    regression task."""
    rng = np.random.default_rng(seed)
    params = ref.TanhMLP.init_params(rng, N_IN, N_HIDDEN, N_OUT)
    x = _f32(rng.standard_normal((steps * BATCH, N_IN)))
    true_w = rng.standard_normal((N_IN, N_OUT))
    t = _f32(np.sin(x @ true_w) + 0.1 * rng.standard_normal((steps * BATCH, N_OUT)))
    batches = [
        (x[i * BATCH : (i + 1) * BATCH], t[i * BATCH : (i + 1) * BATCH])
        for i in range(steps)
    ]
    return params, batches


def reference_run(config, params, batches, order=ref.CORRECT, momentum=MOMENTUM):
    return ref.train(
        ref.TanhMLP.loss_and_grads,
        params,
        batches,
        config,
        ref.SGD(LR, momentum),
        order=order,
    )


def build_mlp(params):
    model = keras.Sequential(
        [
            keras.Input((N_IN,)),
            keras.layers.Dense(N_HIDDEN, activation="tanh"),
            keras.layers.Dense(N_OUT),
        ]
    )
    model.set_weights([p.astype(np.float32) for p in params])
    return model


_KERAS_TRAJECTORIES = {}


def keras_variant_trajectory(variant):
    """`keras_sam_trajectory` of a variant of VARIANTS on `mlp_problem()`,
    computed once per session (two tests compare it with the reference)."""
    if variant not in _KERAS_TRAJECTORIES:
        params, batches = mlp_problem()
        _KERAS_TRAJECTORIES[variant] = keras_sam_trajectory(
            VARIANTS[variant][1], params, batches
        )
    return _KERAS_TRAJECTORIES[variant]


def keras_sam_trajectory(make_optimizer, params, batches):
    """Weights after each `train_on_batch` of a SAMModel."""
    model = keras_ssam.SAMModel(build_mlp(params))
    model.compile(
        optimizer=make_optimizer(keras.optimizers.SGD(LR, momentum=MOMENTUM)),
        loss="mse",
    )
    trajectory = []
    for x, t in batches:
        model.train_on_batch(x.astype(np.float32), t.astype(np.float32))
        trajectory.append([np.asarray(w, np.float64) for w in model.model.get_weights()])
    return trajectory


def distance(a, b):
    """Largest difference between two weight lists, each tensor's difference
    divided by that tensor's largest magnitude in `b`."""
    return max(np.max(np.abs(x - y)) / np.max(np.abs(y)) for x, y in zip(a, b))


def trajectory_distance(a, b):
    return max(distance(x, y) for x, y in zip(a, b))


def assert_weights_close(actual, expected, step, what=""):
    for i, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(
            a,
            e,
            rtol=RTOL,
            atol=ATOL_FRACTION * np.max(np.abs(e)),
            err_msg=f"{what} step {step + 1}, weight {i} ({e.shape})",
        )


# --------------------------------------------------------------------------
# The reference itself
# --------------------------------------------------------------------------


def test_reference_gradients_match_finite_differences():
    """The hand-written backward passes against central differences."""
    params, batches = mlp_problem()
    x, t = batches[0]
    problems = [
        (ref.TanhMLP, params),
        (ref.ScalarLinear("mse"), [np.array([[1.3]])]),
        (ref.ScalarLinear("log_cosh"), [np.array([[1.3]])]),
    ]
    for model, p in problems:
        xx = x[:, :1] if isinstance(model, ref.ScalarLinear) else x
        tt = t[:, :1] if isinstance(model, ref.ScalarLinear) else t
        _, grads = model.loss_and_grads(p, xx, tt)
        h = 1e-6
        for k, w in enumerate(p):
            numeric = np.zeros_like(w)
            for idx in np.ndindex(w.shape):
                plus = [q.copy() for q in p]
                minus = [q.copy() for q in p]
                plus[k][idx] += h
                minus[k][idx] -= h
                numeric[idx] = (model.loss(plus, xx, tt) - model.loss(minus, xx, tt)) / (2 * h)
            np.testing.assert_allclose(grads[k], numeric, rtol=1e-6, atol=1e-9)


def test_reference_variants_are_distinguishable():
    """Each variant's reference trajectory differs from every other's (and from
    plain SGD's) by far more than the tolerance, so the comparison with Keras
    can tell them apart; rho=0 is plain SGD, and SSAM(normalize=True) is
    SAM(stable=True) by definition."""
    params, batches = mlp_problem()
    sgd, _ = reference_run(None, params, batches)
    trajectories = {
        name: reference_run(config, params, batches)[0]
        for name, (config, _) in VARIANTS.items()
    }
    assert trajectory_distance(trajectories["rho0"], sgd) < 1e-12
    assert trajectory_distance(trajectories["ssam_normalized"], trajectories["sam_stable"]) == 0
    trajectories["sgd"] = sgd
    names = [n for n in trajectories if n not in ("rho0", "ssam_normalized")]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            d = trajectory_distance(trajectories[a], trajectories[b])
            assert d > DISTINCT, (a, b, d)


def test_reference_ssam_gamma_is_norm_ratio():
    """SSAM's gamma is ||g|| / ||g_asc|| (clipped at max_scale), and the update
    gradient has the norm of the clean one unless clipped."""
    params, batches = mlp_problem()
    for name in ("ssam", "ssam_normalized", "ssam_max_scale"):
        config = VARIANTS[name][0]
        _, infos = reference_run(config, params, batches)
        for info in infos:
            ratio = ref.global_norm(info["g"]) / ref.global_norm(info["g_asc"])
            # rtol covers only epsilon=1e-12 in the denominator.
            np.testing.assert_allclose(info["gamma_raw"], ratio, rtol=1e-10)
            expected = ratio if config.max_scale is None else min(ratio, config.max_scale)
            np.testing.assert_allclose(info["gamma"], expected, rtol=1e-10)
            update_norm = ref.global_norm([info["gamma"] * g for g in info["g_asc"]])
            if info["gamma"] == info["gamma_raw"]:
                np.testing.assert_allclose(update_norm, info["grad_norm"], rtol=1e-10)


# --------------------------------------------------------------------------
# keras_ssam against the reference
# --------------------------------------------------------------------------


def test_sam_math_matches_reference():
    """For every variant, the optimizer's `perturbation` and
    `update_gradients` (no train step) give the reference's e, ||T g||,
    ||T(w+e) g_asc||, gamma and update on the same inputs. (One test looping
    over the variants: it is cheap, and the per-test session reset is not.)"""
    params, batches = mlp_problem()
    x, t = batches[0]

    def tensors(arrays):
        return [keras.ops.convert_to_tensor(np.asarray(a, np.float32)) for a in arrays]

    def numpy(tensor_list):
        return [np.asarray(keras.ops.convert_to_numpy(a), np.float64) for a in tensor_list]

    def close_lists(actual, expected, what):
        for a, b in zip(actual, expected):
            np.testing.assert_allclose(
                a, b, rtol=RTOL, atol=ATOL_FRACTION * np.max(np.abs(b)), err_msg=what
            )

    for variant, (config, make_optimizer) in VARIANTS.items():
        _, info = ref.sam_step_gradient(ref.TanhMLP.loss_and_grads, params, x, t, config)
        sam = make_optimizer(keras.optimizers.SGD(LR, momentum=MOMENTUM))
        e, grad_norm = sam.perturbation(tensors(info["g"]), tensors(params))
        close_lists(numpy(e), info["e"], f"{variant}: e")
        np.testing.assert_allclose(
            float(grad_norm), info["grad_norm"], rtol=RTOL, err_msg=f"{variant}: ||T g||"
        )
        update, stats = sam.update_gradients(
            tensors(info["g"]),
            tensors(info["g_asc"]),
            tensors(info["perturbed"]),
            grad_norm,
            need_stats=True,
        )
        np.testing.assert_allclose(
            float(stats["perturbed_grad_norm"]),
            info["perturbed_norm"],
            rtol=RTOL,
            err_msg=f"{variant}: ||T(w+e) g_asc||",
        )
        np.testing.assert_allclose(
            float(stats["renorm_factor"]), info["gamma"], rtol=RTOL, err_msg=f"{variant}: gamma"
        )
        close_lists(
            numpy(update), [info["gamma"] * g for g in info["g_asc"]], f"{variant}: update"
        )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_on_batch_matches_reference_every_step(variant):
    config = VARIANTS[variant][0]
    params, batches = mlp_problem()
    expected, infos = reference_run(config, params, batches)
    sgd, _ = reference_run(None, params, batches)

    # The test can fail: the variant's trajectory is far from plain SGD's
    # (rho=0 must coincide with it instead).
    if config.rho == 0:
        assert trajectory_distance(expected, sgd) < 1e-12
    else:
        assert trajectory_distance(expected, sgd) > DISTINCT
    if config.max_scale is not None:
        gammas = [info["gamma_raw"] for info in infos]
        assert any(g > config.max_scale for g in gammas), gammas

    actual = keras_variant_trajectory(variant)
    for step, (a, e) in enumerate(zip(actual, expected)):
        assert_weights_close(a, e, step, variant)


@pytest.mark.parametrize("variant", ["sam", "usam", "ssam", "asam_eta"])
def test_perturbation_is_applied_before_the_second_gradient(variant):
    """Keras follows the correct order (ascent gradient at w + e, update
    applied at w) and is far from each wrong order: ascent gradient taken at
    w, update applied at w + e, or a stale perturbation from the previous
    step."""
    config = VARIANTS[variant][0]
    params, batches = mlp_problem()
    expected, _ = reference_run(config, params, batches)
    wrong = {
        order: reference_run(config, params, batches, order=order)[0]
        for order in ref.WRONG_ORDERS
    }
    actual = keras_variant_trajectory(variant)
    for step, (a, e) in enumerate(zip(actual, expected)):
        assert_weights_close(a, e, step, variant)
    for order, trajectory in wrong.items():
        d = trajectory_distance(actual, trajectory)
        assert d > DISTINCT, f"{variant}: Keras is {d:.2e} from the wrong order {order}"
        assert trajectory_distance(expected, trajectory) > DISTINCT, order


def _fit_data():
    params, batches = mlp_problem(seed=1, steps=4)
    x = np.concatenate([b[0] for b in batches]).astype(np.float32)
    t = np.concatenate([b[1] for b in batches]).astype(np.float32)
    return params, x, t


_PLAIN_FIT = []


def _plain_fit_weights():
    """Weights of the plain Keras model after `fit` (computed once)."""
    if not _PLAIN_FIT:
        params, x, t = _fit_data()
        plain = build_mlp(params)
        plain.compile(optimizer=keras.optimizers.SGD(LR, momentum=MOMENTUM), loss="mse")
        plain.fit(x, t, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        _PLAIN_FIT.append(plain.get_weights())
    return _PLAIN_FIT[0]


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda base: keras_ssam.SAM(base, rho=0.0),
        lambda base: keras_ssam.SSAM(base, rho=0.0),
        lambda base: keras_ssam.SAM(base, rho=0.0, adaptive=True, eta=ETA),
    ],
    ids=["sam", "ssam", "asam"],
)
def test_rho_zero_fit_equals_base_optimizer_fit(make_optimizer):
    """SAMModel with rho=0 and `fit` (4 batches, 2 epochs, shuffle=False) ends
    where a plain Keras model compiled with the same SGD does."""
    params, x, t = _fit_data()
    expected = _plain_fit_weights()
    inner = build_mlp(params)
    sam_model = keras_ssam.SAMModel(inner)
    sam_model.compile(
        optimizer=make_optimizer(keras.optimizers.SGD(LR, momentum=MOMENTUM)),
        loss="mse",
    )
    sam_model.fit(x, t, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)

    # Training moved the weights, so equality is not trivial.
    assert distance(expected, params) > DISTINCT
    for a, e in zip(inner.get_weights(), expected):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# SSAM in one dimension is gradient descent
# --------------------------------------------------------------------------


def scalar_problem(steps=6, n=8, seed=3):
    rng = np.random.default_rng(seed)
    x = _f32(rng.uniform(0.5, 2.0, (steps * n, 1)))
    t = _f32(0.5 * x + 0.3 * rng.standard_normal((steps * n, 1)))
    batches = [(x[i * n : (i + 1) * n], t[i * n : (i + 1) * n]) for i in range(steps)]
    return [np.array([[2.0]])], batches


ONE_D_CASES = [
    # (loss, normalize, learning rate, momentum, rho)
    ("mse", False, 0.1, 0.0, 0.5),
    ("log_cosh", False, 0.3, 0.5, 0.5),
    ("mse", True, 0.1, 0.5, 0.5),
]


def test_reference_1d_ssam_is_gradient_descent():
    """In 1-D with a convex loss g_asc has the sign of g, so gamma g_asc = g:
    SSAM is the base optimizer exactly, while USAM / SAM (same rho) are not.
    The notes' closed form: "SSAM with the unnormalized ascent is exactly
    gradient descent in one dimension" (and so is the normalized one)."""
    params, batches = scalar_problem()
    for loss, normalize, lr, momentum, rho in ONE_D_CASES:
        case = f"{loss}, normalize={normalize}"
        model = ref.ScalarLinear(loss)
        ssam = ref.SAMConfig(rho=rho, normalize=normalize, stable=True)
        gd, _ = ref.train(model.loss_and_grads, params, batches, None, ref.SGD(lr, momentum))
        traj, infos = ref.train(
            model.loss_and_grads, params, batches, ssam, ref.SGD(lr, momentum)
        )
        for info in infos:
            np.testing.assert_allclose(
                info["gamma"],
                ref.global_norm(info["g"]) / ref.global_norm(info["g_asc"]),
                rtol=1e-10,
                err_msg=case,
            )
            update = info["gamma"] * info["g_asc"][0]
            np.testing.assert_allclose(update, info["g"][0], rtol=1e-10, err_msg=case)
            assert abs(info["gamma"] - 1) > 1e-3, case  # a non-trivial renormalization
        for a, b in zip(traj, gd):
            np.testing.assert_allclose(a[0], b[0], rtol=1e-10, err_msg=case)
        plain_sam = ref.SAMConfig(rho=rho, normalize=normalize)
        other, _ = ref.train(
            model.loss_and_grads, params, batches, plain_sam, ref.SGD(lr, momentum)
        )
        assert trajectory_distance(other, gd) > DISTINCT, case


@pytest.mark.parametrize("loss,normalize,lr,momentum,rho", ONE_D_CASES)
def test_1d_ssam_train_on_batch_is_gradient_descent(loss, normalize, lr, momentum, rho):
    """A one-weight SAMModel trained with SSAM follows plain gradient descent
    (the reference's plain SGD trajectory) step by step."""
    params, batches = scalar_problem()
    gd, _ = ref.train(
        ref.ScalarLinear(loss).loss_and_grads, params, batches, None, ref.SGD(lr, momentum)
    )

    def one_weight_model():
        m = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])
        m.set_weights([params[0].astype(np.float32)])
        return m

    inner = one_weight_model()
    sam_model = keras_ssam.SAMModel(inner)
    sam_model.compile(
        optimizer=keras_ssam.SSAM(
            keras.optimizers.SGD(lr, momentum=momentum), rho=rho, normalize=normalize
        ),
        loss=loss,
    )
    for step, (x, t) in enumerate(batches):
        x, t = x.astype(np.float32), t.astype(np.float32)
        sam_model.train_on_batch(x, t)
        # One weight that stays in [0.2, 2]: float32 rounding is far below
        # 1e-5 of it, so no absolute term is needed.
        np.testing.assert_allclose(
            inner.get_weights()[0], gd[step][0], rtol=1e-5, err_msg=f"step {step + 1}"
        )

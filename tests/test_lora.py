"""SAM and SSAM on LoRA adapters (`layer.enable_lora(rank)`), on every backend.

After `enable_lora`, a Keras `Dense` / `EinsumDense` layer computes with the
kernel `W + (lora_alpha / rank) * A @ B` (keras/src/layers/core/dense.py and
einsum_dense.py, `kernel` and `call`): `W` becomes non-trainable, the factors
`A` (`lora_kernel_a`) and `B` (`lora_kernel_b`) and the bias are the
trainable weights. A SAM step must then perturb the trainable weights only,
and every norm (`||g||` in `e = rho g / ||g||`, SSAM's gamma, the logged
`grad_norm`) must cover exactly those weights.

The model: tokens x (N, T, D) -> EinsumDense "btd,dhk->bthk" (an attention
projection, as KerasHub's query/value layers; kernel (D, H, K), A (D, H, r),
B (r, K)) with LoRA -> reshape (N, T, H*K) -> Dense(OUT) with LoRA, linear,
MSE. Its gradients with respect to A, B and the biases are written out by
hand below in float64 NumPy (no Keras, no keras_ssam code), and SAM / SSAM
with plain SGD are run on them.

1. The trainable weights are the factors and the biases; the kernels are not.
2. SAM and SSAM steps (random A and B; and Keras's own init B = 0, where SAM
   moves A on the first step and SGD would not) match the reference, the
   frozen kernels stay bit-for-bit the same, the logged `grad_norm`,
   `perturbed_grad_norm` and `sharpness` match. Wrong references (the
   frozen kernels perturbed too; the norm taken over the kernels' gradients
   too; the LoRA scale `alpha / rank` dropped) lie far outside the
   tolerance.
3. `perturb="no_norm"` perturbs A and B but not the biases (SAM: the norm
   in `e` over A and B; gamma and `grad_norm` over all trainable weights).
4. `perturb="norm_only"` on a model whose normalization layers LoRA froze
   selects nothing and says so.
5. Save / load: Keras saves a LoRA layer with the factors merged into the
   kernel (`save_own_variables`) and loads it with zero factors: the loaded
   `SAMModel` predicts the same and keeps its SAM optimizer, but the LoRA
   factors start again from 0, where both get zero gradients: training the
   loaded model leaves them at 0 (see docs/guides/lora.md).
"""

import os

import keras
import numpy as np
import pytest
from keras import ops

import keras_ssam

LR = 0.05
RHO = 0.3
EPS = 1e-12
RTOL = 1e-5
ATOL_REL = 1e-6  # atol = ATOL_REL * weight scale

N, T, D, H, K, OUT = 6, 3, 4, 2, 3, 2  # batch, time, input, heads, head size, output
RANK1, ALPHA1 = 2, 3  # EinsumDense: scale 1.5
RANK2, ALPHA2 = 2, 5  # Dense: scale 2.5
S1, S2 = ALPHA1 / RANK1, ALPHA2 / RANK2

FROZEN = ("W1", "W2")
TRAINABLE = ("b1", "A1", "B1", "b2", "A2", "B2")
# Keras's variable of each reference parameter: (layer name, variable name).
VARIABLES = {
    "W1": ("proj", "kernel"), "b1": ("proj", "bias"),
    "A1": ("proj", "lora_kernel_a"), "B1": ("proj", "lora_kernel_b"),
    "W2": ("head", "kernel"), "b2": ("head", "bias"),
    "A2": ("head", "lora_kernel_a"), "B2": ("head", "lora_kernel_b"),
}
TRAINABLE_PATHS = {"/".join(VARIABLES[n]) for n in TRAINABLE}

VARIANTS = ["sam", "ssam"]


# --------------------------------------------------------------------------
# float64 NumPy reference
# --------------------------------------------------------------------------


def forward(p, x, s1=S1, s2=S2):
    k1 = p["W1"] + s1 * np.einsum("dhr,rk->dhk", p["A1"], p["B1"])
    h = np.einsum("btd,dhk->bthk", x, k1) + p["b1"]
    h = h.reshape(x.shape[0], x.shape[1], -1)
    k2 = p["W2"] + s2 * p["A2"] @ p["B2"]
    return h, k2, h @ k2 + p["b2"]


def loss(p, x, y, s1=S1, s2=S2):
    return np.mean((forward(p, x, s1, s2)[2] - y) ** 2)


def grads(p, x, y, s1=S1, s2=S2):
    """d loss / d every parameter, the frozen kernels' included."""
    h, k2, out = forward(p, x, s1, s2)
    d2 = 2.0 * (out - y) / out.size  # MSE, "sum_over_batch_size"
    g_k2 = np.einsum("bti,bto->io", h, d2)
    d1 = (d2 @ k2.T).reshape(x.shape[0], x.shape[1], H, K)
    g_k1 = np.einsum("btd,bthk->dhk", x, d1)
    return {
        "W1": g_k1,
        "b1": d1.sum(axis=(0, 1)),
        "A1": s1 * np.einsum("dhk,rk->dhr", g_k1, p["B1"]),
        "B1": s1 * np.einsum("dhr,dhk->rk", p["A1"], g_k1),
        "W2": g_k2,
        "b2": d2.sum(axis=(0, 1)),
        "A2": s2 * g_k2 @ p["B2"].T,
        "B2": s2 * p["A2"].T @ g_k2,
    }


def norm(g, names):
    return np.sqrt(sum(np.sum(g[n] ** 2) for n in names))


def reference_steps(p0, x, y, variant, steps, *, perturbed=TRAINABLE, e_norm=None,
                    gamma_norm=TRAINABLE, s1=S1, s2=S2):
    """`steps` SAM / SSAM steps with SGD(LR) in float64.

    perturbed: the parameters `e` is added to; e_norm: those whose gradient
    forms `||g||` in SAM's `e = rho g / ||g||` (default: `perturbed`);
    gamma_norm: those whose gradients form SSAM's gamma and the logged
    `grad_norm` / `perturbed_grad_norm`. Only the trainable parameters are
    updated. Returns (parameters after each step, per-step logs).
    """
    e_norm = perturbed if e_norm is None else e_norm
    p = {k: np.asarray(v, np.float64) for k, v in p0.items()}
    history, logs = [p], []
    for _ in range(steps):
        g = grads(p, x, y, s1, s2)
        if variant == "sam":
            e = {n: RHO * g[n] / (norm(g, e_norm) + EPS) for n in perturbed}
        elif variant == "ssam":
            e = {n: RHO * g[n] for n in perturbed}
        else:
            raise AssertionError(variant)
        p_pert = {n: v + e[n] if n in e else v for n, v in p.items()}
        g_asc = grads(p_pert, x, y, s1, s2)
        g_norm, asc_norm = norm(g, gamma_norm), norm(g_asc, gamma_norm)
        gamma = g_norm / (asc_norm + EPS) if variant == "ssam" else 1.0
        p = {n: v - LR * gamma * g_asc[n] if n in TRAINABLE else v for n, v in p.items()}
        history.append(p)
        logs.append({
            "grad_norm": g_norm,
            "perturbed_grad_norm": asc_norm,
            "sharpness": loss(p_pert, x, y, s1, s2) - loss(history[-2], x, y, s1, s2),
        })
    return history, logs


def tolerances(ref):
    scale = max(np.max(np.abs(ref[n])) for n in TRAINABLE)
    return RTOL, ATOL_REL * scale


def assert_close(actual, ref, label=""):
    rtol, atol = tolerances(ref)
    for n in ref:
        np.testing.assert_allclose(actual[n], ref[n], rtol=rtol, atol=atol, err_msg=f"{label} {n}")


def assert_far_apart(ref, other, label):
    """`other` (a wrong reference) must be far outside the tolerance of `ref`."""
    rtol, atol = tolerances(ref)
    worst = max(float(np.max(np.abs(ref[n] - other[n]) / (atol + rtol * np.abs(ref[n])))) for n in TRAINABLE)
    assert worst > 100.0, (
        f"wrong reference ({label}) is within {worst:.1f}x the tolerance: the test could not tell it apart"
    )


# --------------------------------------------------------------------------
# The Keras model
# --------------------------------------------------------------------------


def make_data(seed=0):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(N, T, D)).astype("float32")
    y = rng.normal(size=(N, T, OUT)).astype("float32")
    return x, y


def initial_params(seed=0, random_b=True):
    rng = np.random.RandomState(seed + 10)
    p = {
        "W1": rng.normal(scale=0.25, size=(D, H, K)),
        "b1": rng.normal(scale=0.3, size=(H, K)),
        "A1": rng.normal(scale=0.2, size=(D, H, RANK1)),
        "B1": rng.normal(scale=0.2, size=(RANK1, K)),
        "W2": rng.normal(scale=0.25, size=(H * K, OUT)),
        "b2": rng.normal(scale=0.3, size=(OUT,)),
        "A2": rng.normal(scale=0.2, size=(H * K, RANK2)),
        "B2": rng.normal(scale=0.2, size=(RANK2, OUT)),
    }
    if not random_b:  # Keras's LoRA init: B = 0
        p["B1"], p["B2"] = np.zeros_like(p["B1"]), np.zeros_like(p["B2"])
    return {n: v.astype("float32") for n, v in p.items()}


def variable(inner, name):
    layer_name, var_name = VARIABLES[name]
    (v,) = [v for v in inner.get_layer(layer_name).weights if v.name == var_name]
    return v


def lora_model(params=None):
    """The model with LoRA enabled on both layers; `params` assigned."""
    inp = keras.Input((T, D))
    proj = keras.layers.EinsumDense("btd,dhk->bthk", output_shape=(T, H, K), bias_axes="hk", name="proj")
    head = keras.layers.Dense(OUT, name="head")
    out = head(keras.layers.Reshape((T, H * K))(proj(inp)))
    inner = keras.Model(inp, out, name="lora_inner")
    proj.enable_lora(RANK1, lora_alpha=ALPHA1)
    head.enable_lora(RANK2, lora_alpha=ALPHA2)
    if params is not None:
        for n, value in params.items():
            variable(inner, n).assign(value)
    return inner


def current(inner):
    return {n: np.asarray(ops.convert_to_numpy(variable(inner, n)), np.float64) for n in VARIABLES}


def make_sam(variant, **kwargs):
    base = keras.optimizers.SGD(learning_rate=LR)
    if variant == "sam":
        return keras_ssam.SAM(base, rho=RHO, **kwargs)
    return keras_ssam.SSAM(base, rho=RHO, **kwargs)


def train(inner, x, y, variant, steps, **kwargs):
    """`steps` one-batch steps; the parameters after each and the logs."""
    model = keras_ssam.SAMModel(inner, diagnostics=True)
    model.compile(optimizer=make_sam(variant, **kwargs), loss="mse")
    history, logs = [current(inner)], []
    for _ in range(steps):
        out = model.fit(x, y, batch_size=N, epochs=1, shuffle=False, verbose=0).history
        history.append(current(inner))
        logs.append({k: float(v[0]) for k, v in out.items()})
    return model, history, logs


# --------------------------------------------------------------------------
# 1. What is trainable
# --------------------------------------------------------------------------


def test_lora_leaves_the_factors_and_biases_trainable():
    inner = lora_model()
    assert {v.path for v in inner.trainable_variables} == TRAINABLE_PATHS
    assert {"proj/kernel", "head/kernel"} <= {v.path for v in inner.non_trainable_variables}
    model = keras_ssam.SAMModel(inner)
    model.compile(optimizer=make_sam("sam"), loss="mse")
    # perturb="all" perturbs every trainable weight: the mask is "all".
    assert model._perturbed_mask() is None
    assert {v.path for v in model.trainable_variables} == TRAINABLE_PATHS


# --------------------------------------------------------------------------
# 2. SAM / SSAM steps against the reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("random_b", [True, False], ids=["random_B", "keras_init_B0"])
def test_steps_match_reference_and_frozen_kernels_stay(variant, random_b):
    steps = 3
    x, y = make_data()
    p0 = initial_params(random_b=random_b)
    inner = lora_model(p0)
    _, history, logs = train(inner, x, y, variant, steps)

    x64, y64 = np.float64(x), np.float64(y)
    ref, ref_logs = reference_steps(p0, x64, y64, variant, steps)
    for step in range(1, steps + 1):
        assert_close(history[step], ref[step], f"step {step}")
        for n in FROZEN:  # never changed, not even by rounding
            np.testing.assert_array_equal(history[step][n], np.float64(p0[n]), err_msg=n)
    for step, (log, want) in enumerate(zip(logs, ref_logs)):
        for key in ("grad_norm", "perturbed_grad_norm"):
            np.testing.assert_allclose(log[key], want[key], rtol=RTOL, err_msg=f"step {step} {key}")
        # sharpness: a difference of two losses, each rounded at ~1e-7 relative.
        np.testing.assert_allclose(log["sharpness"], want["sharpness"], rtol=1e-3,
                                   atol=1e-6 * loss(ref[step], x64, y64), err_msg=f"step {step}")
        assert log["clean_fallback"] == 0.0

    # The logged grad_norm covers the trainable weights only: with the
    # kernels' gradients it would be far larger.
    g0 = grads(ref[0], x64, y64)
    with_kernels = norm(g0, TRAINABLE + FROZEN)
    assert with_kernels > (1 + 1e3 * RTOL) * ref_logs[0]["grad_norm"]
    if not random_b:
        # Keras's init B = 0 makes A's clean gradient zero; SGD would leave A
        # alone on the first step, SAM moves it (the gradient at w + e, where
        # B + e_B != 0).
        assert not np.any(g0["A1"]) and not np.any(g0["A2"])
        for n in ("A1", "A2"):
            assert np.max(np.abs(history[1][n] - np.float64(p0[n]))) > 1e-4, n

    # Wrong references the test must be able to tell apart.
    final = ref[steps]
    kernels_perturbed, _ = reference_steps(p0, x64, y64, variant, steps, perturbed=TRAINABLE + FROZEN)
    assert_far_apart(final, kernels_perturbed[steps], "frozen kernels perturbed too")
    kernel_norm, _ = reference_steps(p0, x64, y64, variant, steps, e_norm=TRAINABLE + FROZEN,
                                     gamma_norm=TRAINABLE + FROZEN)
    assert_far_apart(final, kernel_norm[steps], "norms over the frozen kernels' gradients too")
    unscaled, _ = reference_steps(p0, x64, y64, variant, steps, s1=1.0, s2=1.0)
    assert_far_apart(final, unscaled[steps], "LoRA scale alpha / rank dropped")


# --------------------------------------------------------------------------
# 3. perturb="no_norm"
# --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_norm_perturbs_the_factors_not_the_biases(variant):
    steps = 2
    x, y = make_data(1)
    p0 = initial_params(1)
    inner = lora_model(p0)
    model, history, logs = train(inner, x, y, variant, steps, perturb="no_norm")
    mask = model._perturbed_mask()
    assert {v.path for v, keep in zip(model.trainable_variables, mask) if keep} == {
        "proj/lora_kernel_a", "proj/lora_kernel_b", "head/lora_kernel_a", "head/lora_kernel_b"
    }

    x64, y64 = np.float64(x), np.float64(y)
    factors = ("A1", "B1", "A2", "B2")
    ref, ref_logs = reference_steps(p0, x64, y64, variant, steps, perturbed=factors)
    for step in range(1, steps + 1):
        assert_close(history[step], ref[step], f"step {step}")
    for n in FROZEN:
        np.testing.assert_array_equal(history[steps][n], np.float64(p0[n]), err_msg=n)
    for log, want in zip(logs, ref_logs):
        np.testing.assert_allclose(log["grad_norm"], want["grad_norm"], rtol=RTOL)

    all_trainable, _ = reference_steps(p0, x64, y64, variant, steps)
    assert_far_apart(ref[steps], all_trainable[steps], "biases perturbed too")
    with_kernels, _ = reference_steps(p0, x64, y64, variant, steps, perturbed=factors + FROZEN)
    assert_far_apart(ref[steps], with_kernels[steps], "frozen kernels perturbed too")


# --------------------------------------------------------------------------
# 4. norm_only when LoRA froze the normalization layers
# --------------------------------------------------------------------------


def test_norm_only_with_frozen_norms_selects_nothing():
    """KerasHub's `backbone.enable_lora` freezes every layer but the LoRA
    targets, LayerNorms included: "norm_only" then has nothing to perturb."""
    inp = keras.Input((D,))
    norm_layer = keras.layers.LayerNormalization(name="ln")
    dense = keras.layers.Dense(OUT, name="dense")
    inner = keras.Model(inp, dense(norm_layer(inp)))
    norm_layer.trainable = False
    dense.enable_lora(2)
    model = keras_ssam.SAMModel(inner)
    model.compile(optimizer=make_sam("sam", perturb="norm_only"), loss="mse")
    x = np.ones((4, D), "float32")
    with pytest.raises(ValueError, match="perturb='norm_only'.*selects none"):
        model.fit(x, np.ones((4, OUT), "float32"), verbose=0)


# --------------------------------------------------------------------------
# 5. Save / load
# --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_merges_the_factors(variant, tmp_path):
    x, y = make_data(2)
    p0 = initial_params(2)
    inner = lora_model(p0)
    model, history, _ = train(inner, x, y, variant, 1)
    trained = history[1]
    before = ops.convert_to_numpy(model.predict(x, verbose=0))

    path = os.path.join(tmp_path, "lora.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, keras_ssam.SAMModel)
    sam = loaded.sam_optimizer()
    assert type(sam) is type(model.sam_optimizer()) and sam.rho == RHO
    np.testing.assert_allclose(ops.convert_to_numpy(loaded.predict(x, verbose=0)), before,
                               rtol=1e-5, atol=1e-6)

    # The loaded layers have LoRA enabled with the same rank, the same
    # trainable weights, the factors at zero and the kernels merged:
    # W + (alpha / rank) A B of the trained factors.
    for name, rank in (("proj", RANK1), ("head", RANK2)):
        layer = loaded.model.get_layer(name)
        assert layer.lora_enabled and layer.lora_rank == rank, name
    # EinsumDense keeps its lora_alpha. (Keras 3.12 to 3.15's Dense.build
    # calls `enable_lora(lora_rank)` without it, so a loaded Dense has
    # alpha = rank; see docs/guides/lora.md. Not asserted either way.)
    assert loaded.model.get_layer("proj").lora_alpha == ALPHA1
    assert {v.path for v in loaded.trainable_variables} == TRAINABLE_PATHS
    got = current(loaded.model)
    for n in ("A1", "B1", "A2", "B2"):
        assert not np.any(got[n]), n
    merged_w1 = trained["W1"] + S1 * np.einsum("dhr,rk->dhk", trained["A1"], trained["B1"])
    merged_w2 = trained["W2"] + S2 * trained["A2"] @ trained["B2"]
    np.testing.assert_allclose(got["W1"], merged_w1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["W2"], merged_w2, rtol=1e-5, atol=1e-6)
    # Merged, not the frozen kernel saved as it was.
    assert np.max(np.abs(merged_w2 - trained["W2"])) > 1e-2

    # Training the loaded model does not resume LoRA training: with A = B = 0
    # the gradients of both factors are exactly zero (dA = s dW B^T,
    # dB = s A^T dW), at w and at w + e alike, so with plain SGD the factors
    # stay at 0 and only the biases train; the frozen kernels stay.
    loaded.fit(x, y, batch_size=N, epochs=2, verbose=0)
    after = current(loaded.model)
    for n in ("A1", "B1", "A2", "B2"):
        assert not np.any(after[n]), n
    np.testing.assert_array_equal(after["W1"], got["W1"])
    np.testing.assert_array_equal(after["W2"], got["W2"])
    assert np.max(np.abs(after["b2"] - got["b2"])) > 1e-4

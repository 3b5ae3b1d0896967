"""Flat-LoRA (`RandomSAM(..., perturb="merged_lora")`) against float64 NumPy, on every backend.

A LoRA `Dense` layer computes `x (W + s A B) + b` with `W` frozen and
`s = lora_alpha / rank`. Flat-LoRA (Li et al., ICML 2025) takes each step's
gradient of the factors at the merged weight plus filter-wise noise,
`M + eps`, `M = W + s A B`, `eps[:, j] = sigma ||M[:, j]|| z[:, j]`: one pass,
nothing stored, `W` never changes. The noise is fed in (a table of normals
indexed by the iteration), so the reference can reproduce it.
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_ssam

D_IN, D_OUT, RANK, ALPHA, N, BATCH, STEPS, LR, SIGMA = 4, 3, 2, 3.0, 16, 4, 8, 0.1, 0.3
RNG = np.random.default_rng(5)
TABLE = RNG.normal(size=(STEPS, D_IN, D_OUT))  # the normals z of each step


class FedNoise(keras_ssam.RandomSAM):
    """RandomSAM whose standard normals come from TABLE[iteration]."""

    def draw_noise(self, weights):
        (merged,) = weights
        table = ops.convert_to_tensor(TABLE.astype("float32"))
        return [ops.take(table, ops.cast(self.iterations, "int32") % STEPS, axis=0)]


def _problem():
    x = RNG.normal(size=(N, D_IN))
    y = RNG.normal(size=(N, D_OUT))
    w = RNG.normal(size=(D_IN, D_OUT)) * 0.5
    a = RNG.normal(size=(D_IN, RANK)) * 0.5
    b = RNG.normal(size=(RANK, D_OUT)) * 0.5
    bias = RNG.normal(size=(D_OUT,)) * 0.1
    return x, y, w, a, b, bias


X, Y, W, A, B, BIAS = _problem()


def reference(perturb_factors=False, scale_noise=True):
    """Flat-LoRA with SGD, float64. `perturb_factors`/`scale_noise=False`
    are wrong variants (noise on the factors too; unscaled noise) that must
    fall outside the tolerance."""
    s = ALPHA / RANK
    a, b, bias = A.copy(), B.copy(), BIAS.copy()
    for t in range(STEPS):
        xb, yb = X[(t * BATCH) % N:(t * BATCH) % N + BATCH], Y[(t * BATCH) % N:(t * BATCH) % N + BATCH]
        merged = W + s * a @ b
        std = SIGMA * np.sqrt((merged ** 2).sum(axis=0, keepdims=True)) if scale_noise else SIGMA
        eps = std * TABLE[t]
        a_pass, b_pass = (a + 0.1 * eps[:, :RANK], b + 0.1 * eps[:RANK, :]) if perturb_factors else (a, b)
        kernel = W + eps + s * a_pass @ b_pass
        r = xb @ kernel + bias - yb
        d_out = 2.0 * r / r.size                      # d mse / d y_hat
        d_kernel = xb.T @ d_out
        grad_a, grad_b, grad_bias = s * d_kernel @ b_pass.T, s * a_pass.T @ d_kernel, d_out.sum(0)
        a, b, bias = a - LR * grad_a, b - LR * grad_b, bias - LR * grad_bias
    return a, b, bias


def _train(optimizer):
    layer = keras.layers.Dense(D_OUT)
    inner = keras.Sequential([keras.Input((D_IN,)), layer])
    layer.set_weights([W.astype("float32"), BIAS.astype("float32")])
    layer.enable_lora(RANK, lora_alpha=ALPHA)
    layer.lora_kernel_a.assign(A.astype("float32"))
    layer.lora_kernel_b.assign(B.astype("float32"))
    model = keras_ssam.SAMModel(inner)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(X.astype("float32"), Y.astype("float32"), batch_size=BATCH, epochs=STEPS * BATCH // N,
              shuffle=False, verbose=0)
    frozen = [v for v in layer.non_trainable_weights if v.name == "kernel"][0]
    return (np.asarray(layer.lora_kernel_a, np.float64), np.asarray(layer.lora_kernel_b, np.float64),
            np.asarray(layer.bias, np.float64), np.asarray(frozen))


def test_flat_lora_matches_the_reference_and_never_moves_the_frozen_kernel():
    got_a, got_b, got_bias, frozen = _train(FedNoise(keras.optimizers.SGD(LR), sigma=SIGMA, perturb="merged_lora",
                                                     seed=1))
    want = reference()
    for got, ref, name in zip((got_a, got_b, got_bias), want, ("A", "B", "bias")):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(frozen, W.astype("float32"))
    # The reference can fail: the wrong variants land far outside the tolerance.
    for wrong in (reference(perturb_factors=True), reference(scale_noise=False)):
        assert max(np.max(np.abs(g - w)) for g, w in zip((got_a, got_b, got_bias), wrong)) > 1e-3


def test_flat_lora_sigma_zero_is_plain_lora_training():
    plain = keras.optimizers.SGD(LR)
    layer = keras.layers.Dense(D_OUT)
    inner = keras.Sequential([keras.Input((D_IN,)), layer])
    layer.set_weights([W.astype("float32"), BIAS.astype("float32")])
    layer.enable_lora(RANK, lora_alpha=ALPHA)
    layer.lora_kernel_a.assign(A.astype("float32"))
    layer.lora_kernel_b.assign(B.astype("float32"))
    inner.compile(optimizer=plain, loss="mse")
    inner.fit(X.astype("float32"), Y.astype("float32"), batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    got_a, got_b, got_bias, _ = _train(keras_ssam.RandomSAM(keras.optimizers.SGD(LR), sigma=0.0,
                                                            perturb="merged_lora", seed=1))
    np.testing.assert_allclose(got_a, np.asarray(layer.lora_kernel_a), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got_b, np.asarray(layer.lora_kernel_b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: keras_ssam.SAM(keras.optimizers.SGD(0.1), perturb="merged_lora"), ("perturb", "RandomSAM")),
        (lambda: keras_ssam.RandomSAM(keras.optimizers.SGD(0.1), mix=0.5, perturb="merged_lora"), ("mix=0.5",)),
        (lambda: keras_ssam.RandomSAM(keras.optimizers.SGD(0.1), adaptive=True, perturb="merged_lora"),
         ("adaptive=True",)),
    ],
)
def test_merged_lora_refusals_name_the_argument(make, words):
    with pytest.raises(ValueError) as info:
        make()
    assert "merged_lora" in str(info.value) and all(w in str(info.value) for w in words), str(info.value)


def test_merged_lora_without_lora_layers_raises_and_leaves_the_model_intact():
    inner = keras.Sequential([keras.Input((D_IN,)), keras.layers.Dense(D_OUT)])
    before = [np.array(w) for w in inner.get_weights()]
    model = keras_ssam.SAMModel(inner)
    model.compile(optimizer=keras_ssam.RandomSAM(keras.optimizers.SGD(0.1), perturb="merged_lora"), loss="mse")
    with pytest.raises(ValueError, match="needs LoRA layers"):
        model.fit(X.astype("float32"), Y.astype("float32"), batch_size=BATCH, epochs=1, verbose=0)
    for b, a in zip(before, inner.get_weights()):
        np.testing.assert_array_equal(a, b)

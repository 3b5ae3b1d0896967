"""`perturb=`: which trainable weights a SAM step perturbs, on every backend.

1. The presets "all", "no_norm", "norm_only" select exactly the weights
   written out by hand on a model with BatchNormalization,
   LayerNormalization, an Embedding, Conv/Dense biases, a custom layer with
   a `*_bias` weight, a nested Sequential holding a custom `TinyRMSNorm`
   (class name ending in "Norm") and a SpectralNormalization wrapper (a
   `keras.layers.Wrapper`: its wrapped Dense is not a normalization layer).
   Behaviour: training with a preset equals training with a callable that
   selects exactly the hand-written set (and the callable path is checked
   against NumPy in 2).
2. Numerics against a float64 NumPy reference written here (no keras_ssam
   code; the MLP and SGD-with-momentum of tests/reference.py): SAM with
   "no_norm" (the MLP's biases left out), a callable leaving out W1, SSAM
   (stable, unnormalized) with a mask whose gamma takes norms over all
   weights, ASAM (and ASAM+SSAM) with a mask; weights after every step.
3. Errors name the argument.
4. get_config / from_config round trips (presets, a registered function);
   a lambda needs safe_mode=False to load, as elsewhere in Keras.
5. A keras.applications model (random weights, no download) trained one
   step with "no_norm" and "norm_only".
"""

import os
import warnings

import keras
import numpy as np
import pytest
import reference as ref
from keras import ops

import keras_ssam

BACKEND = keras.backend.backend()

ALL_CLASSES = {
    "SAM": lambda base, **kw: keras_ssam.SAM(base, rho=0.2, **kw),
    "USAM": lambda base, **kw: keras_ssam.USAM(base, rho=0.2, **kw),
    "SSAM": lambda base, **kw: keras_ssam.SSAM(base, rho=0.2, **kw),
    "LookSAM": lambda base, **kw: keras_ssam.LookSAM(base, rho=0.2, k=2, **kw),
    "GSAM": lambda base, **kw: keras_ssam.GSAM(base, rho=0.2, alpha=0.3, **kw),
    "FriendlySAM": lambda base, **kw: keras_ssam.FriendlySAM(base, rho=0.2, sigma=1.0, lmbda=0.8, **kw),
    "WSAM": lambda base, **kw: keras_ssam.WSAM(base, rho=0.2, gamma=0.8, **kw),
}


def _np(v):
    return np.asarray(ops.convert_to_numpy(v), dtype=np.float64)


# ---------------------------------------------------------------------------
# 1. The presets select exactly the expected weights.
# ---------------------------------------------------------------------------


class TinyRMSNorm(keras.layers.Layer):
    """A user's RMS norm: not a Keras normalization class, but its class name
    ends in "Norm", so the presets treat it as a normalization layer."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="scale")

    def call(self, x):
        return x * ops.rsqrt(ops.mean(x * x, axis=-1, keepdims=True) + 1e-6) * self.scale


class Gate(keras.layers.Layer):
    """A weight named `gate` (perturbed by "no_norm") and one named
    `gate_bias` (a bias by its `_bias` suffix)."""

    def build(self, input_shape):
        self.gate = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="gate")
        self.gate_bias = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="gate_bias")

    def call(self, x):
        return x * self.gate + self.gate_bias


def zoo_model(spectral=True):
    """Tokens -> Embedding -> Conv1D -> BatchNorm -> LayerNorm -> pool ->
    nested Sequential(Dense, TinyRMSNorm) -> Gate -> [SpectralNormalization(
    Dense)] -> Dense head."""
    sub = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(8, name="sub_dense"), TinyRMSNorm(name="sub_rms")],
        name="sub",
    )
    inp = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(20, 8, name="emb")(inp)
    h = keras.layers.Conv1D(8, 3, padding="same", name="conv")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.LayerNormalization(name="ln")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    h = sub(h)
    h = Gate(name="gate")(h)
    if spectral:
        # SpectralNormalization assigns its kernel in training: only in the
        # selection test, which does not train.
        h = keras.layers.SpectralNormalization(keras.layers.Dense(4, name="sn_dense"), name="sn")(h)
    out = keras.layers.Dense(3, name="head")(h)
    return keras.Model(inp, out, name="zoo")


ALL_PATHS = {
    "emb/embeddings",
    "conv/kernel", "conv/bias",
    "bn/gamma", "bn/beta",
    "ln/gamma", "ln/beta",
    "sub/sub_dense/kernel", "sub/sub_dense/bias",
    "sub/sub_rms/scale",
    "gate/gate", "gate/gate_bias",
    "sn/sn_dense/kernel", "sn/sn_dense/bias",
    "head/kernel", "head/bias",
}
NO_NORM_PATHS = {
    "emb/embeddings", "conv/kernel", "sub/sub_dense/kernel", "gate/gate",
    "sn/sn_dense/kernel", "head/kernel",
}
NORM_ONLY_PATHS = {"bn/gamma", "bn/beta", "ln/gamma", "ln/beta", "sub/sub_rms/scale"}
EXPECTED = {"all": ALL_PATHS, "no_norm": NO_NORM_PATHS, "norm_only": NORM_ONLY_PATHS}


def _perturbed_paths(model):
    """The paths of the weights `fit` perturbs (SAMModel resolves the mask)."""
    mask = model._perturbed_mask()
    variables = model.trainable_variables
    if mask is None:
        return {v.path for v in variables}
    assert len(mask) == len(variables)
    return {v.path for v, keep in zip(variables, mask) if keep}


@pytest.mark.parametrize("preset", ["all", "no_norm", "norm_only"])
def test_preset_selects_exactly_the_expected_weights(preset):
    inner = zoo_model()
    assert {v.path for v in inner.trainable_variables} == ALL_PATHS
    model = keras_ssam.SAMModel(inner)
    model.compile(optimizer=keras_ssam.SAM(keras.optimizers.SGD(0.1), perturb=preset), loss="mse")
    assert _perturbed_paths(model) == EXPECTED[preset]


def test_sibling_classes_resolve_the_same_mask():
    """Every SAM optimizer carries `perturb` to the same selection."""
    for name, make in ALL_CLASSES.items():
        keras.backend.clear_session(free_memory=False)
        model = keras_ssam.SAMModel(zoo_model())
        model.compile(optimizer=make(keras.optimizers.SGD(0.1), perturb="no_norm"), loss="mse")
        assert _perturbed_paths(model) == NO_NORM_PATHS, name


def _zoo_data(n=8, seed=0):
    rs = np.random.RandomState(seed)
    return rs.randint(0, 20, size=(n, 5)).astype("int32"), rs.normal(size=(n, 3)).astype("float32")


def _train_zoo(perturb, steps=2, make=ALL_CLASSES["SAM"]):
    keras.utils.set_random_seed(7)
    inner = zoo_model(spectral=False)
    model = keras_ssam.SAMModel(inner)
    model.compile(optimizer=make(keras.optimizers.SGD(0.1), perturb=perturb), loss="mse", run_eagerly=True)
    initial = {v.path: _np(v) for v in inner.trainable_variables}
    for step in range(steps):
        x, y = _zoo_data(seed=step)
        model.train_on_batch(x, y)
    return initial, {v.path: _np(v) for v in inner.trainable_variables}


@pytest.mark.parametrize("preset", ["no_norm", "norm_only"])
def test_preset_trains_as_the_callable_of_its_expected_set(preset):
    """Behaviour: the preset and `lambda v: v.path in <hand-written set>`
    give the same weights (the callable's numerics are checked against
    NumPy below); every weight, excluded or not, is updated; and the
    selection matters (it differs from "all")."""
    expected = EXPECTED[preset] - {"sn/sn_dense/kernel", "sn/sn_dense/bias"}
    initial, got = _train_zoo(preset)
    _, want = _train_zoo(lambda v: v.path in expected)
    _, everything = _train_zoo("all")
    assert set(got) == set(want)
    for path in got:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-6, atol=1e-7, err_msg=path)
        assert not np.array_equal(got[path], initial[path]), f"{path} was not updated"
    diff = max(float(np.max(np.abs(got[p] - everything[p]))) for p in got)
    assert diff > 1e-4, f"{preset} trains like 'all' (max difference {diff})"


# ---------------------------------------------------------------------------
# 2. Numerics against a hand-written float64 NumPy reference.
# ---------------------------------------------------------------------------

N_IN, N_HIDDEN, N_OUT, BATCH, STEPS = 4, 5, 2, 8, 6
LR, MOMENTUM = 0.1, 0.9


def masked_sam_gradient(params, x, t, mask, *, rho, normalize=True, stable=False,
                        adaptive=False, eta=0.0, epsilon=1e-12, sabotage=None):
    """The gradient SAM hands to the base optimizer with weights `i` where
    `mask[i]` is False left unperturbed, spelled out:

        T     = |w| + eta (adaptive) or 1
        e_i   = rho T_i^2 g_i / (||T g||_mask + epsilon)   (normalize)
        e_i   = rho T_i^2 g_i                               (otherwise)
        e_i   = 0                                           where not mask[i]
        g_asc = gradient at w + e
        gamma = ||T(w) g||_all / (||T(w + e) g_asc||_all + epsilon)  (stable)

    with ||.||_mask over the selected weights and ||.||_all over every
    weight. `sabotage` models wrong implementations: "norm_over_all" takes
    the ascent norm over every weight; "gamma_over_mask" takes gamma's two
    norms over the selected weights only.
    """
    _, g = ref.TanhMLP.loss_and_grads(params, x, t)
    scale = [np.abs(p) + eta if adaptive else np.ones_like(p) for p in params]
    t_g = [s * gi for s, gi in zip(scale, g)]
    selected = [i for i, keep in enumerate(mask) if keep]
    over = range(len(g)) if sabotage == "norm_over_all" else selected
    ascent_norm = np.sqrt(sum(np.sum(t_g[i] ** 2) for i in over))
    factor = rho / (ascent_norm + epsilon) if normalize else rho
    e = [factor * s * tg if keep else np.zeros_like(tg) for s, tg, keep in zip(scale, t_g, mask)]
    perturbed = [p + ei for p, ei in zip(params, e)]
    _, g_asc = ref.TanhMLP.loss_and_grads(perturbed, x, t)
    if not stable:
        return g_asc
    scale_asc = [np.abs(p) + eta if adaptive else np.ones_like(p) for p in perturbed]
    t_g_asc = [s * gi for s, gi in zip(scale_asc, g_asc)]
    over = selected if sabotage == "gamma_over_mask" else range(len(g))
    clean_norm = np.sqrt(sum(np.sum(t_g[i] ** 2) for i in over))
    asc_norm = np.sqrt(sum(np.sum(t_g_asc[i] ** 2) for i in over))
    gamma = clean_norm / (asc_norm + epsilon)
    return [gamma * gi for gi in g_asc]


def masked_reference_run(params, batches, mask, **kwargs):
    """Weights after each step of masked SAM with Keras SGD(LR, MOMENTUM)."""
    sgd = ref.SGD(LR, MOMENTUM)
    params = [np.array(p, np.float64) for p in params]
    trajectory = []
    for x, t in batches:
        params = sgd.step(params, masked_sam_gradient(params, x, t, mask, **kwargs))
        trajectory.append(params)
    return trajectory


def mlp_problem(seed=3):
    rng = np.random.default_rng(seed)
    params = ref.TanhMLP.init_params(rng, N_IN, N_HIDDEN, N_OUT)
    x = rng.standard_normal((STEPS * BATCH, N_IN)).astype(np.float32).astype(np.float64)
    w = rng.standard_normal((N_IN, N_OUT))
    t = (np.sin(x @ w) + 0.1 * rng.standard_normal((STEPS * BATCH, N_OUT))).astype(np.float32).astype(np.float64)
    return params, [(x[i * BATCH:(i + 1) * BATCH], t[i * BATCH:(i + 1) * BATCH]) for i in range(STEPS)]


def keras_trajectory(params, batches, optimizer, run_eagerly=False):
    inner = keras.Sequential(
        [keras.Input((N_IN,)), keras.layers.Dense(N_HIDDEN, activation="tanh", name="hidden"),
         keras.layers.Dense(N_OUT, name="out")]
    )
    inner.set_weights([p.astype(np.float32) for p in params])
    model = keras_ssam.SAMModel(inner)
    model.compile(optimizer=optimizer, loss="mse", run_eagerly=run_eagerly)
    trajectory = []
    for x, t in batches:
        model.train_on_batch(x.astype(np.float32), t.astype(np.float32))
        trajectory.append([np.asarray(w, np.float64) for w in inner.get_weights()])
    return trajectory


def _skip_w1(variable):
    # The Sequential's name prefixes the path: "sequential/hidden/kernel".
    return not variable.path.endswith("hidden/kernel")


# name: (Keras optimizer from SGD, reference mask, reference kwargs,
#        sabotage that the test must catch)
NUMERIC_CASES = {
    "SAM-no_norm": (
        lambda base: keras_ssam.SAM(base, rho=0.3, perturb="no_norm"),
        [True, False, True, False], dict(rho=0.3), "norm_over_all",
    ),
    "SAM-callable-skip-W1": (
        lambda base: keras_ssam.SAM(base, rho=0.3, perturb=_skip_w1),
        [False, True, True, True], dict(rho=0.3), "norm_over_all",
    ),
    "SSAM-no_norm": (
        lambda base: keras_ssam.SAM(base, rho=0.5, normalize=False, stable=True, perturb="no_norm"),
        [True, False, True, False], dict(rho=0.5, normalize=False, stable=True), "gamma_over_mask",
    ),
    "ASAM-callable-skip-W1": (
        lambda base: keras_ssam.SAM(base, rho=0.3, adaptive=True, eta=0.01, perturb=_skip_w1),
        [False, True, True, True], dict(rho=0.3, adaptive=True, eta=0.01), "norm_over_all",
    ),
    "ASAM-SSAM-no_norm": (
        lambda base: keras_ssam.SAM(base, rho=0.3, adaptive=True, eta=0.01, stable=True, perturb="no_norm"),
        [True, False, True, False], dict(rho=0.3, adaptive=True, eta=0.01, stable=True), "gamma_over_mask",
    ),
}


def _max_diff(a, b):
    return max(float(np.max(np.abs(p - q))) for sa, sb in zip(a, b) for p, q in zip(sa, sb))


@pytest.mark.parametrize("case", list(NUMERIC_CASES))
def test_masked_step_matches_numpy_reference(case):
    make, mask, kwargs, sabotage = NUMERIC_CASES[case]
    params, batches = mlp_problem()
    want = masked_reference_run(params, batches, mask, **kwargs)
    got = keras_trajectory(params, batches, make(keras.optimizers.SGD(LR, momentum=MOMENTUM)))
    for step, (g, w) in enumerate(zip(got, want)):
        for i, (a, b) in enumerate(zip(g, w)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{case}: param {i} after step {step}")
    # The test discriminates: leaving no weight out, and the wrong norm,
    # both move the weights by far more than the tolerance.
    unmasked = masked_reference_run(params, batches, [True] * 4, **kwargs)
    wrong = masked_reference_run(params, batches, mask, sabotage=sabotage, **kwargs)
    assert _max_diff(unmasked, want) > 1e-3, f"{case}: the mask changes nothing"
    assert _max_diff(wrong, want) > 1e-4, f"{case}: {sabotage} is not detected"


# ---------------------------------------------------------------------------
# 3. Errors name the argument.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["nope", 3, None, ["no_norm"], "NO_NORM"])
def test_bad_perturb_raises_at_construction(bad):
    for name, make in ALL_CLASSES.items():
        with pytest.raises(ValueError, match=r"Argument `perturb`.*Received: perturb="):
            make(keras.optimizers.SGD(0.1), perturb=bad)


def _linear_sam_model(perturb):
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="lin")])
    model = keras_ssam.SAMModel(inner)
    model.compile(optimizer=keras_ssam.SAM(keras.optimizers.SGD(0.1), perturb=perturb), loss="mse")
    return model, inner


@pytest.mark.parametrize(
    "perturb, pattern",
    [
        (lambda v: 1, r"`perturb` must return a bool.*lin/kernel.*= 1"),
        (lambda v: False, r"`perturb=.*selects none of the model's 2 trainable weights"),
        ("norm_only", r"`perturb='norm_only'` selects none of the model's 2 trainable weights"),
    ],
    ids=["returns-int", "selects-nothing", "norm_only-without-norm-layers"],
)
def test_bad_selection_raises_at_fit_and_changes_nothing(perturb, pattern):
    x, y = np.ones((4, 3), "float32"), np.ones((4, 2), "float32")
    model, inner = _linear_sam_model(perturb)
    before = [w.copy() for w in inner.get_weights()]
    with pytest.raises(ValueError, match=pattern):
        model.fit(x, y, verbose=0)
    # The selection is resolved before the first step (make_train_function),
    # while the variables are intact: on JAX too, the model stays usable.
    for a, b in zip(before, inner.get_weights()):
        np.testing.assert_array_equal(a, b)
    model.predict(x, verbose=0)
    model, inner = _linear_sam_model(perturb)
    before = [w.copy() for w in inner.get_weights()]
    with pytest.raises(ValueError, match=pattern):
        model.train_on_batch(x, y)
    for a, b in zip(before, inner.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_callable_may_return_a_numpy_bool():
    """`lambda v: np.prod(v.shape) > 2` returns `np.bool_`: accepted as a
    bool. On the linear model it keeps the (3, 2) kernel, not the bias."""
    x, y = np.ones((4, 3), "float32"), np.ones((4, 2), "float32")
    model, inner = _linear_sam_model(lambda v: np.prod(v.shape) > 2)
    model.train_on_batch(x, y)
    assert model._perturbed_mask() == [True, False]


# ---------------------------------------------------------------------------
# 4. Serialization.
# ---------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="test_perturb")
def kernels_only(variable):
    return variable.name == "kernel"


def _mlp_weights_after(optimizer, steps=2):
    # Eager: this compares two optimizers' configs, not execution modes
    # (the numerics above run compiled), and the tiny MLP traces slower
    # than it runs.
    params, batches = mlp_problem(seed=5)
    return keras_trajectory(params, batches[:steps], optimizer, run_eagerly=True)[-1]


@pytest.mark.parametrize("cls", list(ALL_CLASSES))
@pytest.mark.parametrize("perturb", ["all", "no_norm", "norm_only", kernels_only])
def test_get_config_round_trip(cls, perturb):
    optimizer = ALL_CLASSES[cls](keras.optimizers.SGD(LR, momentum=MOMENTUM), perturb=perturb)
    config = optimizer.get_config()
    if isinstance(perturb, str):
        assert config["perturb"] == perturb
    restored = type(optimizer).from_config(config)
    assert type(restored) is type(optimizer)
    assert restored.perturb is perturb if not isinstance(perturb, str) else restored.perturb == perturb
    # Also through Keras's serialization (as model.save writes it).
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(optimizer))
    assert again.perturb == perturb
    if perturb == "norm_only":
        return  # the MLP has no normalization layer (test_bad_selection_...)
    np.testing.assert_equal(
        _mlp_weights_after(restored),
        _mlp_weights_after(ALL_CLASSES[cls](keras.optimizers.SGD(LR, momentum=MOMENTUM), perturb=perturb)),
    )


def _save_and_load(model, tmp_path, **load_kwargs):
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    return keras.models.load_model(path, **load_kwargs)


def test_save_load_with_preset_and_registered_function(tmp_path):
    for perturb in ("no_norm", kernels_only):
        model, _ = _linear_sam_model(perturb)
        model.train_on_batch(np.ones((4, 3), "float32"), np.ones((4, 2), "float32"))
        loaded = _save_and_load(model, tmp_path)
        assert loaded.sam_optimizer().perturb == perturb
        assert loaded._perturbed_mask() == model._perturbed_mask() == [True, False]


def test_lambda_perturb_needs_safe_mode_false_to_load(tmp_path):
    """As for lambdas elsewhere in Keras (Lambda layers, lambda losses):
    saving works, loading needs `safe_mode=False`."""
    model, _ = _linear_sam_model(lambda v: v.name == "kernel")
    model.train_on_batch(np.ones((4, 3), "float32"), np.ones((4, 2), "float32"))
    path = os.path.join(tmp_path, "m.keras")
    # Keras warns when it saves a lambda: asserted here, so it does not leak into the test output.
    with pytest.warns(UserWarning, match="includes a `lambda`"), warnings.catch_warnings():
        # pytest.warns re-emits the warnings it did not match, past pyproject.toml's filter for Keras's
        # numpy-2 `__array__` DeprecationWarning: ignore that one here.
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        model.save(path)
    with pytest.raises(ValueError, match="safe_mode"):
        keras.models.load_model(path)
    loaded = keras.models.load_model(path, safe_mode=False)
    assert callable(loaded.sam_optimizer().perturb)
    assert loaded._perturbed_mask() == [True, False]


# ---------------------------------------------------------------------------
# 5. A keras.applications model.
# ---------------------------------------------------------------------------


def _count_by_layer(model):
    """(no_norm, norm_only) counts from the layer classes, by hand:
    BatchNormalization's trainable weights are the norm weights; of the
    others, those not named `bias`."""
    norm = other = 0
    for layer in model.layers:
        for v in layer.trainable_weights:
            if isinstance(layer, keras.layers.BatchNormalization):
                norm += 1
            elif v.name != "bias":
                other += 1
    return other, norm


def test_applications_model_one_step():
    """keras.applications.MobileNet (v1, alpha 0.25, 32x32, random weights),
    cut after its third depthwise-separable block (the whole network takes
    over a minute per backend to compile here), with a Dense head: the
    application's BatchNormalization after every convolution, its
    convolutions without biases, and the head's bias. One SAM step with
    each preset on the same model."""
    full = keras.applications.MobileNet(weights=None, input_shape=(32, 32, 3), classes=10, alpha=0.25)
    h = keras.layers.GlobalAveragePooling2D()(full.get_layer("conv_pw_3_relu").output)
    inner = keras.Model(full.input, keras.layers.Dense(10, activation="softmax", name="head")(h))
    no_norm, norm_only = _count_by_layer(inner)
    # Kernels: conv1, 3 depthwise + 3 pointwise, the head; a
    # BatchNormalization after each of the 7 convolutions, 2 weights each.
    assert (no_norm, norm_only) == (1 + 3 + 3 + 1, 2 * 7)
    assert len(inner.trainable_weights) == 8 + 14 + 1
    # Every weight belongs to a flat layer of the model.
    assert sum(len(layer.trainable_weights) for layer in inner.layers) == len(inner.trainable_weights)
    rs = np.random.RandomState(0)
    x, y = rs.normal(size=(2, 32, 32, 3)).astype("float32"), rs.randint(0, 10, size=(2,))
    for preset, count in (("no_norm", no_norm), ("norm_only", norm_only)):
        model = keras_ssam.SAMModel(inner)
        model.compile(
            optimizer=keras_ssam.SAM(keras.optimizers.SGD(0.01), rho=0.05, perturb=preset),
            loss="sparse_categorical_crossentropy",
        )
        before = [w.copy() for w in inner.get_weights()]
        logs = model.train_on_batch(x, y, return_dict=True)
        assert np.isfinite(logs["loss"]), preset
        assert sum(model._perturbed_mask()) == count, preset
        after = inner.get_weights()
        assert all(np.all(np.isfinite(w)) for w in after), preset
        assert any(not np.array_equal(a, b) for a, b in zip(before, after)), preset

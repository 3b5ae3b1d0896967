"""Argument validation, zero gradients, SAMModel delegation and configs."""

import json
import math

import keras
import numpy as np
import pytest

from keras_ssam import SAM, SSAM, USAM, SAMModel

SAM_CLASSES = [SAM, USAM, SSAM]


def sgd(lr=0.1, **kwargs):
    return keras.optimizers.SGD(learning_rate=lr, **kwargs)


def assert_message(excinfo, *fragments):
    message = str(excinfo.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error message: {message}"


# --------------------------------------------------------------------------
# Constructor arguments
# --------------------------------------------------------------------------


def expect_value_error(make, *fragments):
    with pytest.raises(ValueError) as excinfo:
        make()
    assert_message(excinfo, *fragments)


BAD_RHO = [
    (-0.1, "rho=-0.1"),
    (-1, "rho=-1"),
    (float("nan"), "rho=nan"),
    (float("inf"), "rho=inf"),
    (float("-inf"), "rho=-inf"),
    ("0.05", "rho='0.05'"),
    (None, "rho=None"),
    (True, "rho=True"),
]


def test_bad_rho():
    for cls in SAM_CLASSES:
        for rho, shown in BAD_RHO:
            expect_value_error(lambda: cls(sgd(), rho=rho), "`rho`", shown)
            expect_value_error(lambda: cls(sgd(), rho), "`rho`", shown)


def test_bad_epsilon():
    for cls in SAM_CLASSES:
        for epsilon, shown in [(-1e-12, "epsilon=-1e-12"), (-1.0, "epsilon=-1.0"),
                               (float("nan"), "epsilon=nan"),
                               (float("inf"), "epsilon=inf"),
                               ("tiny", "epsilon='tiny'")]:
            expect_value_error(
                lambda: cls(sgd(), epsilon=epsilon), "`epsilon`", shown
            )


def test_max_scale_not_positive():
    for max_scale, shown in [(0, "max_scale=0"), (-1, "max_scale=-1"),
                             (0.0, "max_scale=0.0"), (float("nan"), "max_scale=nan"),
                             (float("inf"), "max_scale=inf")]:
        expect_value_error(
            lambda: SSAM(sgd(), max_scale=max_scale), "`max_scale`", shown
        )
        expect_value_error(
            lambda: SAM(sgd(), stable=True, max_scale=max_scale), "`max_scale`", shown
        )
        expect_value_error(
            lambda: USAM(sgd(), stable=True, max_scale=max_scale), "`max_scale`", shown
        )


def test_max_scale_without_stable():
    for cls in (SAM, USAM):
        expect_value_error(
            lambda: cls(sgd(), max_scale=2.0), "`max_scale`", "max_scale=2.0", "stable"
        )
    expect_value_error(
        lambda: SSAM(sgd(), stable=False, max_scale=2.0),
        "`max_scale`", "max_scale=2.0", "stable=False",
    )


def test_bad_eta():
    for cls in SAM_CLASSES:
        expect_value_error(
            lambda: cls(sgd(), adaptive=True, eta=-0.01), "`eta`", "eta=-0.01"
        )
        expect_value_error(
            lambda: cls(sgd(), adaptive=True, eta=float("nan")), "`eta`", "eta=nan"
        )
        # eta != 0 without adaptive=True.
        expect_value_error(
            lambda: cls(sgd(), eta=0.01), "`eta`", "eta=0.01", "adaptive"
        )
        expect_value_error(
            lambda: cls(sgd(), adaptive=False, eta=0.5), "`eta`", "eta=0.5", "adaptive"
        )


def test_non_bool_flags():
    for flag in ["normalize", "stable", "adaptive"]:
        expect_value_error(lambda: SAM(sgd(), **{flag: "yes"}), f"`{flag}`", f"{flag}='yes'")


def test_valid_arguments_are_accepted():
    """The bounds themselves are valid: rho=0, epsilon=0, eta=0 with
    adaptive=False, tiny positive max_scale."""
    opt = SAM(sgd(), rho=0, epsilon=0.0)
    assert opt.rho == 0 and opt.epsilon == 0.0
    opt = SSAM(sgd(), rho=0.1, max_scale=1e-6, adaptive=True, eta=0.0)
    assert opt.max_scale == 1e-6 and opt.eta == 0.0
    opt = USAM(sgd(), rho=np.float32(0.2))
    assert math.isclose(float(opt.rho), 0.2, rel_tol=1e-6)


BAD_BASES = [
    ("sgd", "base_optimizer='sgd'"),
    (keras.optimizers.SGD, "SGD"),
    (None, "base_optimizer=None"),
    (0.1, "base_optimizer=0.1"),
]


def test_base_optimizer_not_an_optimizer_instance():
    for cls in SAM_CLASSES:
        for base, shown in BAD_BASES:
            expect_value_error(lambda: cls(base), "`base_optimizer`", shown)
            expect_value_error(lambda: cls(base_optimizer=base), "`base_optimizer`", shown)


def test_nested_sam_optimizers():
    for outer in SAM_CLASSES:
        for inner in SAM_CLASSES:
            expect_value_error(
                lambda: outer(inner(sgd())), "`base_optimizer`", inner.__name__
            )


def test_loss_scale_optimizer_as_base():
    for cls in SAM_CLASSES:
        expect_value_error(
            lambda: cls(keras.optimizers.LossScaleOptimizer(sgd())),
            "`base_optimizer`", "LossScaleOptimizer",
        )


# --------------------------------------------------------------------------
# SAMModel arguments and compile
# --------------------------------------------------------------------------


def small_model(name=None):
    return keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, name="dense_alpha"),
         keras.layers.Dense(1, name="dense_beta")],
        name=name,
    )


def test_sam_model_compiled_with_plain_optimizer():
    for optimizer, shown in [("sgd", "SGD"), (keras.optimizers.Adam(), "Adam")]:
        model = SAMModel(small_model())
        with pytest.raises(ValueError) as excinfo:
            model.compile(optimizer=optimizer, loss="mse")
        assert_message(excinfo, "SAMModel", "optimizer", shown)


def test_sam_model_given_a_non_model():
    for bad, shown in [
        (keras.layers.Dense(2), "Dense"),
        ("model", "model='model'"),
        (None, "model=None"),
        (lambda x: x, "function"),
    ]:
        expect_value_error(lambda: SAMModel(bad), "`model`", shown)
    expect_value_error(lambda: SAMModel(SAMModel(small_model())), "`model`", "SAMModel")


def _plain_model_with(cls):
    model = small_model()
    model.compile(optimizer=cls(sgd(), rho=0.1), loss="mse")
    return model


X_PLAIN = np.ones((4, 3), "float32")
Y_PLAIN = np.ones((4, 1), "float32")


def test_sam_optimizer_in_plain_model_raises_on_fit():
    for cls in SAM_CLASSES:
        model = _plain_model_with(cls)
        with pytest.raises(RuntimeError) as excinfo:
            model.fit(X_PLAIN, Y_PLAIN, epochs=1, verbose=0)
        assert_message(excinfo, "SAMModel")


def test_sam_optimizer_in_plain_model_raises_on_train_on_batch():
    model = _plain_model_with(SAM)
    before = [np.array(w) for w in model.get_weights()]
    with pytest.raises(RuntimeError) as excinfo:
        model.train_on_batch(X_PLAIN, Y_PLAIN)
    assert_message(excinfo, "SAMModel")
    for b, a in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_sam_optimizer_in_plain_model_leaves_weights_intact_after_fit_error():
    """After the error the model is untouched: same weights, still usable."""
    model = _plain_model_with(SSAM)
    before = [np.array(w) for w in model.get_weights()]
    with pytest.raises(RuntimeError):
        model.fit(X_PLAIN, Y_PLAIN, epochs=1, verbose=0)
    after = model.get_weights()
    assert len(after) == len(before)
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)
    k1, b1, k2, b2 = [w.astype(np.float64) for w in before]
    np.testing.assert_allclose(
        model.predict(X_PLAIN, verbose=0), (X_PLAIN @ k1 + b1) @ k2 + b2,
        rtol=1e-5, atol=1e-6,
    )


# --------------------------------------------------------------------------
# Zero gradients: no NaN, exact expected weights
# --------------------------------------------------------------------------

LR = 0.1
RHO = 0.2

ZERO_GRAD_OPTIMIZERS = {
    "sam_eps0": lambda: SAM(sgd(LR), rho=RHO, epsilon=0.0),
    "usam_eps0": lambda: USAM(sgd(LR), rho=RHO, epsilon=0.0),
    "ssam_eps0": lambda: SSAM(sgd(LR), rho=RHO, epsilon=0.0),
    "ssam_normalized_max_scale": lambda: SSAM(
        sgd(LR), rho=RHO, normalize=True, max_scale=2.0
    ),
    "asam_eta0_eps0": lambda: SAM(sgd(LR), rho=RHO, adaptive=True, eta=0.0, epsilon=0.0),
    "ausam_eta0_eps0": lambda: USAM(sgd(LR), rho=RHO, adaptive=True, eta=0.0, epsilon=0.0),
    "assam_eta0_eps0": lambda: SSAM(sgd(LR), rho=RHO, adaptive=True, eta=0.0, epsilon=0.0),
}


def _linear(kernel, bias):
    layer = keras.layers.Dense(kernel.shape[1], name="dense")
    inner = keras.Sequential([keras.Input((kernel.shape[0],)), layer])
    layer.set_weights([kernel, bias])
    return inner, layer


def _layer_weights(layer):
    return [keras.ops.convert_to_numpy(v) for v in (layer.kernel, layer.bias)]


def _zero_loss_case(case):
    if case == "targets_equal_predictions":
        # Dyadic values: every product and sum is exact in float32, in any
        # order, so y is exactly the model's prediction and the loss is 0.
        x = np.array([[1, -2, 3], [0, 1, -1], [2, 2, 0], [-3, 1, 1]], "float32")
        kernel = np.array([[0.5, -1.0], [0.25, 2.0], [-0.75, 0.5]], "float32")
        bias = np.array([0.125, -0.5], "float32")
        y = x @ kernel + bias
    else:  # zero inputs, zero weights, zero targets
        x = np.zeros((4, 3), "float32")
        kernel = np.zeros((3, 2), "float32")
        bias = np.zeros((2,), "float32")
        y = np.zeros((4, 2), "float32")
    return x, y, kernel, bias


@pytest.mark.parametrize("opt_name", list(ZERO_GRAD_OPTIMIZERS))
def test_zero_gradient_gives_no_nan(opt_name):
    for case in ["targets_equal_predictions", "all_zero"]:
        x, y, kernel, bias = _zero_loss_case(case)
        inner, layer = _linear(kernel, bias)
        model = SAMModel(inner)
        model.compile(optimizer=ZERO_GRAD_OPTIMIZERS[opt_name](), loss="mse")
        losses = [
            model.train_on_batch(x, y, return_dict=True)["loss"] for _ in range(2)
        ]
        # The loss is exactly zero, the gradient too: nothing moves.
        assert losses == [0.0, 0.0], case
        new_kernel, new_bias = _layer_weights(layer)
        np.testing.assert_array_equal(new_kernel, kernel, err_msg=case)
        np.testing.assert_array_equal(new_bias, bias, err_msg=case)
        for v in model.optimizer.variables:
            assert np.all(np.isfinite(keras.ops.convert_to_numpy(v))), case


@pytest.mark.parametrize(
    "opt_name", ["asam_eta0_eps0", "ausam_eta0_eps0", "assam_eta0_eps0"]
)
def test_adaptive_eta0_at_zero_weights_is_a_plain_step(opt_name):
    """ASAM with eta=0 at w=0: T(w)=|w|=0, so ||T g||=0 although g != 0. The
    perturbation must be 0 (not 0/0), the perturbed gradient is g, and SSAM's
    gamma is its e -> 0 limit, 1: one plain SGD step, w1 = -lr * g."""
    rng = np.random.RandomState(0)
    x = rng.normal(size=(4, 3)).astype("float32")
    y = rng.normal(size=(4, 2)).astype("float32")
    inner, layer = _linear(np.zeros((3, 2), "float32"), np.zeros((2,), "float32"))
    model = SAMModel(inner)
    model.compile(optimizer=ZERO_GRAD_OPTIMIZERS[opt_name](), loss="mse")
    logs = model.train_on_batch(x, y, return_dict=True)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    d = 2.0 * (0.0 - y64) / y64.size
    expected = [-LR * (x64.T @ d), -LR * d.sum(0)]
    for a, e in zip(_layer_weights(layer), expected):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(logs["loss"], np.mean(y64**2), rtol=1e-5)


# --------------------------------------------------------------------------
# SAMModel delegates to the wrapped model
# --------------------------------------------------------------------------


def _delegation_setup():
    rng = np.random.RandomState(3)
    inner = small_model(name="inner_net")
    weights = [rng.normal(size=w.shape).astype("float32") for w in inner.get_weights()]
    inner.set_weights(weights)
    x = rng.normal(size=(6, 3)).astype("float32")
    y = rng.normal(size=(6, 1)).astype("float32")
    return inner, weights, x, y


def _np_forward(weights, x):
    k1, b1, k2, b2 = [w.astype(np.float64) for w in weights]
    return (x.astype(np.float64) @ k1 + b1) @ k2 + b2


def test_predict_and_evaluate_are_the_inner_models():
    inner, weights, x, y = _delegation_setup()
    model = SAMModel(inner)
    expected = _np_forward(weights, x)
    pred = model.predict(x, verbose=0)
    np.testing.assert_allclose(pred, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pred, inner.predict(x, verbose=0))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(x)), expected, rtol=1e-5, atol=1e-6
    )

    model.compile(optimizer=SAM(sgd()), loss="mse", metrics=["mae"])
    inner.compile(optimizer=sgd(), loss="mse", metrics=["mae"])
    got = model.evaluate(x, y, verbose=0, return_dict=True)
    ref = inner.evaluate(x, y, verbose=0, return_dict=True)
    assert set(got) == {"loss", "mae"}
    np.testing.assert_allclose(got["loss"], np.mean((expected - y) ** 2), rtol=1e-5)
    np.testing.assert_allclose(got["mae"], np.mean(np.abs(expected - y)), rtol=1e-5)
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-6)
    np.testing.assert_allclose(got["mae"], ref["mae"], rtol=1e-6)


def test_weights_are_the_inner_models_variables():
    inner, weights, x, y = _delegation_setup()
    model = SAMModel(inner)
    assert len(model.weights) == len(inner.weights) == 4
    for a, b in zip(model.weights, inner.weights):
        assert a is b
    assert len(model.trainable_weights) == len(inner.trainable_weights)
    for a, b in zip(model.trainable_weights, inner.trainable_weights):
        assert a is b
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    # Training the wrapper trains the inner model's variables in place.
    model.compile(optimizer=SAM(sgd(0.1), rho=0.0), loss="mse")
    model.train_on_batch(x, y)
    # rho = 0: one plain SGD step on the MSE.
    w64 = [w.astype(np.float64) for w in weights]
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    h = x64 @ w64[0] + w64[1]
    out = h @ w64[2] + w64[3]
    d = 2.0 * (out - y64) / y64.size
    dh = d @ w64[2].T
    grads = [x64.T @ dh, dh.sum(0), h.T @ d, d.sum(0)]
    for got, w, g in zip(inner.get_weights(), w64, grads):
        np.testing.assert_allclose(got, w - 0.1 * g, rtol=1e-5, atol=1e-6)


def test_summary_prints_inner_layers(capsys):
    inner, _, _, _ = _delegation_setup()
    model = SAMModel(inner)
    model.summary()
    out = capsys.readouterr().out
    assert "dense_alpha" in out and "dense_beta" in out
    # 3*2+2 + 2*1+1 = 11 parameters.
    assert "11" in out
    lines = []
    model.summary(print_fn=lambda line, *a, **k: lines.append(line))
    joined = "\n".join(lines)
    assert "dense_alpha" in joined and "dense_beta" in joined


# --------------------------------------------------------------------------
# get_config / from_config
# --------------------------------------------------------------------------

FULL_KWARGS = {
    SAM: dict(rho=0.2, normalize=False, stable=True, adaptive=True, eta=0.01,
              max_scale=3.0, epsilon=1e-8, name="my_sam"),
    USAM: dict(rho=0.15, normalize=True, stable=True, adaptive=True, eta=0.02,
               max_scale=2.5, epsilon=1e-9, name="my_usam"),
    SSAM: dict(rho=0.3, normalize=True, stable=True, adaptive=True, eta=0.03,
               max_scale=1.5, epsilon=1e-7, name="my_ssam"),
}
DEFAULTS = {
    SAM: dict(rho=0.05, normalize=True, stable=False, adaptive=False, eta=0.0,
              max_scale=None, epsilon=1e-12),
    USAM: dict(rho=0.05, normalize=False, stable=False, adaptive=False, eta=0.0,
               max_scale=None, epsilon=1e-12),
    SSAM: dict(rho=0.05, normalize=False, stable=True, adaptive=False, eta=0.0,
               max_scale=None, epsilon=1e-12),
}
ARG_NAMES = ["rho", "normalize", "stable", "adaptive", "eta", "max_scale", "epsilon"]


def _check_round_trip(original, restored, cls, kwargs):
    assert type(restored) is cls
    for arg in ARG_NAMES:
        assert getattr(restored, arg) == kwargs[arg], arg
        assert type(getattr(restored, arg)) is type(kwargs[arg]), arg
    if "name" in kwargs:
        assert restored.name == kwargs["name"]
    base = restored.base_optimizer
    # (isinstance: the torch backend's SGD is a subclass)
    assert isinstance(base, keras.optimizers.SGD)
    assert base is not original.base_optimizer
    assert math.isclose(float(keras.ops.convert_to_numpy(base.learning_rate)), 0.3,
                        rel_tol=1e-6)
    assert base.momentum == 0.5 and base.nesterov is True
    assert math.isclose(
        float(keras.ops.convert_to_numpy(restored.learning_rate)), 0.3, rel_tol=1e-6
    )
    assert restored.get_config() == original.get_config()


@pytest.mark.parametrize("cls", SAM_CLASSES)
def test_optimizer_config_round_trip(cls):
    for which in ["full", "defaults"]:
        _optimizer_config_round_trip(cls, which)


def _optimizer_config_round_trip(cls, which):
    kwargs = FULL_KWARGS[cls] if which == "full" else DEFAULTS[cls]
    ctor = dict(kwargs) if which == "full" else {}
    original = cls(sgd(0.3, momentum=0.5, nesterov=True), **ctor)
    for arg in ARG_NAMES:  # the constructor stored what it was given
        assert getattr(original, arg) == kwargs[arg], arg

    config = original.get_config()
    for arg in ARG_NAMES:
        assert config[arg] == kwargs[arg], arg
    _check_round_trip(original, cls.from_config(config), cls, kwargs)

    serialized = keras.saving.serialize_keras_object(original)
    serialized = json.loads(json.dumps(serialized))  # JSON-safe
    restored = keras.saving.deserialize_keras_object(serialized)
    _check_round_trip(original, restored, cls, kwargs)


def test_optimizer_config_round_trip_rho_schedule():
    for cls in SAM_CLASSES:
        _rho_schedule_round_trip(cls)


def _rho_schedule_round_trip(cls):
    schedule = keras.optimizers.schedules.ExponentialDecay(
        0.1, decay_steps=10, decay_rate=0.5
    )
    original = cls(sgd(0.3, momentum=0.5, nesterov=True), rho=schedule)
    serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(original)))
    restored = keras.saving.deserialize_keras_object(serialized)
    assert type(restored) is cls
    assert type(restored.rho) is keras.optimizers.schedules.ExponentialDecay
    assert restored.rho.get_config() == schedule.get_config()
    # rho at step 0 and step 10 (0.1 and 0.05), read through the schedule.
    np.testing.assert_allclose(
        float(keras.ops.convert_to_numpy(restored.rho(0))), 0.1, rtol=1e-6
    )
    np.testing.assert_allclose(
        float(keras.ops.convert_to_numpy(restored.rho(10))), 0.05, rtol=1e-6
    )
    restored2 = cls.from_config(original.get_config())
    assert type(restored2.rho) is keras.optimizers.schedules.ExponentialDecay


def _architecture(model):
    return [(type(layer).__name__, layer.get_config()["units"]) for layer in model.layers]


def test_sam_model_serialize_deserialize():
    inner, weights, x, _ = _delegation_setup()
    model = SAMModel(inner, name="wrapped")
    serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(model)))
    restored = keras.saving.deserialize_keras_object(serialized)
    assert type(restored) is SAMModel
    assert restored.name == "wrapped"
    assert type(restored.model) is keras.Sequential
    assert restored.model.name == "inner_net"
    assert restored.model is not inner
    assert _architecture(restored.model) == [("Dense", 2), ("Dense", 1)]
    assert [layer.name for layer in restored.model.layers] == ["dense_alpha", "dense_beta"]
    assert [tuple(w.shape) for w in restored.weights] == [w.shape for w in weights]
    # Same architecture: the original weights load and give the same output.
    restored.set_weights(model.get_weights())
    np.testing.assert_allclose(
        restored.predict(x, verbose=0), _np_forward(weights, x), rtol=1e-5, atol=1e-6
    )
    # Default name round-trips too.
    default = SAMModel(small_model(name="net"))
    assert default.name == "sam_net"
    again = SAMModel.from_config(default.get_config())
    assert again.name == "sam_net" and type(again) is SAMModel


def test_sam_model_save_and_load(tmp_path):
    """A `.keras` file restores the wrapper, the inner weights and the
    compiled SAM optimizer (with its base optimizer's momentum state)."""
    inner, weights, x, y = _delegation_setup()
    model = SAMModel(inner, name="wrapped")
    cls = SSAM
    kwargs = dict(FULL_KWARGS[cls])
    kwargs.pop("name")
    model.compile(
        optimizer=cls(sgd(0.3, momentum=0.5, nesterov=True), **kwargs), loss="mse"
    )
    model.train_on_batch(x, y)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is SAMModel and loaded.name == "wrapped"
    assert _architecture(loaded.model) == [("Dense", 2), ("Dense", 1)]
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    opt = loaded.optimizer
    assert type(opt) is cls
    for arg in ARG_NAMES:
        assert getattr(opt, arg) == kwargs[arg], arg
    # The base optimizer's state (iterations, momentum) came back: one more
    # step from the loaded model matches one more step from the original.
    model.train_on_batch(x, y)
    loaded.train_on_batch(x, y)
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 2
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

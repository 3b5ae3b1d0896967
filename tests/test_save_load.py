"""Saving and loading `SAMModel` and the SAM optimizers, on every backend.

1. `model.save("x.keras")` + `keras.models.load_model` restores the
   `SAMModel` (diagnostics, num_batch_splits, name), the SAM optimizer (class
   and every argument, rho as a schedule included), the base optimizer's
   state (momentum / Adam slots, iterations), and training resumed after
   loading equals uninterrupted training.
2. `get_config` / `from_config` (and Keras serialization) round-trip every
   argument of every public class.
"""

import copy

import keras
import numpy as np
import pytest
from keras import ops

import keras_ssam

BACKEND = keras.backend.backend()


def _np(v):
    return np.asarray(ops.convert_to_numpy(v), dtype=np.float64)


def _data(n=32, d_in=3, d_out=2, seed=0):
    rs = np.random.RandomState(seed)
    x = rs.normal(size=(n, d_in)).astype("float32")
    y = rs.normal(size=(n, d_out)).astype("float32")
    return x, y


def _inner(d_in=3, d_out=2, seed=0):
    rs = np.random.RandomState(seed + 100)
    inp = keras.Input((d_in,))
    out = keras.layers.Dense(d_out, name="lin")(inp)
    inner = keras.Model(inp, out, name="inner")
    inner.get_layer("lin").set_weights(
        [0.5 * rs.normal(size=(d_in, d_out)).astype("float32"),
         0.5 * rs.normal(size=(d_out,)).astype("float32")]
    )
    return inner


def _rho_schedule():
    return keras.optimizers.schedules.ExponentialDecay(0.3, decay_steps=1, decay_rate=0.7)


CASES = {
    # SSAM with every argument set, rho a schedule, SGD+momentum+clipnorm.
    "SSAM-schedule": dict(
        cls=keras_ssam.SSAM,
        base=lambda: keras.optimizers.SGD(0.05, momentum=0.9, clipnorm=2.0),
        kwargs=dict(rho=_rho_schedule, normalize=True, adaptive=True, eta=0.01,
                    max_scale=2.0, epsilon=1e-10, name="my_ssam"),
        diagnostics=True,
        num_batch_splits=2,
        slots=("momentums",),
    ),
    # SAM with a float rho and Adam (two slots per weight).
    "SAM-adam": dict(
        cls=keras_ssam.SAM,
        base=lambda: keras.optimizers.Adam(0.01, beta_1=0.8),
        kwargs=dict(rho=0.2),
        diagnostics=False,
        num_batch_splits=1,
        slots=("_momentums", "_velocities"),
    ),
    # USAM with a schedule on the base optimizer's learning rate.
    "USAM-lr-schedule": dict(
        cls=keras_ssam.USAM,
        base=lambda: keras.optimizers.SGD(
            keras.optimizers.schedules.ExponentialDecay(0.1, 1, 0.9), momentum=0.5
        ),
        kwargs=dict(rho=0.1),
        diagnostics=True,
        num_batch_splits=4,
        slots=("momentums",),
    ),
}


def _build(case):
    kwargs = dict(case["kwargs"])
    if callable(kwargs["rho"]):
        kwargs["rho"] = kwargs["rho"]()
    model = keras_ssam.SAMModel(
        _inner(), diagnostics=case["diagnostics"],
        num_batch_splits=case["num_batch_splits"], name="sam_wrapper",
    )
    model.compile(optimizer=case["cls"](case["base"](), **kwargs), loss="mse", metrics=["mae"])
    return model


def _fit(model, x, y):
    return model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0).history


def _inner_weights(model):
    return [np.asarray(w, np.float64) for w in model.model.get_weights()]


def _slot_values(opt, names):
    return [[_np(v) for v in getattr(opt, name)] for name in names]


@pytest.mark.parametrize("case_name", list(CASES))
def test_save_load_restores_model_optimizer_state_and_resumes(case_name, tmp_path):
    case = CASES[case_name]
    x, y = _data()
    model = _build(case)
    _fit(model, x[:16], y[:16])  # 2 steps
    path = str(tmp_path / "x.keras")
    model.save(path)
    loaded = keras.models.load_model(path)

    # The model.
    assert type(loaded) is keras_ssam.SAMModel
    assert loaded.name == "sam_wrapper"
    assert loaded.diagnostics is case["diagnostics"]
    assert loaded.num_batch_splits == case["num_batch_splits"]
    for a, b in zip(_inner_weights(loaded), _inner_weights(model)):
        np.testing.assert_array_equal(a, b)

    # The optimizer: class and every argument.
    sam, sam0 = loaded.optimizer, model.optimizer
    assert type(sam) is case["cls"]
    for attr in ("normalize", "stable", "adaptive", "eta", "max_scale", "epsilon", "name"):
        assert getattr(sam, attr) == getattr(sam0, attr), attr
    if isinstance(sam0.rho, keras.optimizers.schedules.LearningRateSchedule):
        assert type(sam.rho) is type(sam0.rho)
        assert sam.rho.get_config() == sam0.rho.get_config()
        for t in range(4):
            np.testing.assert_allclose(_np(sam.rho(t)), _np(sam0.rho(t)), rtol=1e-7)
    else:
        assert sam.rho == sam0.rho
    assert sam.get_config() == sam0.get_config()
    base, base0 = sam.base_optimizer, sam0.base_optimizer
    assert type(base) is type(base0)
    assert base.get_config() == base0.get_config()

    # The base optimizer's state.
    assert int(_np(sam.iterations)) == int(_np(sam0.iterations)) == 2
    assert int(_np(base.iterations)) == 2
    for got, want in zip(_slot_values(base, case["slots"]), _slot_values(base0, case["slots"])):
        assert len(got) == len(want) == 2
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
            assert np.max(np.abs(b)) > 0, "setup: slots hold state"

    # Resumed training equals uninterrupted training (2 more steps).
    h_loaded = _fit(loaded, x[16:], y[16:])
    h_orig = _fit(model, x[16:], y[16:])
    for a, b in zip(_inner_weights(loaded), _inner_weights(model)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert set(h_loaded) == set(h_orig)
    for key in h_orig:
        np.testing.assert_allclose(h_loaded[key], h_orig[key], rtol=1e-6, atol=1e-7, err_msg=key)
    assert int(_np(loaded.optimizer.iterations)) == 4


def test_resumed_training_differs_from_fresh_optimizer(tmp_path):
    """Guard for the test above: a loaded model whose optimizer state were
    lost (fresh momentum, iterations 0, so rho(0) and a new schedule) would
    train differently, so the equality above is a real check."""
    case = CASES["SSAM-schedule"]
    x, y = _data()
    model = _build(case)
    _fit(model, x[:16], y[:16])
    fresh = _build(case)
    fresh.model.set_weights(model.model.get_weights())
    _fit(fresh, x[16:], y[16:])
    _fit(model, x[16:], y[16:])
    diff = max(np.max(np.abs(a - b)) for a, b in zip(_inner_weights(fresh), _inner_weights(model)))
    assert diff > 1e-4


def test_load_model_without_compile_then_compile_and_train(tmp_path):
    model = _build(CASES["SAM-adam"])
    x, y = _data()
    _fit(model, x[:8], y[:8])
    path = str(tmp_path / "x.keras")
    model.save(path)
    loaded = keras.models.load_model(path, compile=False)
    assert type(loaded) is keras_ssam.SAMModel
    np.testing.assert_allclose(
        ops.convert_to_numpy(loaded.predict(x, verbose=0)),
        ops.convert_to_numpy(model.predict(x, verbose=0)), rtol=1e-6, atol=1e-6,
    )
    loaded.compile(optimizer=keras_ssam.SAM(keras.optimizers.SGD(0.1)), loss="mse")
    hist = _fit(loaded, x, y)
    assert np.isfinite(hist["loss"][0])


# ---------------------------------------------------------------------------
# get_config / from_config.
# ---------------------------------------------------------------------------


OPTIMIZER_ARGS = [
    (keras_ssam.SAM, dict(rho=0.2, normalize=False, stable=True, adaptive=True, eta=0.1,
                          max_scale=3.0, epsilon=1e-8, name="s1")),
    (keras_ssam.SAM, dict()),
    (keras_ssam.USAM, dict(rho=0.3, adaptive=True, eta=0.05, epsilon=1e-9, name="u1")),
    (keras_ssam.USAM, dict()),
    (keras_ssam.SSAM, dict(rho="schedule", normalize=True, max_scale=1.5, adaptive=True,
                           eta=0.2, epsilon=1e-6, name="ss1")),
    (keras_ssam.SSAM, dict()),
]


@pytest.mark.parametrize(
    "cls,kwargs", OPTIMIZER_ARGS,
    ids=["SAM-all", "SAM-default", "USAM-all", "USAM-default", "SSAM-all", "SSAM-default"],
)
def test_optimizer_config_round_trip(cls, kwargs):
    kwargs = dict(kwargs)
    if kwargs.get("rho") == "schedule":
        kwargs["rho"] = _rho_schedule()
    base = keras.optimizers.AdamW(
        0.003, weight_decay=0.02, beta_1=0.85, global_clipnorm=1.5, use_ema=True,
        ema_momentum=0.95, gradient_accumulation_steps=3,
    )
    opt = cls(base, **kwargs)
    config = opt.get_config()
    expected = {"normalize": cls is keras_ssam.SAM, "stable": cls is keras_ssam.SSAM,
                "adaptive": False, "eta": 0.0, "max_scale": None, "epsilon": 1e-12, "rho": 0.05}
    expected.update(kwargs)

    def check(restored):
        assert type(restored) is cls
        for key, value in expected.items():
            got = getattr(restored, key)
            if key == "rho" and isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
                assert type(got) is type(value)
                assert got.get_config() == value.get_config()
            else:
                assert got == value, key
        assert type(restored.base_optimizer) is type(base)
        assert isinstance(restored.base_optimizer, keras.optimizers.AdamW)
        assert restored.base_optimizer is not base
        assert restored.base_optimizer.get_config() == base.get_config()
        assert restored.get_config() == config

    check(cls.from_config(config))
    serialized = keras.saving.serialize_keras_object(opt)
    check(keras.saving.deserialize_keras_object(serialized))
    # Through the generic optimizer deserializer too.
    check(keras.optimizers.deserialize(serialized))


@pytest.mark.parametrize(
    "diagnostics,splits,trainable,policy",
    [(True, 3, False, "mixed_float16"), (False, 1, True, "float32")],
)
def test_sam_model_config_round_trip(diagnostics, splits, trainable, policy):
    """Every argument of SAMModel: model, diagnostics, num_batch_splits, name,
    and the Layer keywords trainable and dtype (the policy)."""
    inner = _inner()
    model = keras_ssam.SAMModel(
        inner, diagnostics=diagnostics, num_batch_splits=splits, name="wrapped", dtype=policy
    )
    model.trainable = trainable
    config = model.get_config()
    for restored in (
        keras_ssam.SAMModel.from_config(copy.deepcopy(config)),
        keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model)),
    ):
        assert type(restored) is keras_ssam.SAMModel
        assert restored.name == "wrapped"
        assert restored.diagnostics is diagnostics
        assert restored.num_batch_splits == splits
        assert restored.trainable is trainable
        assert restored.dtype_policy.name == policy
        assert type(restored.model) is type(inner)
        assert restored.model is not inner
        assert restored.model.get_config() == inner.get_config()
        assert restored.get_config() == config
        assert restored.built


def test_from_config_leaves_its_argument_intact():
    """`from_config` must not consume the config: calling it twice on the
    same dict works and the dict is unchanged (Keras's own wrappers, e.g.
    `keras.layers.Bidirectional.from_config`, deep-copy it first)."""
    model = keras_ssam.SAMModel(_inner(), diagnostics=True, num_batch_splits=2)
    config = model.get_config()
    before = copy.deepcopy(config)
    keras_ssam.SAMModel.from_config(config)
    assert config == before
    again = keras_ssam.SAMModel.from_config(config)
    assert again.num_batch_splits == 2

    opt = keras_ssam.SSAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=_rho_schedule())
    config = opt.get_config()
    before = copy.deepcopy(config)
    keras_ssam.SSAM.from_config(config)
    assert config == before
    assert keras_ssam.SSAM.from_config(config).get_config() == before

"""keras_ssam.SharpnessAwareMinimization, the tf.keras shim, against a
hand-written float64 reference of tf.keras's SAM step
(tests/tf_keras_reference.py), on every backend."""

import inspect

import keras
import numpy as np
import pytest
import tf_keras_reference as tref
from keras import ops

import keras_ssam
from keras_ssam.tf_keras import SharpnessAwareMinimization

BACKEND = keras.backend.backend()
RTOL, ATOL = 1e-5, 1e-6


@keras.saving.register_keras_serializable(package="tests_tf_keras")
class ModeScale(keras.layers.Layer):
    """`x * factor` in training mode, `x` in inference mode: a deterministic
    layer whose output depends on the mode (as Dropout's and
    BatchNormalization's do)."""

    def __init__(self, factor, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x, training=None):
        return x * self.factor if training else x

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


def _inner(net, params, state, n_in=3, n_hidden=5, n_out=2):
    """The Keras model of `tref.Net`, holding `params` and `state`."""
    layers = [keras.Input((n_in,))]
    if net.batch_norm:
        layers.append(keras.layers.BatchNormalization())
    regularizer = keras.regularizers.L2(net.l2) if net.l2 else None
    layers.append(keras.layers.Dense(n_hidden, activation="tanh", kernel_regularizer=regularizer))
    if net.mode_scale is not None:
        layers.append(ModeScale(net.mode_scale))
    layers.append(keras.layers.Dense(n_out))
    inner = keras.Sequential(layers)
    assert len(inner.trainable_variables) == len(params)
    for v, p in zip(inner.trainable_variables, params):
        v.assign(p.astype("float32"))
    for v, s in zip(inner.non_trainable_variables, state):
        v.assign(s.astype("float32"))
    return inner


def _data(seed, n, n_in=3, n_out=2, sample_weight=False):
    rng = np.random.default_rng(seed)
    # Mean and scale far from BatchNormalization's initial statistics (0, 1),
    # so that its inference and training modes differ.
    x = (1.5 + 2.0 * rng.standard_normal((n, n_in))).astype(np.float32)
    y = (np.sin(x[:, :n_out]) + 0.3 * rng.standard_normal((n, n_out))).astype(np.float32)
    sw = rng.uniform(0.2, 2.0, n).astype(np.float32) if sample_weight else None
    return x, y, sw


def _numpy(variables):
    return [ops.convert_to_numpy(v).astype(np.float64) for v in variables]


def _check(got, want, what, rtol=RTOL, atol=ATOL):
    for i, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"{what}, weight {i}")


def _max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def _optimizers(kind):
    """(Keras optimizer, reference optimizer)."""
    if kind == "sgd":
        return keras.optimizers.SGD(0.1), tref.SGD(0.1)
    if kind == "momentum":
        return keras.optimizers.SGD(0.05, momentum=0.9), tref.SGD(0.05, momentum=0.9)
    if kind == "adam":
        return keras.optimizers.Adam(0.01), tref.Adam(0.01)
    raise ValueError(kind)


# Each case: the network, the optimizer, the shim's arguments, the
# reference's switches (its defaults are tf.keras's), data.
CASES = {
    # tf.keras's step, exactly (the shim's defaults).
    "sgd-unsplit": dict(net=tref.Net(), opt="sgd", kwargs={}, ref={}),
    "momentum-split2": dict(net=tref.Net(), opt="momentum", kwargs=dict(num_batch_splits=2), ref={}),
    "momentum-split4-mode": dict(net=tref.Net(mode_scale=1.7), opt="momentum", kwargs=dict(num_batch_splits=4),
                                 ref={}),
    "adam-mode-unsplit": dict(net=tref.Net(mode_scale=0.6), opt="adam", kwargs=dict(rho=0.1), ref={}),
    "adam-split2-sample-weight": dict(net=tref.Net(mode_scale=1.5), opt="adam", kwargs=dict(num_batch_splits=2),
                                      ref={}, sample_weight=True),
    # BatchNormalization on the input: its batch statistics do not depend
    # on the weights, so unsplit the two agree on the moving statistics too.
    "batchnorm-momentum-unsplit": dict(net=tref.Net(batch_norm=True), opt="momentum", kwargs=dict(rho=0.1), ref={}),
    # tf.keras dropped the regularizers; opting in reproduces that.
    "l2-dropped-split2": dict(net=tref.Net(l2=0.05), opt="momentum",
                              kwargs=dict(num_batch_splits=2, include_regularization=False), ref={}),
    # keras_ssam's documented departures, against the reference's switches.
    "l2-kept-default": dict(net=tref.Net(l2=0.05), opt="momentum", kwargs=dict(num_batch_splits=2),
                            ref=dict(include_regularization=True)),
    "ascent-training-split2-mode": dict(net=tref.Net(mode_scale=1.7), opt="momentum",
                                        kwargs=dict(num_batch_splits=2, ascent_training=True),
                                        ref=dict(ascent_training=True)),
    "ascent-training-batchnorm": dict(net=tref.Net(batch_norm=True), opt="sgd", kwargs=dict(ascent_training=True),
                                      ref=dict(ascent_training=True, bn_statistics="whole_batch")),
    "mean-reduction-split4": dict(net=tref.Net(mode_scale=1.7), opt="sgd",
                                  kwargs=dict(num_batch_splits=4, batch_split_reduction="mean"),
                                  ref=dict(batch_split_reduction="mean")),
    # Splits with BatchNormalization: keras_ssam's statistics (one update
    # from the whole batch at w) differ from tf.keras's (one per split).
    "batchnorm-split2-statistics": dict(net=tref.Net(batch_norm=True), opt="momentum",
                                        kwargs=dict(num_batch_splits=2), ref=dict(bn_statistics="whole_batch"),
                                        differs_from_tf_keras=True),
    # A batch size that num_batch_splits does not divide (tf.split raised).
    "uneven-split4": dict(net=tref.Net(mode_scale=1.7), opt="momentum", kwargs=dict(num_batch_splits=4),
                          ref=dict(uneven_splits=True), batch=10),
}

STEPS = 6


def _run_case(case, kwargs=None, steps=STEPS):
    """Trains the shim `steps` steps with train_on_batch; returns per step
    (weights, logs, BatchNormalization state) and the reference's."""
    spec = CASES[case]
    net, batch = spec["net"], spec.get("batch", 8)
    params, state = net.init(np.random.default_rng(7))
    x, y, sw = _data(11, batch * steps, sample_weight=spec.get("sample_weight", False))
    keras_opt, ref_opt = _optimizers(spec["opt"])
    kwargs = dict(spec["kwargs"], **(kwargs or {}))
    model = SharpnessAwareMinimization(_inner(net, params, state), **kwargs)
    model.compile(optimizer=keras_opt, loss="mse", metrics=["mae"])
    rho = kwargs.get("rho", 0.05)
    reference = tref.SharpnessAwareMinimization(net, params, state, ref_opt, rho, kwargs.get("num_batch_splits"),
                                                **spec["ref"])
    got, want = [], []
    for i in range(steps):
        s = slice(i * batch, (i + 1) * batch)
        model.reset_metrics()
        logs = model.train_on_batch(x[s], y[s], sample_weight=None if sw is None else sw[s], return_dict=True)
        got.append((_numpy(model.trainable_variables), logs, _numpy(model.non_trainable_variables)))
        record = reference.step(x[s], y[s], None if sw is None else sw[s])
        want.append(([p.copy() for p in reference.params], record, [v.copy() for v in reference.state]))
    return got, want


@pytest.mark.parametrize("case", list(CASES))
def test_matches_tf_keras_reference(case):
    """6 steps against the float64 reference, to rtol 1e-5: the weights,
    BatchNormalization's moving statistics, and the logged loss and `mae`
    (keras_ssam's: the training-mode pass over the whole batch at w)."""
    spec = CASES[case]
    got, want = _run_case(case)
    for step, ((weights, logs, state), (ref_weights, record, ref_state)) in enumerate(zip(got, want)):
        _check(weights, ref_weights, f"{case}: weights after step {step + 1}")
        _check(state, ref_state, f"{case}: BatchNormalization state after step {step + 1}")
        np.testing.assert_allclose(logs["loss"], record["clean_loss"], rtol=RTOL, err_msg=f"{case}: loss")
        x_y_mae = np.mean(np.abs(record["clean_pred"] - _data_targets(case, step)))
        np.testing.assert_allclose(logs["mae"], x_y_mae, rtol=RTOL, err_msg=f"{case}: mae")
    if spec.get("differs_from_tf_keras"):
        net, batch = spec["net"], spec.get("batch", 8)
        params, state = net.init(np.random.default_rng(7))
        x, y, sw = _data(11, batch * STEPS)
        _, ref_opt = _optimizers(spec["opt"])
        tf_keras = tref.SharpnessAwareMinimization(net, params, state, ref_opt, spec["kwargs"].get("rho", 0.05),
                                                   spec["kwargs"].get("num_batch_splits"))
        for i in range(STEPS):
            tf_keras.step(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch])
        assert _max_diff(tf_keras.params, want[-1][0]) > 1e-4, "tf.keras's BatchNormalization updates"


def _data_targets(case, step):
    spec = CASES[case]
    batch = spec.get("batch", 8)
    _, y, _ = _data(11, batch * STEPS, sample_weight=spec.get("sample_weight", False))
    return y[step * batch:(step + 1) * batch]


# The reference's quirks matter in these cases: a shim that got one wrong
# would fail above. Checked here on the reference itself, so that each case
# keeps its power.
POWER = {
    "momentum-split2": dict(batch_split_reduction="mean"),
    "momentum-split4-mode": dict(ascent_training=True),
    "adam-mode-unsplit": dict(ascent_training=True),
    "batchnorm-momentum-unsplit": dict(ascent_training=True),
    "l2-dropped-split2": dict(include_regularization=True),
    "ascent-training-split2-mode": dict(ascent_training=False),
    "mean-reduction-split4": dict(batch_split_reduction="sum"),
}


@pytest.mark.parametrize("case", list(POWER))
def test_reference_quirk_changes_the_trajectory(case):
    spec = CASES[case]
    net, batch = spec["net"], spec.get("batch", 8)
    params, state = net.init(np.random.default_rng(7))
    x, y, sw = _data(11, batch * STEPS, sample_weight=spec.get("sample_weight", False))
    finals = []
    for switches in (spec["ref"], dict(spec["ref"], **POWER[case])):
        _, ref_opt = _optimizers(spec["opt"])
        r = tref.SharpnessAwareMinimization(net, params, state, ref_opt, spec["kwargs"].get("rho", 0.05),
                                            spec["kwargs"].get("num_batch_splits"), **switches)
        for i in range(STEPS):
            s = slice(i * batch, (i + 1) * batch)
            r.step(x[s], y[s], None if sw is None else sw[s])
        finals.append(r.params)
    assert _max_diff(*finals) > 1e-4


def test_reference_logged_loss_is_the_mean_of_both_passes():
    """Reference self-check of tf.keras's logged loss: unsplit, the mean of
    the inference-mode loss at w and the training-mode loss at w + e."""
    net = tref.Net(mode_scale=1.7)
    params, state = net.init(np.random.default_rng(3))
    x, y, _ = _data(4, 8)
    r = tref.SharpnessAwareMinimization(net, params, state, tref.SGD(0.1), 0.05)
    record = r.step(x, y)
    g = net.pass_(params, state, x, y, None, False)[2]
    e = [0.05 * gi / (tref.global_norm(g) + 1e-12) for gi in g]
    at_w = net.pass_(params, state, x, y, None, False)[0]
    at_w_e = net.pass_([p + ei for p, ei in zip(params, e)], state, x, y, None, True)[0]
    assert record["tf_keras_loss"] == pytest.approx((at_w + at_w_e) / 2, rel=1e-12)
    assert record["clean_loss"] != pytest.approx(record["tf_keras_loss"], rel=1e-3)


def test_dropout_ascent_gradient_is_the_inference_one():
    """With Dropout, the gradient that defines e is the dropout-free one:
    the `grad_norm` diagnostic of one step equals ||g|| of the network
    without dropout (ascent_training=False); with ascent_training=True it is
    the gradient of a dropped-out pass, which differs."""
    net = tref.Net()
    params, state = net.init(np.random.default_rng(5))
    x, y, _ = _data(6, 16)
    want = tref.global_norm(net.pass_(params, state, x, y, None, False)[2])
    norms = {}
    for ascent_training in (False, True):
        inner = keras.Sequential([
            keras.Input((3,)),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dropout(0.5, seed=3),
            keras.layers.Dense(2),
        ])
        for v, p in zip(inner.trainable_variables, params):
            v.assign(p.astype("float32"))
        model = SharpnessAwareMinimization(inner, diagnostics=True, ascent_training=ascent_training)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        norms[ascent_training] = float(model.train_on_batch(x, y, return_dict=True)["grad_norm"])
    np.testing.assert_allclose(norms[False], want, rtol=RTOL)
    assert abs(norms[True] - want) > 1e-3 * want


def test_fit_with_partial_last_batch():
    """`fit` on 20 examples in batches of 8 (the last one 4) with
    num_batch_splits=3 (8 = 3 + 3 + 2, 4 = 2 + 1 + 1): the chunks' gradients
    summed, against the reference with uneven splits."""
    net = tref.Net(mode_scale=1.7)
    params, state = net.init(np.random.default_rng(8))
    x, y, _ = _data(9, 20)
    model = SharpnessAwareMinimization(_inner(net, params, state), num_batch_splits=3)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    r = tref.SharpnessAwareMinimization(net, params, state, tref.SGD(0.05, momentum=0.9), 0.05, 3,
                                        uneven_splits=True)
    for _ in range(2):
        for start in (0, 8, 16):
            r.step(x[start:start + 8], y[start:start + 8])
    _check(_numpy(model.trainable_variables), r.params, "fit, 2 epochs of 3 batches")


# ---------------------------------------------------------------------------
# Compile, save and load.
# ---------------------------------------------------------------------------


def _trained_model(num_batch_splits=2, **kwargs):
    net = tref.Net(batch_norm=True, l2=0.01)
    params, state = net.init(np.random.default_rng(12))
    model = SharpnessAwareMinimization(_inner(net, params, state), rho=0.07, num_batch_splits=num_batch_splits,
                                       **kwargs)
    return model


def test_compile_wraps_the_plain_optimizer_in_sam():
    model = _trained_model()
    base = keras.optimizers.SGD(0.1, momentum=0.9)
    model.compile(optimizer=base, loss="mse")
    assert type(model.optimizer) is keras_ssam.SAM
    assert model.optimizer.base_optimizer is base
    assert model.optimizer.rho == 0.07
    assert model.optimizer.epsilon == 1e-12 and model.optimizer.normalize and not model.optimizer.adaptive
    model.compile(optimizer="adam", loss="mse")
    assert isinstance(model.optimizer.base_optimizer, keras.optimizers.Adam)


def test_compile_refuses_what_it_cannot_wrap():
    model = _trained_model()
    with pytest.raises(ValueError, match="optimizer"):
        model.compile(optimizer=42, loss="mse")
    with pytest.raises(ValueError, match="keras_ssam.SAMModel"):
        model.compile(optimizer=keras_ssam.SAM(keras.optimizers.SGD(0.1)), loss="mse")
    with pytest.raises(ValueError, match=r"Keras optimizer.*Received: optimizer=<object"):
        model.optimizer = object()


def test_mixed_float16_and_loss_scale_optimizer():
    """Under mixed_float16 `compile` puts the SAM optimizer in a
    LossScaleOptimizer; an explicit LossScaleOptimizer around a plain one is
    rebuilt around the SAM optimizer with its settings."""
    keras.config.set_dtype_policy("mixed_float16")
    x, y, _ = _data(2, 16)
    for optimizer in (keras.optimizers.SGD(0.05),
                      keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05), initial_scale=256.0)):
        inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                                  keras.layers.Dense(2, dtype="float32")])
        model = SharpnessAwareMinimization(inner, num_batch_splits=2)
        model.compile(optimizer=optimizer, loss="mse")
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert type(model.optimizer.inner_optimizer) is keras_ssam.SAM
        before = _numpy(model.trainable_variables)
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        after = _numpy(model.trainable_variables)
        assert all(np.all(np.isfinite(w)) for w in after)
        assert _max_diff(before, after) > 0
    assert model.optimizer.initial_scale == 256.0


def test_save_load_resumes_exactly(tmp_path):
    """3 steps, `model.save`, `keras.models.load_model`, 3 more steps equal
    6 uninterrupted steps: weights, BatchNormalization statistics, SGD's
    momentum, the iteration count, rho, num_batch_splits and the switches
    are restored."""
    x, y, _ = _data(13, 48)
    kwargs = dict(num_batch_splits=2, include_regularization=False, batch_split_reduction="mean")

    def make():
        model = _trained_model(**kwargs)
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse", metrics=["mae"])
        return model

    straight = make()
    straight.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)

    model = make()
    model.fit(x[:24], y[:24], batch_size=8, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "sam.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is SharpnessAwareMinimization
    assert loaded.rho == 0.07
    assert loaded.num_batch_splits == 2 and loaded.get_config()["num_batch_splits"] == 2
    assert not loaded.include_regularization and loaded.batch_split_reduction == "mean"
    assert not loaded.ascent_training
    assert type(loaded.optimizer) is keras_ssam.SAM and loaded.optimizer.rho == 0.07
    assert int(ops.convert_to_numpy(loaded.optimizer.iterations)) == 3
    for a, b in zip(_numpy(loaded.variables), _numpy(model.variables)):
        np.testing.assert_array_equal(a, b)
    loaded.fit(x[24:], y[24:], batch_size=8, epochs=1, shuffle=False, verbose=0)
    _check(_numpy(loaded.variables), _numpy(straight.variables), "resumed vs straight", rtol=0, atol=0)
    for a, b in zip(loaded.optimizer.variables, straight.optimizer.variables):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
    # The same weights with a fresh optimizer (momentum lost) differ.
    fresh = make()
    for v, w in zip(fresh.variables, model.variables):
        v.assign(w)
    fresh.fit(x[24:], y[24:], batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert _max_diff(_numpy(fresh.trainable_variables), _numpy(straight.trainable_variables)) > 1e-5


def test_regularization_left_out_of_training_only():
    """include_regularization=False leaves the L2 term out of the training
    step (tf.keras's SAM) but not out of `model.losses` or `evaluate` (nor
    did tf.keras's)."""
    x, y, _ = _data(14, 16)
    model = _trained_model(num_batch_splits=None, include_regularization=False)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    reg = 0.01 * float(np.sum(ops.convert_to_numpy(model.model.layers[1].kernel).astype(np.float64) ** 2))
    assert len(model.losses) == 1
    plain = keras.losses.MeanSquaredError()(y, model.predict(x, verbose=0))
    np.testing.assert_allclose(model.evaluate(x, y, verbose=0), float(plain) + reg, rtol=1e-5)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert len(model.losses) == 1


def test_config_round_trip():
    model = _trained_model(num_batch_splits=4, ascent_training=True, batch_split_reduction="mean",
                           include_regularization=False, diagnostics=True, perturbation_scope="local",
                           name="shim")
    model.trainable = False
    config = model.get_config()
    assert {k: config[k] for k in ("rho", "num_batch_splits", "name")} == dict(rho=0.07, num_batch_splits=4,
                                                                             name="shim")
    clone = SharpnessAwareMinimization.from_config(config)
    assert clone.get_config() == config
    assert "model" in config and config["model"]["class_name"] == "Sequential"
    default = _trained_model(num_batch_splits=None)
    assert default.get_config()["num_batch_splits"] is None and default.num_batch_splits == 1
    assert SharpnessAwareMinimization.from_config(default.get_config()).get_config() == default.get_config()


# ---------------------------------------------------------------------------
# Signature and arguments.
# ---------------------------------------------------------------------------

# tf_keras/models/sharpness_aware_minimization.py:
#     def __init__(self, model, rho=0.05, num_batch_splits=None, name=None)
TF_KERAS_PARAMETERS = [("model", inspect.Parameter.empty), ("rho", 0.05), ("num_batch_splits", None), ("name", None)]


def test_signature_matches_tf_keras():
    """The positional parameters and defaults are tf.keras's; the others
    (the switches) are keyword-only, with defaults that give tf.keras's
    update (except include_regularization, see the docstring)."""
    parameters = list(inspect.signature(SharpnessAwareMinimization).parameters.values())
    positional = [p for p in parameters if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert [(p.name, p.default) for p in positional] == TF_KERAS_PARAMETERS
    rest = {p.name: p.default for p in parameters[len(positional):]}
    assert all(p.kind == inspect.Parameter.KEYWORD_ONLY for p in parameters[len(positional):])
    assert rest == dict(ascent_training=False, batch_split_reduction="sum", include_regularization=True,
                        diagnostics=False, perturbation_scope="global")
    assert SharpnessAwareMinimization.ascent_training is False
    assert SharpnessAwareMinimization.batch_split_reduction == "sum"
    assert keras_ssam.SharpnessAwareMinimization is SharpnessAwareMinimization
    assert "SharpnessAwareMinimization" in keras_ssam.__all__
    # Positionally, as tf.keras code calls it.
    model = SharpnessAwareMinimization(_trained_model().model, 0.1, 2, "positional")
    assert (model.rho, model.num_batch_splits, model.name) == (0.1, 2, "positional")


BAD = [
    (dict(rho=-0.1), "rho", "-0.1"),
    (dict(rho=float("nan")), "rho", "nan"),
    (dict(rho="0.05"), "rho", "'0.05'"),
    (dict(num_batch_splits=0), "num_batch_splits", "0"),
    (dict(num_batch_splits=-2), "num_batch_splits", "-2"),
    (dict(num_batch_splits=2.0), "num_batch_splits", "2.0"),
    (dict(num_batch_splits=True), "num_batch_splits", "True"),
    (dict(ascent_training="no"), "ascent_training", "'no'"),
    (dict(batch_split_reduction="max"), "batch_split_reduction", "'max'"),
    (dict(include_regularization=1), "include_regularization", "1"),
    (dict(perturbation_scope="replica"), "perturbation_scope", "'replica'"),
]


@pytest.mark.parametrize("kwargs,arg,value", BAD, ids=[f"{a}={v}" for _, a, v in BAD])
def test_bad_arguments_raise(kwargs, arg, value):
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=f"`{arg}`.*Received: {arg}={value}"):
        SharpnessAwareMinimization(inner, **kwargs)


@pytest.mark.parametrize("model", ["a model", "layer", None])
def test_non_keras_model_raises(model):
    if model == "layer":
        model = keras.layers.Dense(2)
    with pytest.raises(ValueError, match="`model` must be a keras.Model.*Received: model="):
        SharpnessAwareMinimization(model)

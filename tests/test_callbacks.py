"""Keras callbacks that reach into the optimizer, with a `SAMModel` compiled
with a SAM optimizer, on every backend.

Each callback is checked the same way: a plain `keras.Model` compiled with
the base optimizer alone and `keras_ssam.SAMModel(model)` compiled with
`keras_ssam.SAM(base, rho=0.0)` (plain training with the base optimizer)
train from the same initial weights on the same data with the same
callbacks; the History (every key, every epoch) and the final weights must
match. Where the callback's effect has a value of its own (the learning
rates set, the EMA of the weights, the weights a checkpoint holds), that
value is also checked against an independent reference: the schedule's
numbers, a float64 NumPy EMA of the recorded trajectory, the weights
recorded at each epoch's end.

Callbacks: SwapEMAWeights (also with a real SAM, rho > 0, and under
`mixed_float16`, where the SAM optimizer sits inside a LossScaleOptimizer),
LearningRateScheduler, ReduceLROnPlateau, TensorBoard, BackupAndRestore
(a run that crashes mid-epoch, resumed), ModelCheckpoint and
EarlyStopping(restore_best_weights=True).
"""

import glob
import os

import keras
import numpy as np
import pytest

import keras_ssam

BACKEND = keras.backend.backend()

# Same computation in both runs (rho=0 gives e = 0 exactly, so the perturbed
# pass is at w): tight tolerances.
RTOL, ATOL = 1e-6, 1e-7
# float32 Keras against a float64 NumPy reference (EMA over a dozen steps, a
# small MLP's forward pass).
REF_RTOL, REF_ATOL = 1e-5, 1e-6

BATCH = 12
N_TRAIN, N_VAL = 48, 24  # 4 steps per epoch


# ---------------------------------------------------------------------------
# Data, model, runs.
# ---------------------------------------------------------------------------


def _data(anti_validation=False):
    """Training data of a small regression task and validation data. With
    `anti_validation` the validation targets are the negated task, so the
    validation loss grows as the model learns (best epoch: the first)."""
    rng = np.random.RandomState(0)
    w = rng.randn(4, 1)
    x = rng.randn(N_TRAIN, 4)
    y = np.tanh(x @ w) + 0.1 * rng.randn(N_TRAIN, 1)
    xv = rng.randn(N_VAL, 4)
    yv = np.tanh(xv @ w)
    if anti_validation:
        yv = -yv
    f32 = lambda a: a.astype("float32")  # noqa: E731
    return (f32(x), f32(y)), (f32(xv), f32(yv))


def _initial_weights():
    rng = np.random.RandomState(1)
    return [
        (0.5 * rng.randn(4, 5)).astype("float32"),
        (0.1 * rng.randn(5)).astype("float32"),
        (0.5 * rng.randn(5, 1)).astype("float32"),
        (0.1 * rng.randn(1)).astype("float32"),
    ]


def _inner_model():
    """A two-layer MLP with fixed initial weights (named layers, so that the
    weights' paths, which TensorBoard's histograms use, are the same in
    every run)."""
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ],
        name="mlp",
    )
    model.set_weights(_initial_weights())
    return model


def _compiled(kind, base, rho=0.0):
    """`kind` "plain": the MLP compiled with `base`; "sam": the MLP wrapped
    in a SAMModel compiled with `SAM(base, rho)`."""
    inner = _inner_model()
    if kind == "plain":
        model = inner
        model.compile(optimizer=base, loss="mse")
    else:
        model = keras_ssam.SAMModel(inner)
        model.compile(optimizer=keras_ssam.SAM(base, rho=rho), loss="mse")
    return model


def _fit(model, callbacks, *, epochs, anti_validation=False, validation=True):
    (x, y), val = _data(anti_validation)
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=epochs,
        shuffle=False,
        validation_data=val if validation else None,
        callbacks=callbacks,
        verbose=0,
    )
    return history.history


def _weights(model):
    return [np.asarray(w, dtype=np.float64) for w in model.get_weights()]


def _assert_same_run(history_a, weights_a, history_b, weights_b):
    assert sorted(history_a) == sorted(history_b)
    for key in history_a:
        assert len(history_a[key]) == len(history_b[key]), key
        np.testing.assert_allclose(history_b[key], history_a[key], rtol=RTOL, atol=ATOL, err_msg=key)
    assert len(weights_a) == len(weights_b)
    for a, b in zip(weights_a, weights_b):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)


def _both(base_fn, callbacks_fn, **fit_kwargs):
    """Runs the plain model and the SAMModel (rho=0) with fresh callbacks
    from `callbacks_fn(kind)`; checks they match; returns
    `{kind: (history, weights, model, callbacks)}`."""
    runs = {}
    for kind in ("plain", "sam"):
        keras.utils.set_random_seed(7)
        model = _compiled(kind, base_fn())
        callbacks = callbacks_fn(kind)
        history = _fit(model, callbacks, **fit_kwargs)
        runs[kind] = (history, _weights(model), model, callbacks)
    _assert_same_run(runs["plain"][0], runs["plain"][1], runs["sam"][0], runs["sam"][1])
    return runs


class _Recorder(keras.callbacks.Callback):
    """Records the weights after every training step and at every epoch's
    end (before any callback after it in the list changes them)."""

    def __init__(self):
        super().__init__()
        self.steps = []
        self.epochs = []

    def on_train_batch_end(self, batch, logs=None):
        # `self.model` brings JAX's step state back into the variables.
        self.steps.append(_weights(self.model))

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(_weights(self.model))


class _CrashAt(keras.callbacks.Callback):
    """Raises at `batch` of `epoch`, before that step runs."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.crash_epoch, self.crash_batch, self.epoch = epoch, batch, None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == (self.crash_epoch, self.crash_batch):
            raise _Crash(f"crash at epoch {self.epoch}, batch {batch}")


class _Crash(RuntimeError):
    pass


# ---------------------------------------------------------------------------
# NumPy references (float64).
# ---------------------------------------------------------------------------


def _np_ema(trajectory, momentum):
    """Keras's EMA of the weights after each step: the first step's weights,
    then `a = m a + (1 - m) w`."""
    averages, a = [], None
    for weights in trajectory:
        if a is None:
            a = [w.copy() for w in weights]
        else:
            a = [momentum * x + (1 - momentum) * w for x, w in zip(a, weights)]
        averages.append(a)
    return averages


def _np_mse(weights, x, y):
    k1, b1, k2, b2 = weights
    pred = np.tanh(x.astype(np.float64) @ k1 + b1) @ k2 + b2
    return float(np.mean((pred - y.astype(np.float64)) ** 2))


def _assert_weights_close(actual, expected, rtol=REF_RTOL, atol=REF_ATOL):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------
# SwapEMAWeights.
# ---------------------------------------------------------------------------

EMA_MOMENTUM = 0.7


def _ema_sgd():
    return keras.optimizers.SGD(0.1, momentum=0.5, use_ema=True, ema_momentum=EMA_MOMENTUM)


def _check_ema_run(history, final_weights, recorder, epochs, *, val_loss_rtol=REF_RTOL):
    """The validation loss of each epoch is that of the NumPy EMA of the
    recorded trajectory at the epoch's end (the swap happened), the final
    weights are the last EMA (Keras's `finalize_variable_values`), and the
    swap mattered (the raw weights' validation loss differs)."""
    steps_per_epoch = N_TRAIN // BATCH
    assert len(recorder.steps) == epochs * steps_per_epoch
    averages = _np_ema(recorder.steps, EMA_MOMENTUM)
    _, (xv, yv) = _data()
    for epoch in range(epochs):
        end = (epoch + 1) * steps_per_epoch - 1
        ema_loss = _np_mse(averages[end], xv, yv)
        raw_loss = _np_mse(recorder.steps[end], xv, yv)
        np.testing.assert_allclose(history["val_loss"][epoch], ema_loss, rtol=val_loss_rtol)
        assert abs(raw_loss - ema_loss) > 1e-3 * ema_loss, "the swap would not be seen"
    _assert_weights_close(final_weights, averages[-1])
    return averages


@pytest.mark.parametrize("swap_on_epoch", [True, False])
def test_swap_ema_weights_matches_plain(swap_on_epoch):
    """SwapEMAWeights (swapping at each epoch's end, or around evaluation
    only) finds the base optimizer's EMA through `SAM.inner_optimizer`: the
    SAMModel's run equals the plain one, and its validation losses are those
    of the NumPy EMA."""
    epochs = 3
    runs = _both(
        _ema_sgd,
        lambda kind: [_Recorder(), keras.callbacks.SwapEMAWeights(swap_on_epoch=swap_on_epoch)],
        epochs=epochs,
    )
    history, weights, model, callbacks = runs["sam"]
    assert model.optimizer.inner_optimizer is model.optimizer.base_optimizer
    _check_ema_run(history, weights, callbacks[0], epochs)


def test_swap_ema_weights_with_sam_uses_the_sam_trajectory_average():
    """A real SAM step (rho > 0): the weights evaluated at each epoch's end
    are the float64 NumPy EMA of the SAM trajectory, which is what the base
    optimizer holds in `_model_variables_moving_average`; the trajectory is
    SAM's, not the base optimizer's alone."""
    epochs = 3
    trajectories = {}
    for rho in (0.0, 0.3):
        keras.utils.set_random_seed(7)
        model = _compiled("sam", _ema_sgd(), rho=rho)
        recorder = _Recorder()
        history = _fit(model, [recorder, keras.callbacks.SwapEMAWeights(swap_on_epoch=True)], epochs=epochs)
        averages = _check_ema_run(history, _weights(model), recorder, epochs)
        # After the last epoch SwapEMAWeights copies the model's (EMA)
        # weights back into the averages, which `fit` then finalizes into the
        # model: both hold the EMA.
        base = model.optimizer.inner_optimizer
        _assert_weights_close(
            [keras.ops.convert_to_numpy(v) for v in base._model_variables_moving_average], averages[-1]
        )
        trajectories[rho] = recorder.steps
    # rho=0.3 trained another trajectory than plain SGD (rho=0).
    assert not np.allclose(trajectories[0.3][-1][0], trajectories[0.0][-1][0], rtol=1e-3, atol=1e-4)


def test_swap_ema_weights_under_mixed_precision():
    """Under `mixed_float16`, `compile` wraps the SAM optimizer in a
    LossScaleOptimizer, and SwapEMAWeights unwraps one level only: it finds
    the SAM optimizer, which lends it the base optimizer's EMA variables
    (`_wrapper.ForwardingOptimizer`). Same run as the plain model's (whose
    LossScaleOptimizer wraps the base optimizer directly)."""
    keras.config.set_dtype_policy("mixed_float16")
    epochs = 2
    runs = _both(
        _ema_sgd,
        lambda kind: [_Recorder(), keras.callbacks.SwapEMAWeights(swap_on_epoch=True)],
        epochs=epochs,
    )
    history, weights, model, callbacks = runs["sam"]
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(model.optimizer.inner_optimizer, keras_ssam.SAM)
    # The forward pass is float16: the validation losses are checked against
    # the float64 reference to float16's precision; the weights (float32
    # variables, float32 EMA) tightly.
    _check_ema_run(history, weights, callbacks[0], epochs, val_loss_rtol=5e-3)


# ---------------------------------------------------------------------------
# Learning-rate callbacks.
# ---------------------------------------------------------------------------


def test_learning_rate_scheduler():
    """LearningRateScheduler sets the base optimizer's learning rate through
    `SAM.learning_rate`: the logged rates are the schedule's, and training
    with them equals the plain model's."""
    schedule = lambda epoch, lr: 0.2 * 0.5**epoch  # noqa: E731
    runs = _both(
        lambda: keras.optimizers.SGD(0.7),
        lambda kind: [keras.callbacks.LearningRateScheduler(schedule)],
        epochs=3,
        validation=False,
    )
    history, _, model, _ = runs["sam"]
    np.testing.assert_allclose(history["learning_rate"], [0.2, 0.1, 0.05], rtol=RTOL)
    base = model.optimizer.base_optimizer
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(base.learning_rate)), 0.05, rtol=RTOL)
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)), 0.05, rtol=RTOL)


def test_reduce_lr_on_plateau():
    """ReduceLROnPlateau halves the base optimizer's learning rate during
    the run (a `min_delta` no epoch can meet: every epoch after the first is
    a plateau), with the same results as the plain model."""
    runs = _both(
        lambda: keras.optimizers.SGD(0.1, momentum=0.5),
        lambda kind: [keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=1, min_delta=100.0)],
        epochs=3,
        validation=False,
    )
    history, _, model, _ = runs["sam"]
    # Logged before the epoch's reduction.
    np.testing.assert_allclose(history["learning_rate"], [0.1, 0.1, 0.05], rtol=RTOL)
    base = model.optimizer.base_optimizer
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(base.learning_rate)), 0.025, rtol=RTOL)


# ---------------------------------------------------------------------------
# TensorBoard.
# ---------------------------------------------------------------------------


def _read_events(log_dir):
    """{tag: [(step, value as float64 array), ...]} of the scalar and
    histogram summaries of every event file under `log_dir`, in order (not
    the model's config, which names the model's class)."""
    import tensorflow as tf

    events = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name not in ("scalars", "histograms"):
                    continue
                array = np.asarray(tf.make_ndarray(value.tensor), np.float64)
                events.setdefault(value.tag, []).append((event.step, array))
    return events


def test_tensorboard(tmp_path):
    """TensorBoard with weight histograms and learning-rate logging (it reads
    the rate from `inner_optimizer`, as for a LossScaleOptimizer): the event
    files hold the schedule's rates and the same scalars and histograms as
    the plain model's."""
    # Keras's TensorBoard callback writes through tf.summary, whose
    # implementation is the `tensorboard` package (TensorFlow >= 2.20 no
    # longer installs it).
    pytest.importorskip("tensorboard", reason="Keras's TensorBoard callback needs the `tensorboard` package")
    pytest.importorskip("tensorflow", reason="Keras's TensorBoard callback writes with tf.summary")
    schedule = lambda epoch, lr: 0.05 * 0.5**epoch  # noqa: E731
    epochs = 2
    runs = _both(
        lambda: keras.optimizers.SGD(0.3),
        lambda kind: [
            keras.callbacks.LearningRateScheduler(schedule),
            keras.callbacks.TensorBoard(log_dir=str(tmp_path / kind), histogram_freq=1),
        ],
        epochs=epochs,
    )
    logs = {}
    for kind in runs:
        assert glob.glob(str(tmp_path / kind / "train" / "events.out.tfevents.*"))
        assert glob.glob(str(tmp_path / kind / "validation" / "events.out.tfevents.*"))
        logs[kind] = (_read_events(str(tmp_path / kind / "train")), _read_events(str(tmp_path / kind / "validation")))
    train, validation = logs["sam"]
    rates = [float(v) for _, v in train["epoch_learning_rate"]]
    np.testing.assert_allclose(rates, [schedule(e, None) for e in range(epochs)], rtol=RTOL)
    np.testing.assert_allclose([float(v) for _, v in train["epoch_loss"]], runs["sam"][0]["loss"], rtol=RTOL)
    # One histogram per weight and epoch, tagged by the weight's path
    # ("mlp/hidden/kernel/histogram", Keras 3.15) or name
    # ("kernel/histogram", Keras 3.12): per epoch, histograms over 20, 5, 5
    # and 1 values (the bucket counts add up to each weight's size).
    histograms = [(tag, step, value) for tag, values in train.items() for step, value in values
                  if tag.endswith("/histogram")]
    assert all(tag.endswith(("kernel/histogram", "bias/histogram")) for tag, _, _ in histograms)
    for epoch in range(epochs):
        sizes = sorted(float(value[:, 2].sum()) for _, step, value in histograms if step == epoch)
        assert sizes == [1.0, 5.0, 5.0, 20.0]
    # Same scalars and histograms as the plain model's.
    for ours, theirs in zip(logs["sam"], logs["plain"]):
        assert sorted(ours) == sorted(theirs)
        for tag in ours:
            assert [s for s, _ in ours[tag]] == [s for s, _ in theirs[tag]], tag
            for (_, a), (_, b) in zip(ours[tag], theirs[tag]):
                np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=tag)


# ---------------------------------------------------------------------------
# BackupAndRestore.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0.0, 0.2])
def test_backup_and_restore_resumes_a_crashed_run(tmp_path, rho):
    """A run that crashes in the middle of epoch 1 (after a partial epoch
    changed the weights and the optimizer state), resumed by a fresh model
    with the same backup directory, ends with the weights and History of an
    uninterrupted run: the backup restored the weights, the base
    optimizer's state (Adam's moments, the iteration count) and the epoch.
    With rho=0 that also equals the plain model's uninterrupted run."""
    epochs = 3
    base = lambda: keras.optimizers.Adam(0.05)  # noqa: E731

    def run(kind, callbacks):
        keras.utils.set_random_seed(7)
        model = _compiled(kind, base(), rho=rho)
        return model, _fit(model, callbacks, epochs=epochs, validation=False)

    reference, reference_history = run("sam", [])
    reference_weights = _weights(reference)

    backup_dir = str(tmp_path / "backup")
    with pytest.raises(_Crash):
        run("sam", [keras.callbacks.BackupAndRestore(backup_dir), _CrashAt(epoch=1, batch=2)])
    assert os.path.exists(os.path.join(backup_dir, "training_metadata.json"))

    resumed, resumed_history = run("sam", [keras.callbacks.BackupAndRestore(backup_dir)])
    # The resumed fit ran epochs 1 and 2 only.
    assert all(len(v) == epochs - 1 for v in resumed_history.values())
    _assert_same_run(
        {k: v[1:] for k, v in reference_history.items()}, reference_weights, resumed_history, _weights(resumed)
    )
    assert int(keras.ops.convert_to_numpy(resumed.optimizer.iterations)) == epochs * N_TRAIN // BATCH
    for a, b in zip(reference.optimizer.variables, resumed.optimizer.variables):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(b), keras.ops.convert_to_numpy(a), rtol=RTOL, atol=ATOL)

    if rho == 0.0:
        plain, plain_history = run("plain", [])
        _assert_same_run(
            {k: v[1:] for k, v in plain_history.items()}, _weights(plain), resumed_history, _weights(resumed)
        )


# ---------------------------------------------------------------------------
# ModelCheckpoint.
# ---------------------------------------------------------------------------


def test_model_checkpoint(tmp_path):
    """ModelCheckpoint: the best epoch's weights (save_best_only,
    save_weights_only) and the whole model (SAMModel, its SAM optimizer and
    the base optimizer's state) load back to what was recorded."""
    epochs = 3

    def callbacks(kind):
        return [
            _Recorder(),
            keras.callbacks.ModelCheckpoint(
                str(tmp_path / f"{kind}_best.weights.h5"),
                monitor="val_loss",
                save_best_only=True,
                save_weights_only=True,
            ),
            keras.callbacks.ModelCheckpoint(str(tmp_path / f"{kind}_last.keras")),
        ]

    runs = _both(lambda: keras.optimizers.SGD(0.1, momentum=0.5), callbacks, epochs=epochs, anti_validation=True)
    for kind, (history, weights, model, cbs) in runs.items():
        recorder = cbs[0]
        best = int(np.argmin(history["val_loss"]))
        assert best < epochs - 1, "the best epoch must not be the last for this test to mean anything"

        fresh = _compiled(kind, keras.optimizers.SGD(0.1, momentum=0.5))
        # The file holds the optimizer's variables too: build it to take them.
        fresh.optimizer.build(fresh.trainable_variables)
        fresh.load_weights(str(tmp_path / f"{kind}_best.weights.h5"))
        _assert_weights_close(_weights(fresh), recorder.epochs[best], rtol=0, atol=0)

        loaded = keras.saving.load_model(str(tmp_path / f"{kind}_last.keras"))
        assert type(loaded) is type(model)
        if kind == "sam":
            assert isinstance(loaded.optimizer, keras_ssam.SAM)
            assert isinstance(loaded.optimizer.inner_optimizer, keras.optimizers.SGD)
            assert loaded.optimizer.rho == 0.0
        _assert_weights_close(_weights(loaded), weights, rtol=0, atol=0)
        assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
        for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(b), keras.ops.convert_to_numpy(a))
        assert int(keras.ops.convert_to_numpy(loaded.optimizer.iterations)) == epochs * N_TRAIN // BATCH


# ---------------------------------------------------------------------------
# EarlyStopping.
# ---------------------------------------------------------------------------


def test_early_stopping_restores_best_weights():
    """EarlyStopping(restore_best_weights=True) stops the run early and puts
    back the best epoch's weights (as recorded at that epoch's end), as for
    the plain model."""
    epochs = 10
    runs = _both(
        lambda: keras.optimizers.SGD(0.1, momentum=0.5),
        lambda kind: [
            _Recorder(),
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True),
        ],
        epochs=epochs,
        anti_validation=True,
    )
    history, weights, _, callbacks = runs["sam"]
    ran = len(history["loss"])
    assert ran < epochs
    best = int(np.argmin(history["val_loss"]))
    assert best < ran - 1
    _assert_weights_close(weights, callbacks[0].epochs[best], rtol=0, atol=0)

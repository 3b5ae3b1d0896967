"""Step decisions made on the host (keras_ssam/host_dispatch.py), on every backend.

1. Host dispatch is on where the decision is a function of the iteration
   (sam_probability draws, LookSAM, EveryK, LatePhase, callables) and off
   where it needs the device (AdaptiveSteps, steps_per_execution > 1,
   mixed_float16's LossScaleOptimizer).
2. Its trajectory equals the compiled conditional's (the same steps run the
   perturbed pass: `sam_step_fraction` against the NumPy pattern).
3. The host counter stays in step with `iterations` across fit calls,
   train_on_batch, a changed initial_epoch, save / load_model, an
   interrupted fit, and BackupAndRestore after a crash.
4. The compiled steps hold no conditional (JAX: the jaxpr; TensorFlow: the
   graph's If ops) and read nothing from the device (torch: `Tensor.item` and
   `__bool__` raise during the step); each is traced once.
"""

import os

import keras
import numpy as np
import pytest
from conftest import BACKEND
from efficient_reference import step_draws

import keras_ssam
from keras_ssam import host_dispatch

N, D_IN, D_OUT, BATCH = 32, 3, 2, 4  # 8 full batches an epoch


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(N, D_IN)).astype("float32"), rng.normal(size=(N, D_OUT)).astype("float32")


def _model(optimizer, diagnostics=True, **compile_kwargs):
    keras.utils.set_random_seed(7)
    inner = keras.Sequential(
        [keras.Input((D_IN,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(D_OUT)]
    )
    model = keras_ssam.SAMModel(inner, diagnostics=diagnostics)
    model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    return model


def _weights(model):
    return [np.array(w) for w in model.get_weights()]


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
    # Two compiled programs round float32 differently (XLA fuses a branch of a
    # conditional and a straight-line step differently): 34 steps of O(1)
    # weights agree to ~1e-7.
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)


class _Conditional:
    """Turns host dispatch off (the compiled conditional), for comparison."""

    def __enter__(self):
        self.applies = host_dispatch.applies
        host_dispatch.applies = lambda *args: False

    def __exit__(self, *exc):
        host_dispatch.applies = self.applies


# The decision patterns, as functions of the iteration (NumPy).
CASES = {
    "LookSAM k=3": (lambda: keras_ssam.LookSAM(keras.optimizers.SGD(0.1), rho=0.3, k=3),
                    lambda t: t % 3 == 0),
    "SAM p=0.5": (lambda: keras_ssam.SAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.3,
                                         sam_probability=0.5, seed=11),
                  lambda t: step_draws(11, [t])[0] < 0.5),
    "SSAM EveryK(4, 1)": (lambda: keras_ssam.SSAM(keras.optimizers.SGD(0.1), rho=0.5,
                                                  sam_probability=keras_ssam.schedules.EveryK(4, 1)),
                          lambda t: t % 4 == 1),
    "SAM LatePhase(12)": (lambda: keras_ssam.SAM(keras.optimizers.SGD(0.1), rho=0.3,
                                                 sam_probability=keras_ssam.schedules.LatePhase(12)),
                          lambda t: t >= 12),
}


def _epoch_fractions(pattern, epochs, steps=N // BATCH, start=0):
    return [np.mean([pattern(start + e * steps + s) for s in range(steps)]) for e in range(epochs)]


@pytest.mark.parametrize("case", list(CASES))
def test_host_dispatch_equals_the_conditional_and_the_pattern(case):
    """Two fit calls (3 + 1 epochs) and two train_on_batch steps: the same
    weights as the compiled conditional, and the perturbed pass on exactly
    the steps of the NumPy pattern."""
    make, pattern = CASES[case]
    x, y = _data()
    results = []
    for conditional in (False, True):
        model = _model(make())
        if conditional:
            with _Conditional():
                h1 = model.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0).history
                h2 = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0).history
                model.train_on_batch(x[:BATCH], y[:BATCH])
                model.train_on_batch(x[BATCH:2 * BATCH], y[BATCH:2 * BATCH])
            assert not isinstance(model.train_function, host_dispatch.HostDispatch)
        else:
            h1 = model.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0).history
            h2 = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0).history
            model.train_on_batch(x[:BATCH], y[:BATCH])
            model.train_on_batch(x[BATCH:2 * BATCH], y[BATCH:2 * BATCH])
            assert isinstance(model.train_function, host_dispatch.HostDispatch)
            assert model.train_function.iteration == 34
        assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 34
        results.append((_weights(model), h1["sam_step_fraction"] + h2["sam_step_fraction"], h1["loss"]))
    (w_host, f_host, l_host), (w_cond, f_cond, l_cond) = results
    want = _epoch_fractions(pattern, 4)
    np.testing.assert_allclose(f_host, want)
    np.testing.assert_allclose(f_cond, want)
    assert 0 < np.mean(want) < 1, "setup: the pattern mixes both kinds of step"
    _assert_same(w_host, w_cond)
    np.testing.assert_allclose(l_host, l_cond, rtol=1e-6)


def test_dispatch_applies_only_where_the_decision_is_known_on_the_host():
    sgd = keras.optimizers.SGD

    def dispatched(optimizer, **compile_kwargs):
        model = _model(optimizer, **compile_kwargs)
        x, y = _data()
        model.fit(x[:8], y[:8], batch_size=BATCH, epochs=1, verbose=0)
        return isinstance(model.train_function, host_dispatch.HostDispatch)

    assert dispatched(keras_ssam.LookSAM(sgd(0.1), k=2))
    assert dispatched(keras_ssam.SAM(sgd(0.1), sam_probability=0.5))
    assert dispatched(keras_ssam.SAM(sgd(0.1), sam_probability=lambda it: it % 2 == 0))
    # Constant decisions need no dispatch: the step holds no conditional.
    assert not dispatched(keras_ssam.SAM(sgd(0.1)))
    assert not dispatched(keras_ssam.SAM(sgd(0.1), sam_probability=0.0))
    # The decision needs the gradient.
    assert not dispatched(keras_ssam.SSAM(sgd(0.1), sam_probability=keras_ssam.schedules.AdaptiveSteps(10)))
    if BACKEND != "torch":  # torch needs steps_per_execution == 1
        assert not dispatched(keras_ssam.LookSAM(sgd(0.1), k=2), steps_per_execution=2)
    keras.config.set_dtype_policy("mixed_float16")
    try:
        # A LossScaleOptimizer's skipped overflow steps do not advance iterations.
        assert not dispatched(keras_ssam.LookSAM(sgd(0.1), k=2))
    finally:
        keras.config.set_dtype_policy("float32")


def _run_epochs(make, x, y, epochs):
    model = _model(make())
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
    return model


@pytest.mark.parametrize("case", ["LookSAM k=3", "SAM p=0.5"])
def test_counter_follows_initial_epoch_and_load_model(case, tmp_path):
    """fit(2 epochs), fit(epochs=4, initial_epoch=2) and a save / load_model
    after the first two epochs both continue the uninterrupted 4 epochs."""
    make, _ = CASES[case]
    x, y = _data()
    want = _weights(_run_epochs(make, x, y, 4))
    model = _run_epochs(make, x, y, 2)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    model.fit(x, y, batch_size=BATCH, epochs=4, initial_epoch=2, shuffle=False, verbose=0)
    _assert_same(_weights(model), want)
    loaded = keras.models.load_model(path)
    loaded.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    assert isinstance(loaded.train_function, host_dispatch.HostDispatch)
    _assert_same(_weights(loaded), want)


class _Crash(keras.callbacks.Callback):
    def __init__(self, at_batch):
        super().__init__()
        self.at_batch = at_batch
        self.seen = 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.at_batch:
            raise RuntimeError("crash")


@pytest.mark.parametrize("case", ["LookSAM k=3", "SAM p=0.5"])
def test_counter_survives_an_interrupted_fit_and_backup_and_restore(case, tmp_path):
    """A fit interrupted at batch 11 (epoch 2), then fit again: the counter
    is read from iterations (11 steps taken), as the conditional would. And
    BackupAndRestore after a crash at batch 13 (epoch 2, step 5) restores
    the end of epoch 1 (iterations 8) and continues to the uninterrupted
    run."""
    make, _ = CASES[case]
    x, y = _data()
    results = []
    for conditional in (False, True):
        model = _model(make())
        with pytest.raises(RuntimeError, match="crash"):
            if conditional:
                with _Conditional():
                    model.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0, callbacks=[_Crash(11)])
            else:
                model.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0, callbacks=[_Crash(11)])
        assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 11
        if conditional:
            with _Conditional():
                model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        else:
            model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        results.append(_weights(model))
    _assert_same(results[0], results[1])

    want = _weights(_run_epochs(make, x, y, 3))
    backup = os.path.join(tmp_path, "backup")
    model = _model(make())
    with pytest.raises(RuntimeError, match="crash"):
        model.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0,
                  callbacks=[keras.callbacks.BackupAndRestore(backup), _Crash(13)])
    model = _model(make())
    model.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0,
              callbacks=[keras.callbacks.BackupAndRestore(backup)])
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 24
    _assert_same(_weights(model), want)


def test_no_retracing_after_the_first_epoch():
    """Four epochs of LookSAM(k=3): the step with and the step without the
    perturbed pass are each traced in the first epoch (TensorFlow traces a
    function twice when its first trace creates variables) and never after
    (TensorFlow, JAX); torch runs eagerly: every step calls the Python step
    with its decision."""
    calls = []

    class Counted(keras_ssam.SAMModel):
        def train_step(self, *args):
            calls.append(self.forced_step_decision)
            return super().train_step(*args)

    class Epochs(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            per_epoch.append(len(calls))

    per_epoch = []

    keras.utils.set_random_seed(7)
    inner = keras.Sequential([keras.Input((D_IN,)), keras.layers.Dense(D_OUT)])
    model = Counted(inner)
    model.compile(optimizer=keras_ssam.LookSAM(keras.optimizers.SGD(0.1), k=3), loss="mse")
    x, y = _data()
    model.fit(x, y, batch_size=BATCH, epochs=4, shuffle=False, verbose=0, callbacks=[Epochs()])
    if BACKEND == "torch":
        assert calls == [t % 3 == 0 for t in range(32)]
    else:
        assert set(calls) == {False, True}, calls
        assert per_epoch[1:] == [per_epoch[0]] * 3, per_epoch


def _contains_cond(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("cond", "switch"):
            return True
        for sub in eqn.params.values():
            inner = getattr(sub, "jaxpr", None)
            if inner is not None and _contains_cond(getattr(inner, "jaxpr", inner)):
                return True
    return False


@pytest.mark.skipif(BACKEND == "torch", reason="torch has no traced graph: see the no-device-read test")
def test_compiled_steps_hold_no_conditional():
    """The traced step of each decision holds no conditional; the fallback's
    (host dispatch off) does, so this test can fail."""
    x, y = _data()
    model = _model(keras_ssam.LookSAM(keras.optimizers.SGD(0.1), k=3))
    model.fit(x[:8], y[:8], batch_size=BATCH, epochs=1, verbose=0)  # builds everything
    data = (keras.ops.convert_to_tensor(x[:BATCH]), keras.ops.convert_to_tensor(y[:BATCH]))
    found = {}
    for decision in (True, False, None):
        step = host_dispatch.decided_step(model, decision) if decision is not None else model.train_step
        if BACKEND == "jax":
            import jax

            state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                         optimizer_variables=True, metrics_variables=True)
            jaxpr = jax.make_jaxpr(step)(state, data)
            found[decision] = _contains_cond(jaxpr.jaxpr)
        else:
            import tensorflow as tf

            graph = tf.function(step).get_concrete_function(data).graph
            ops_ = {op.type for op in graph.get_operations()}
            found[decision] = bool(ops_ & {"If", "StatelessIf", "Case", "StatelessCase"})
    assert found == {True: False, False: False, None: True}, found


@pytest.mark.skipif(BACKEND != "torch", reason="torch: the step's host reads are Python calls on tensors")
def test_torch_step_reads_nothing_from_the_device(monkeypatch):
    """Tensor.item and Tensor.__bool__ raise during host-dispatched LookSAM
    and sam_probability steps; with the conditional (a Python `if` on the
    decision tensor) they are called, so this test can fail."""
    import torch

    x, y = _data()
    reads = []

    class Guard(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            monkeypatch.setattr(torch.Tensor, "item", _refuse("item", reads))
            monkeypatch.setattr(torch.Tensor, "__bool__", _refuse("__bool__", reads))

        def on_train_batch_end(self, batch, logs=None):
            monkeypatch.undo()

    for make in (CASES["LookSAM k=3"][0], CASES["SAM p=0.5"][0]):
        model = _model(make(), diagnostics=False)
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[Guard()])
        assert isinstance(model.train_function, host_dispatch.HostDispatch)
    assert reads == []
    model = _model(CASES["LookSAM k=3"][0](), diagnostics=False)
    with _Conditional(), pytest.raises(RuntimeError, match="device read"):
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[Guard()])


def _refuse(name, reads):
    def method(self, *args, **kwargs):
        reads.append(name)
        raise RuntimeError(f"device read: Tensor.{name} in the step")

    return method


def _jax_on_gpu():
    if BACKEND != "jax":
        return False
    import jax

    return jax.default_backend() != "cpu"


@pytest.mark.skipif(not _jax_on_gpu(), reason="needs JAX on a GPU: on the CPU host and device memory are one, "
                    "and jax.transfer_guard does not fire (scripts/gpu_check.sh runs this)")
def test_jax_gpu_step_transfers_nothing_to_the_host():
    """Each host-dispatched LookSAM step runs under
    `jax.transfer_guard_device_to_host("disallow")`."""
    import jax

    x, y = _data()
    model = _model(CASES["LookSAM k=3"][0](), diagnostics=False)
    model.fit(x[:8], y[:8], batch_size=BATCH, epochs=1, verbose=0)
    dispatch = model.train_function
    assert isinstance(dispatch, host_dispatch.HostDispatch)

    def guarded(fn):
        def run(*args):
            with jax.transfer_guard_device_to_host("disallow"):
                return fn(*args)

        return run

    dispatch.functions = {k: guarded(f) for k, f in dispatch.functions.items()}
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)

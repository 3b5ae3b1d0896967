"""A Keras configuration (`configs.KERAS_CONFIGS`) under test: its own copy
of the model, compiled with its optimizer, trained with `fit` one block of
steps at a time and timed per step by a callback, plus best-effort
introspection of Keras's train function (trace count, JAX jit cache, TF
tracing count, XLA memory analysis).

Step timing: wall time from `on_train_batch_begin` to `on_train_batch_end`.
A callback that overrides `on_train_batch_end` turns off Keras's asynchronous
dispatch, and Keras hands it logs already converted to Python floats
(`pythonify_logs`), which waits for the step's result on every backend: a
per-batch time is the step's real duration, input fetching included. Each
`fit` call reuses the compiled train function.

Measured SAM steps (`configs.MEASURED_SAM_STEPS`, whose perturbed steps
depend on the data): their SAMModel logs `sam_step_fraction`, the running
mean over the fit call's steps; the timer keeps the last step's logs, so
after a block `sam_steps_per_block` holds that block's count.

Tracing: `train_step` is wrapped by a counter (in a subclass of the model's
class made for that model: host dispatch compiles the class's `train_step`).
On TensorFlow and JAX it runs once per trace of the train function (a
host-dispatched model has two: with and without the perturbed pass, each
traced at its first use), so the counts after the warm-up epoch and at the
end of the run must be equal (no retracing); on torch it runs eagerly once
per step and the count means nothing, except under `jit_compile=True`
(torch.compile), where the graphs dynamo compiles are counted instead
(`graphs`, per block: its counter is per process).

Compile options: `configs.compile_options(name)` (the `_jit` twins:
`jit_compile=True`).
"""

import time

from .configs import KERAS_CONFIGS, LEARNING_RATE, MEASURED_SAM_STEPS, MOMENTUM, compile_options
from .memory import xla_stats


class KerasConfig:
    """One Keras configuration: its own model copy, compiled, timed with fit."""

    kind = "keras"

    def __init__(self, name, template, x, y, batch_size, total_steps):
        import keras

        import keras_ssam

        self.name = name
        self.x, self.y, self.batch_size = x, y, batch_size
        inner = keras.models.clone_model(template)
        inner.set_weights(template.get_weights())
        base = keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM)
        if name not in KERAS_CONFIGS:
            raise ValueError(f"unknown Keras config {name!r}")
        # total_steps: what this process will train (AdaptiveSteps' schedule length).
        model, optimizer = KERAS_CONFIGS[name](inner, base, keras_ssam, total_steps)
        options = compile_options(name)
        # torch.compile (jit_compile=True on torch): dynamo keeps at most
        # `recompile_limit` (8) graphs per code object, and every configuration's
        # Keras train function runs the same code, so a process holding several
        # compiled configurations would fall back to eager after the 8th graph
        # (a user's process holds one model). Raised here, and the graphs each
        # configuration compiles are counted per block (`graphs`). For the same
        # reason dynamo would see the same code with the MLP's and the ResNet's
        # shapes and recompile it with symbolic shapes, which inductor failed to
        # lower for the ResNet's strided convolutions on CPU (torch 2.13): each
        # shape gets its own static graph instead, as in a one-model process.
        self.graphs = None
        if options.get("jit_compile") and keras.backend.backend() == "torch":
            import torch._dynamo

            for key in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, key):
                    setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key), 256))
            torch._dynamo.config.automatic_dynamic_shapes = False
            self.graphs = 0
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            **options,
        )
        self.model = model
        self.traces = 0
        model.__class__ = _counting_class(type(model), self)
        self.timer = make_step_timer()
        # Steps of each block (warm-up included) that ran the perturbed pass, as
        # logged by the diagnostics (MEASURED_SAM_STEPS only).
        self.sam_steps_per_block = [] if name in MEASURED_SAM_STEPS else None

    def run_block(self, steps):
        self.timer.times = []
        self.timer.last_logs = {}
        graphs_before = _dynamo_graphs() if self.graphs is not None else None
        self.model.fit(
            self.x[: steps * self.batch_size],
            self.y[: steps * self.batch_size],
            batch_size=self.batch_size,
            epochs=1,
            steps_per_epoch=steps,
            shuffle=False,
            verbose=0,
            callbacks=[self.timer],
        )
        if graphs_before is not None:
            self.graphs += _dynamo_graphs() - graphs_before
        if self.sam_steps_per_block is not None:
            fraction = self.timer.last_logs.get("sam_step_fraction")
            self.sam_steps_per_block.append(None if fraction is None else int(round(fraction * steps)))
        return list(self.timer.times)

    def _jitted_train_step(self):
        """The `jax.jit` object inside Keras's JAX train function, or None."""
        fn = getattr(self.model, "train_function", None)
        cells = getattr(fn, "__closure__", None) or ()
        return next((c.cell_contents for c in cells if hasattr(c.cell_contents, "lower")), None)

    def jit_cache_size(self):
        """Compiled entries in that jit's cache (a cross-check of the trace count)."""
        jitted = self._jitted_train_step()
        try:
            return int(jitted._cache_size())
        except Exception:  # noqa: BLE001 - private API, best effort
            return None

    def tf_tracing_counts(self):
        """`experimental_get_tracing_count()` of the tf.functions inside Keras's
        TensorFlow train function (a cross-check of the trace count)."""
        fn = getattr(self.model, "train_function", None)
        counts = {}
        for name, cell in zip(getattr(fn, "__code__", None) and fn.__code__.co_freevars or (),
                              getattr(fn, "__closure__", None) or ()):
            try:
                counts[name] = int(cell.cell_contents.experimental_get_tracing_count())
            except Exception:  # noqa: BLE001 - not a tf.function
                continue
        return counts or None

    def xla_memory(self):
        """XLA's compiled-memory analysis of the JAX train step."""
        import jax

        jitted = self._jitted_train_step()
        if jitted is None:
            return {"error": "no jitted function found in model.train_function"}
        m = self.model

        def spec(v):
            return jax.ShapeDtypeStruct(tuple(v.shape), v.dtype)

        state = tuple(
            [spec(v.value) for v in vs]
            for vs in (m.trainable_variables, m.non_trainable_variables,
                       m.optimizer.variables, m.metrics_variables)
        )
        b = self.batch_size
        data = (spec(self.x[:b]), spec(self.y[:b]))
        return xla_stats(jitted.lower(state, data).compile())


def _counting_class(cls, config):
    """A subclass of the model's class, for this one model, whose `train_step`
    counts its calls in `config.traces`. A class rather than an instance
    attribute: SAMModel's host dispatch compiles `type(model).train_step` (and
    deletes an instance's `train_step` after compiling)."""

    def train_step(model, *args, **kwargs):
        config.traces += 1
        return super(counted, model).train_step(*args, **kwargs)

    counted = type(cls.__name__, (cls,), {"train_step": train_step, "__module__": cls.__module__})
    return counted


def _dynamo_graphs():
    """Graphs torch.compile (dynamo) has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def make_step_timer():
    """A Keras callback recording each training batch's wall time (see module doc)."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []
            self.last_logs = {}
            self._t0 = None

        def on_train_batch_begin(self, batch, logs=None):
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            # `logs` holds Python floats here: the step has finished.
            self.times.append(time.perf_counter() - self._t0)
            self.last_logs = logs or {}

    return StepTimer()

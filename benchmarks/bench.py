"""Training-step time and memory of keras_ssam against plain fit and peer SAMs.

    python benchmarks/bench.py                      # full run, all backends
    python benchmarks/bench.py --smoke              # seconds-long check (CI)
    python benchmarks/bench.py --backends jax --reps 7 --steps 20 --batch-size 128

For each Keras backend (tensorflow, jax, torch), each model (an MLP and a small
ResNet-style CNN on synthetic 32x32x3 inputs, 10 classes) and each
configuration:

    plain        keras.Model.fit with the base optimizer SGD(0.01, momentum=0.9)
    sam          SAMModel + SAM(SGD, rho=0.05)
    ssam         SAMModel + SSAM(SGD, rho=0.05)
    ssam_adapt   SAMModel + SSAM(SGD, rho=0.5, adaptive=True, eta=0.01)
    ssam_split2  SAMModel(num_batch_splits=2) + SSAM(SGD, rho=0.05)
    peer_plain   the same model, plain SGD in the peer's own training loop
    peer_sam     the same model, the peer's SAM (rho=0.05) in that loop

Peers: on JAX an `optax.contrib.sam` loop (opaque mode, sync_period=2: one
call to `update` does the ascent and the descent, the loop documented in
optax's source), jitted with donated state, against a plain `optax.sgd` loop
in the same style; both call the Keras model as a pure function
(`stateless_call`), so the network is literally the same. On torch a
`pytorch_optimizer.SAM` loop (first_step / second_step, BatchNorm running
statistics frozen on the second pass as that library's utilities do) against
a plain `torch.optim.SGD` loop, on the same architecture written in
`torch.nn`. TensorFlow has no peer here.

Timing. Keras picks its backend at import, so the parent spawns one child
process per backend (KERAS_BACKEND set). In a child, every configuration is
built from the same initial weights and warmed up with one epoch of `--steps`
steps (tracing, XLA compilation, the first epoch: excluded). Then
`for rep in range(reps): for config in configs (rotated each rep): run one
block of --steps steps`, so slow phases of a shared machine hit every
configuration alike. Keras steps are timed with a callback: wall time from
`on_train_batch_begin` to `on_train_batch_end`. Keras hands
`on_train_batch_end` logs already converted to Python floats (a callback that
overrides it turns off asynchronous dispatch, and the logs go through
`pythonify_logs`), which waits for the step's result on every backend, so a
per-batch time is the step's real duration, input fetching included. Peer
steps are timed the same way: from before converting the numpy batch to after
reading the loss back as a Python float. Reported: the median of all timed
steps, and the min and max over repetitions of the per-repetition medians.
Ratios (e.g. sam/plain) are the median over repetitions of the ratio of the two
configurations' per-repetition medians; min-max over repetitions alongside.

Tracing. Each Keras model's `train_step` is wrapped by a counter: on
TensorFlow and JAX it runs once per trace of the train function, so the count
after the warm-up epoch and at the end of the run must be equal (no
retracing). On torch `train_step` runs eagerly once per step; the count is
reported but means nothing. The JAX peer's step counts its traces the same way.

Memory (CPU). tracemalloc does not see native tensor buffers, so memory is
measured from the process's resident set: with `--memory fresh` (the default)
each (backend, model, config) runs in a fresh child with glibc's mmap
threshold fixed at 64 KiB (`MALLOC_MMAP_THRESHOLD_=65536`, so large buffers
are returned to the OS when freed and the RSS follows the live tensors). The
child builds and compiles the model, runs the warm-up epoch, then resets the
kernel's RSS high-water mark (`echo 5 > /proc/self/clear_refs`), runs one
block of steps and reads `VmHWM`. `step_peak_mib` = high-water mark minus the
RSS at the reset: the transient memory of a steady-state training step
(activations, gradients, SAM's perturbed weights and gradients, the batch),
without the one-off compilation. `fit_persistent_mib` = RSS at the reset minus
RSS before the first fit (optimizer slots, compiled code, caches). The SAM
extra is `step_peak(sam) - step_peak(plain)`, also in units of the trainable
weights' bytes. It is an estimate at page granularity, with allocator and
runtime noise of a few MiB. On JAX the child also records XLA's own
compiled-memory analysis of the train step (argument, output, alias and temp
bytes), which is exact for what XLA allocates. On a GPU the device allocator's
peak is recorded too. `--memory inline` (the default with `--smoke`) takes the
same readings inside the timing child, where the configurations share a
process and allocator: rough. `--memory off` skips memory.

Threads. Every backend uses all CPUs by default. `--cpus N` starts the
children with their CPU affinity set to N CPUs (and OMP_NUM_THREADS=N); the
TensorFlow, XLA and OpenMP (torch) thread pools follow the affinity mask. On a
machine shared with other work, multi-threaded steps stall at thread barriers
(torch on 2 threads of an oversubscribed 2-core machine was 100x slower than
on 1): use an idle machine, or `--cpus 1`.

Outputs, in `--out` (default benchmarks/results/): `bench.json` (everything,
including the per-step times), `bench.png` (ratio bars per backend and
model) and the printed tables (`bench.txt`).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BACKENDS = ("tensorflow", "jax", "torch")
MODELS = ("mlp", "resnet")
KERAS_CONFIGS = ("plain", "sam", "ssam", "ssam_adapt", "ssam_split2")
PEER_CONFIGS = ("peer_plain", "peer_sam")
CONFIGS = KERAS_CONFIGS + PEER_CONFIGS
NUM_CLASSES = 10
INPUT_SHAPE = (32, 32, 3)
LEARNING_RATE = 0.01
MOMENTUM = 0.9
RHO = 0.05
PEERS = {"jax": "optax.contrib.sam", "torch": "pytorch_optimizer.SAM", "tensorflow": None}

# (numerator, denominator, label, {backend: target upper bound})
RATIOS = (
    ("sam", "plain", "SAM/plain", {"tensorflow": 2.10, "jax": 2.10, "torch": 2.25}),
    ("ssam", "sam", "SSAM/SAM", {"tensorflow": 1.03, "jax": 1.03, "torch": 1.03}),
    ("ssam_adapt", "sam", "adaptive SSAM/SAM", {}),
    ("ssam_split2", "ssam", "SSAM split2/SSAM", {}),
    ("peer_sam", "peer_plain", "peer SAM/plain", {}),
)
PEER_LEGEND = "peer SAM/plain (JAX: optax, torch: pytorch_optimizer)"
# RSS is page-granular with MiB-scale allocator noise: its SAM-extra verdict is
# only given for models whose weights are at least this large.
RSS_VERDICT_MIN_WEIGHT_MIB = 4.0
MEMORY_TARGET_WEIGHTS = 2.0  # SAM step peak - plain step peak <= ~2x weight bytes

FULL = {"reps": 5, "steps": 10, "batch_size": 128, "mlp_width": 1024, "mlp_depth": 2,
        "resnet_width": 16, "resnet_stages": 3}
SMOKE = {"reps": 1, "steps": 2, "batch_size": 8, "mlp_width": 32, "mlp_depth": 1,
         "resnet_width": 4, "resnet_stages": 1}
SIZE_KEYS = ("mlp_width", "mlp_depth", "resnet_width", "resnet_stages")


# ----------------------------------------------------------------------------
# Process-level measurements (any backend).


def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def rss_mib():
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib / 1024.0


def hwm_mib():
    kib = _proc_status_kib("VmHWM")
    return None if kib is None else kib / 1024.0


def reset_hwm():
    """Resets the kernel's RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------
# Models and configurations (inside a child: keras is imported there).


def build_keras_model(name, sizes):
    import keras
    from keras import layers

    inputs = keras.Input(INPUT_SHAPE)
    if name == "mlp":
        x = layers.Flatten()(inputs)
        for _ in range(sizes["mlp_depth"]):
            x = layers.Dense(sizes["mlp_width"], activation="relu")(x)
    elif name == "resnet":
        width = sizes["resnet_width"]

        def conv_bn(x, filters, kernel, strides=1):
            x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False)(x)
            return layers.BatchNormalization()(x)

        x = layers.ReLU()(conv_bn(inputs, width, 3))
        for stage in range(sizes["resnet_stages"]):
            filters = width * 2**stage
            strides = 1 if stage == 0 else 2
            y = layers.ReLU()(conv_bn(x, filters, 3, strides))
            y = conv_bn(y, filters, 3)
            shortcut = x if strides == 1 and x.shape[-1] == filters else conv_bn(x, filters, 1, strides)
            x = layers.ReLU()(layers.Add()([y, shortcut]))
        x = layers.GlobalAveragePooling2D()(x)
    else:
        raise ValueError(f"unknown model {name!r}")
    outputs = layers.Dense(NUM_CLASSES)(x)
    return keras.Model(inputs, outputs, name=name)


def build_torch_model(name, sizes):
    import torch
    from torch import nn

    if name == "mlp":
        dims = [INPUT_SHAPE[0] * INPUT_SHAPE[1] * INPUT_SHAPE[2]] + [sizes["mlp_width"]] * sizes["mlp_depth"]
        modules = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:]):
            modules += [nn.Linear(a, b), nn.ReLU()]
        modules.append(nn.Linear(dims[-1], NUM_CLASSES))
        return nn.Sequential(*modules)

    width = sizes["resnet_width"]

    def conv_bn(cin, cout, kernel, strides=1):
        # Keras BatchNormalization defaults: momentum 0.99, epsilon 1e-3.
        return nn.Sequential(
            nn.Conv2d(cin, cout, kernel, stride=strides, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01),
        )

    class Block(nn.Module):
        def __init__(self, cin, cout, strides):
            super().__init__()
            self.a = conv_bn(cin, cout, 3, strides)
            self.b = conv_bn(cout, cout, 3)
            self.shortcut = (
                nn.Identity() if strides == 1 and cin == cout else conv_bn(cin, cout, 1, strides)
            )

        def forward(self, x):
            y = self.b(torch.relu(self.a(x)))
            return torch.relu(y + self.shortcut(x))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn(INPUT_SHAPE[2], width, 3)
            blocks, cin = [], width
            for stage in range(sizes["resnet_stages"]):
                cout = width * 2**stage
                blocks.append(Block(cin, cout, 1 if stage == 0 else 2))
                cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.head = nn.Linear(cin, NUM_CLASSES)

        def forward(self, x):
            x = self.blocks(torch.relu(self.stem(x)))
            return self.head(x.mean(dim=(2, 3)))

    return ResNet()


def make_data(steps, batch_size, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    n = steps * batch_size
    x = rng.standard_normal((n,) + INPUT_SHAPE).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=(n,)).astype("int32")
    return x, y


class KerasConfig:
    """One Keras configuration: its own model copy, compiled, timed with fit."""

    kind = "keras"

    def __init__(self, name, template, x, y, batch_size):
        import keras

        import keras_ssam

        self.name = name
        self.x, self.y, self.batch_size = x, y, batch_size
        inner = keras.models.clone_model(template)
        inner.set_weights(template.get_weights())
        base = keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM)
        if name == "plain":
            model, optimizer = inner, base
        elif name == "sam":
            model, optimizer = keras_ssam.SAMModel(inner), keras_ssam.SAM(base, rho=RHO)
        elif name == "ssam":
            model, optimizer = keras_ssam.SAMModel(inner), keras_ssam.SSAM(base, rho=RHO)
        elif name == "ssam_adapt":
            model = keras_ssam.SAMModel(inner)
            optimizer = keras_ssam.SSAM(base, rho=0.5, adaptive=True, eta=0.01)
        elif name == "ssam_split2":
            model = keras_ssam.SAMModel(inner, num_batch_splits=2)
            optimizer = keras_ssam.SSAM(base, rho=RHO)
        else:
            raise ValueError(f"unknown Keras config {name!r}")
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        self.model = model
        self.traces = 0
        original = model.train_step

        def counted_train_step(*args, **kwargs):
            self.traces += 1
            return original(*args, **kwargs)

        # Instance attribute: make_train_function picks it up on first fit.
        model.train_step = counted_train_step
        self.timer = make_step_timer()

    def run_block(self, steps):
        self.timer.times = []
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
        return _xla_stats(jitted.lower(state, data).compile())


def make_step_timer():
    """A Keras callback recording each training batch's wall time (see module doc)."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []
            self._t0 = None

        def on_train_batch_begin(self, batch, logs=None):
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            # `logs` holds Python floats here: the step has finished.
            self.times.append(time.perf_counter() - self._t0)

    return StepTimer()


def _xla_stats(compiled):
    ma = compiled.memory_analysis()
    if ma is None:
        return {"error": "memory_analysis() returned None"}
    out = {
        "argument_bytes": int(ma.argument_size_in_bytes),
        "output_bytes": int(ma.output_size_in_bytes),
        "alias_bytes": int(ma.alias_size_in_bytes),
        "temp_bytes": int(ma.temp_size_in_bytes),
    }
    out["peak_estimate_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    )
    return out


class JaxPeerConfig:
    """optax loop on the Keras model used as a pure function (stateless_call)."""

    kind = "peer"

    def __init__(self, name, template, x, y, batch_size):
        import jax
        import jax.numpy as jnp
        import keras
        import optax
        import optax.contrib

        self.name = name
        self.x, self.y, self.batch_size = x, y, batch_size
        model = keras.models.clone_model(template)
        model.set_weights(template.get_weights())
        self.model = model
        self.trainable = [jnp.array(v.value) for v in model.trainable_variables]
        self.non_trainable = [jnp.array(v.value) for v in model.non_trainable_variables]
        self.traces = 0

        def loss_fn(trainable, non_trainable, xb, yb):
            logits, new_non_trainable = model.stateless_call(
                trainable, non_trainable, xb, training=True
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
            return loss, new_non_trainable

        if name == "peer_plain":
            opt = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)

            def step(trainable, non_trainable, opt_state, xb, yb):
                self.traces += 1
                (loss, new_nt), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                    trainable, non_trainable, xb, yb
                )
                updates, opt_state = opt.update(grads, opt_state, trainable)
                return optax.apply_updates(trainable, updates), new_nt, opt_state, loss

        elif name == "peer_sam":
            # The drop-in SAM of optax's docs: normalized-gradient SGD(rho) as
            # the adversarial optimizer; opaque mode runs the ascent and the
            # descent inside one `update` call, given `grad_fn`.
            opt = optax.contrib.sam(
                optax.sgd(LEARNING_RATE, momentum=MOMENTUM),
                optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
                sync_period=2,
                opaque_mode=True,
            )

            def step(trainable, non_trainable, opt_state, xb, yb):
                self.traces += 1
                (loss, new_nt), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                    trainable, non_trainable, xb, yb
                )
                # The adversarial pass reads the pre-step BatchNorm statistics
                # and its state updates are dropped.
                grad_fn = jax.grad(lambda p, _: loss_fn(p, non_trainable, xb, yb)[0])
                updates, opt_state = opt.update(grads, opt_state, trainable, grad_fn=grad_fn)
                return optax.apply_updates(trainable, updates), new_nt, opt_state, loss

        else:
            raise ValueError(f"unknown JAX peer config {name!r}")
        self.opt_state = opt.init(self.trainable)
        self.step = jax.jit(step, donate_argnums=(0, 1, 2))

    def run_block(self, steps):
        import jax.numpy as jnp

        times, b = [], self.batch_size
        for i in range(steps):
            t0 = time.perf_counter()
            xb, yb = jnp.asarray(self.x[i * b:(i + 1) * b]), jnp.asarray(self.y[i * b:(i + 1) * b])
            self.trainable, self.non_trainable, self.opt_state, loss = self.step(
                self.trainable, self.non_trainable, self.opt_state, xb, yb
            )
            float(loss)
            times.append(time.perf_counter() - t0)
        return times

    def jit_cache_size(self):
        try:
            return int(self.step._cache_size())
        except Exception:  # noqa: BLE001 - private API, best effort
            return None

    def xla_memory(self):
        b = self.batch_size
        return _xla_stats(
            self.step.lower(
                self.trainable, self.non_trainable, self.opt_state, self.x[:b], self.y[:b]
            ).compile()
        )


class TorchPeerConfig:
    """Plain PyTorch loop on the torch.nn twin of the model."""

    kind = "peer"

    def __init__(self, name, model_name, sizes, x, y, batch_size):
        import torch

        self.name = name
        self.x = x.transpose(0, 3, 1, 2).copy()  # NCHW, torch's native layout
        self.y = y.astype("int64")
        self.batch_size = batch_size
        torch.manual_seed(0)
        self.model = build_torch_model(model_name, sizes)
        self.model.train()
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.traces = None
        if name == "peer_plain":
            self.opt = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
        elif name == "peer_sam":
            import pytorch_optimizer

            self.opt = pytorch_optimizer.SAM(
                self.model.parameters(), torch.optim.SGD, rho=RHO, lr=LEARNING_RATE, momentum=MOMENTUM
            )
        else:
            raise ValueError(f"unknown torch peer config {name!r}")

    def _set_running_stats(self, enabled):
        # What pytorch_optimizer's enable/disable_running_stats do: BatchNorm
        # statistics are updated by the first pass only.
        from torch.nn.modules.batchnorm import _BatchNorm

        for module in self.model.modules():
            if isinstance(module, _BatchNorm):
                if enabled:
                    if hasattr(module, "backup_momentum"):
                        module.momentum = module.backup_momentum
                else:
                    module.backup_momentum = module.momentum
                    module.momentum = 0

    def _one_step(self, xb, yb):
        model, opt, loss_fn = self.model, self.opt, self.loss_fn
        if self.name == "peer_plain":
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            return loss
        self._set_running_stats(True)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.first_step(zero_grad=True)
        self._set_running_stats(False)
        loss_fn(model(xb), yb).backward()
        opt.second_step(zero_grad=True)
        return loss

    def run_block(self, steps):
        import torch

        times, b = [], self.batch_size
        for i in range(steps):
            t0 = time.perf_counter()
            xb = torch.from_numpy(self.x[i * b:(i + 1) * b])
            yb = torch.from_numpy(self.y[i * b:(i + 1) * b])
            loss = self._one_step(xb, yb)
            loss.item()
            times.append(time.perf_counter() - t0)
        return times


def make_config(backend, name, model_name, template, sizes, x, y, batch_size):
    if name in KERAS_CONFIGS:
        return KerasConfig(name, template, x, y, batch_size)
    if backend == "jax":
        return JaxPeerConfig(name, template, x, y, batch_size)
    if backend == "torch":
        return TorchPeerConfig(name, model_name, sizes, x, y, batch_size)
    raise ValueError(f"no peer implementation on {backend}")


def weight_info(template):
    import numpy as np

    count = sum(int(np.prod(v.shape)) for v in template.trainable_variables)
    nbytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in template.trainable_variables)
    return count, nbytes


def device_memory_reset(backend):
    try:
        if backend == "torch":
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        elif backend == "tensorflow":
            import tensorflow as tf

            if tf.config.list_physical_devices("GPU"):
                tf.config.experimental.reset_memory_stats("GPU:0")
    except Exception:  # noqa: BLE001 - best effort
        pass


def device_memory_peak(backend):
    """Accelerator allocator peak in MiB, or None on CPU."""
    try:
        if backend == "torch":
            import torch

            if torch.cuda.is_available():
                return torch.cuda.max_memory_allocated() / 2**20
        elif backend == "tensorflow":
            import tensorflow as tf

            if tf.config.list_physical_devices("GPU"):
                return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
        elif backend == "jax":
            import jax

            dev = jax.devices()[0]
            if dev.platform != "cpu":
                stats = dev.memory_stats() or {}
                if "peak_bytes_in_use" in stats:
                    # Not resettable: the process-lifetime peak.
                    return stats["peak_bytes_in_use"] / 2**20
    except Exception:  # noqa: BLE001 - best effort
        return None
    return None


def measure_memory(backend, config, steps, rss_before_fit, already_warm):
    """RSS readings around one steady-state block (see module doc)."""
    if not already_warm:
        config.run_block(steps)
    rss_reset = rss_mib()
    ok = reset_hwm()
    device_memory_reset(backend)
    config.run_block(steps)
    hwm = hwm_mib()
    out = {
        "hwm_reset_ok": ok,
        "rss_before_fit_mib": rss_before_fit,
        "rss_at_reset_mib": rss_reset,
        "hwm_steady_mib": hwm,
        "step_peak_mib": (hwm - rss_reset) if ok and hwm is not None else None,
        "fit_persistent_mib": (rss_reset - rss_before_fit) if rss_before_fit is not None else None,
        "total_peak_mib": (hwm - rss_before_fit) if ok and hwm is not None and rss_before_fit is not None else None,
        "device_peak_mib": device_memory_peak(backend),
    }
    if backend == "jax" and hasattr(config, "xla_memory"):
        try:
            out["xla"] = config.xla_memory()
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            out["xla"] = {"error": f"{type(e).__name__}: {e}"}
    return out


# ----------------------------------------------------------------------------
# Children.


def _backend_versions(backend):
    import keras

    versions = {"keras": keras.__version__, "python": platform.python_version()}
    if backend == "tensorflow":
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    elif backend == "jax":
        import jax
        import optax

        versions["jax"] = jax.__version__
        versions["optax"] = optax.__version__
        versions["jax_devices"] = [str(d) for d in jax.devices()]
    elif backend == "torch":
        import torch

        versions["torch"] = torch.__version__
        versions["torch_threads"] = torch.get_num_threads()
        try:
            import pytorch_optimizer

            versions["pytorch_optimizer"] = pytorch_optimizer.__version__
        except Exception:  # noqa: BLE001
            pass
    return versions


def _peer_available(backend):
    try:
        if backend == "jax":
            import optax.contrib  # noqa: F401

            return True, None
        if backend == "torch":
            import pytorch_optimizer  # noqa: F401

            return True, None
    except ImportError as e:
        return False, f"{e}"
    return False, "no peer SAM implementation for this backend"


def child_timing(args):
    import keras

    backend = keras.backend.backend()
    sizes = json.loads(args.sizes)
    configs = [c for c in args.configs.split(",") if c]
    peer_ok, peer_reason = _peer_available(backend)
    if not peer_ok:
        configs = [c for c in configs if c not in PEER_CONFIGS]
    result = {
        "backend": backend,
        "versions": _backend_versions(backend),
        "peer": PEERS[backend] if peer_ok else None,
        "peer_skipped_reason": peer_reason,
        "models": {},
    }
    for model_name in [m for m in args.models.split(",") if m]:
        keras.utils.set_random_seed(0)
        template = build_keras_model(model_name, sizes)
        params, nbytes = weight_info(template)
        x, y = make_data(args.steps, args.batch_size)
        cfgs, first_epoch_s = {}, {}
        for name in configs:
            cfg = make_config(backend, name, model_name, template, sizes, x, y, args.batch_size)
            t0 = time.perf_counter()
            cfg.run_block(args.steps)  # warm-up: trace, compile, first epoch
            first_epoch_s[name] = time.perf_counter() - t0
            cfgs[name] = cfg
        traces_after_warmup = {n: c.traces for n, c in cfgs.items()}
        times = {n: [] for n in cfgs}
        order = list(cfgs)
        for rep in range(args.reps):
            k = rep % len(order)
            for name in order[k:] + order[:k]:
                times[name].append(cfgs[name].run_block(args.steps))
        entry = {
            "trainable_params": params,
            "trainable_weight_bytes": nbytes,
            "configs": {},
        }
        for name, cfg in cfgs.items():
            per_rep = [statistics.median(block) for block in times[name]]
            pooled = [t for block in times[name] for t in block]
            traced = backend != "torch"  # torch: eager, train_step runs every step
            entry["configs"][name] = {
                "kind": cfg.kind,
                "step_s": {
                    "median": statistics.median(pooled),
                    "rep_median_min": min(per_rep),
                    "rep_median_max": max(per_rep),
                    "per_rep_median": per_rep,
                },
                "step_times_s": times[name],
                "first_epoch_s": first_epoch_s[name],
                "jit_compile": getattr(getattr(cfg, "model", None), "jit_compile", None)
                if cfg.kind == "keras" else (backend == "jax"),
                "traces": None if cfg.traces is None else {
                    "after_warmup": traces_after_warmup[name],
                    "end": cfg.traces,
                    "retraces_after_warmup": cfg.traces - traces_after_warmup[name],
                    "meaningful": traced,
                    "jit_cache_entries": cfg.jit_cache_size() if backend == "jax" else None,
                    "tf_function_tracing_count": cfg.tf_tracing_counts()
                    if backend == "tensorflow" else None,
                },
            }
        if args.memory == "inline":
            # Every config's model is alive here: no meaningful persistent
            # figure, only the steady-state step peak.
            for name, cfg in cfgs.items():
                entry["configs"][name]["memory"] = dict(
                    measure_memory(backend, cfg, args.steps, None, already_warm=True),
                    method="inline",
                )
        result["models"][model_name] = entry
        del cfgs
    with open(args.child_out, "w") as f:
        json.dump(result, f)


def child_memory(args):
    import keras

    backend = keras.backend.backend()
    sizes = json.loads(args.sizes)
    keras.utils.set_random_seed(0)
    template = build_keras_model(args.models, sizes)
    x, y = make_data(args.steps, args.batch_size)
    cfg = make_config(backend, args.configs, args.models, template, sizes, x, y, args.batch_size)
    rss_before = rss_mib()
    out = measure_memory(backend, cfg, args.steps, rss_before, already_warm=False)
    out["method"] = "fresh"
    with open(args.child_out, "w") as f:
        json.dump(out, f)


# ----------------------------------------------------------------------------
# Parent.


def _spawn(backend, argv, env_extra=None, cpus=None):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.update(env_extra or {})
    preexec = None
    if cpus:
        # TensorFlow, XLA and OpenMP (torch) size their thread pools from the
        # affinity mask, so this sets every backend's thread count.
        env["OMP_NUM_THREADS"] = str(len(cpus))

        def preexec():
            os.sched_setaffinity(0, cpus)

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    try:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *argv, "--child-out", path],
            env=env,
            cwd=ROOT,
            preexec_fn=preexec,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout)[-4000:]
            return None, f"exit {proc.returncode}:\n{tail}"
        with open(path) as f:
            return json.load(f), None
    finally:
        os.remove(path)


def _ratio(configs, num, den):
    if num not in configs or den not in configs:
        return None
    a = configs[num]["step_s"]["per_rep_median"]
    b = configs[den]["step_s"]["per_rep_median"]
    per_rep = [p / q for p, q in zip(a, b)]
    return {
        "median": statistics.median(per_rep),
        "min": min(per_rep),
        "max": max(per_rep),
        "per_rep": per_rep,
        "pooled_median_ratio": configs[num]["step_s"]["median"] / configs[den]["step_s"]["median"],
    }


def _memory_extra(entry, num="sam", den="plain"):
    cfgs = entry["configs"]
    out = {}
    wmib = entry["trainable_weight_bytes"] / 2**20
    for key, label in (("step_peak_mib", "rss_step_peak"), ("total_peak_mib", "rss_total_peak")):
        try:
            a = cfgs[num]["memory"][key]
            b = cfgs[den]["memory"][key]
        except (KeyError, TypeError):
            continue
        if a is not None and b is not None:
            out[f"{label}_extra_mib"] = a - b
            out[f"{label}_extra_weights"] = (a - b) / wmib if wmib else None
    try:
        xa = cfgs[num]["memory"]["xla"]["peak_estimate_bytes"]
        xb = cfgs[den]["memory"]["xla"]["peak_estimate_bytes"]
        out["xla_peak_extra_mib"] = (xa - xb) / 2**20
        out["xla_peak_extra_weights"] = (xa - xb) / entry["trainable_weight_bytes"]
    except (KeyError, TypeError):
        pass
    try:
        da = cfgs[num]["memory"]["device_peak_mib"]
        db = cfgs[den]["memory"]["device_peak_mib"]
        if da is not None and db is not None:
            out["device_peak_extra_weights"] = (da - db) / wmib
    except (KeyError, TypeError):
        pass
    return out


def _fmt_ms(s):
    return f"{1000 * s:8.2f}"


def _fmt_mib(v):
    return "     -" if v is None else f"{v:6.1f}"


def _verdict(extra_weights, meta):
    if meta["mode"] == "smoke" or extra_weights is None:
        return ""
    return " ok" if extra_weights <= MEMORY_TARGET_WEIGHTS else " MISS"


def report(results, meta):
    lines = []
    p = lines.append
    p(f"keras_ssam benchmark  ({meta['mode']}: reps={meta['reps']} steps={meta['steps']} "
      f"batch={meta['batch_size']}, memory={meta['memory']})")
    p(f"machine: {meta['machine']}, {meta['cpu_count']} CPUs (children on {meta['child_cpus']}), load average "
      f"{meta['loadavg_start']} at start, {meta['loadavg_end']} at end")
    if meta["mode"] == "smoke":
        p("SMOKE MODE: tiny models, 1 repetition; checks the script runs, the numbers mean nothing.")
    for backend, res in results.items():
        if "error" in res:
            p(f"\n=== {backend}: FAILED ===\n{res['error']}")
            continue
        p(f"\n=== {backend}  (peer: {res['peer'] or 'none'}"
          + (f"; {res['peer_skipped_reason']}" if res.get("peer_skipped_reason") and res["peer"] is None and backend != "tensorflow" else "")
          + ") ===")
        for model_name, entry in res["models"].items():
            p(f"-- {model_name}: {entry['trainable_params']:,} trainable parameters "
              f"({entry['trainable_weight_bytes'] / 2**20:.2f} MiB)")
            p(f"   {'config':<12} {'median ms':>9} {'rep min-max ms':>19} {'1st epoch s':>11} "
              f"{'traces warm/end':>15} {'step peak MiB':>13} {'persist MiB':>11} {'total MiB':>9}")
            for name, c in entry["configs"].items():
                s = c["step_s"]
                tr = c["traces"]
                if tr is None:
                    trs = "n/a"
                elif not tr["meaningful"]:
                    trs = "eager"
                else:
                    trs = f"{tr['after_warmup']}/{tr['end']}"
                mem = c.get("memory") or {}
                p(f"   {name:<12} {_fmt_ms(s['median']):>9} "
                  f"{_fmt_ms(s['rep_median_min'])}-{_fmt_ms(s['rep_median_max']).strip():<9} "
                  f"{c['first_epoch_s']:11.2f} {trs:>15} {_fmt_mib(mem.get('step_peak_mib')):>13} "
                  f"{_fmt_mib(mem.get('fit_persistent_mib')):>11} {_fmt_mib(mem.get('total_peak_mib')):>9}")
    p("\nRatios of step times: median over repetitions [min-max], then ok or MISS against the target "
      "(no verdicts in smoke mode)")
    header = f"{'backend':<11} {'model':<7}" + "".join(f" {label:>24}" for _, _, label, _ in RATIOS)
    p(header)
    for backend, res in results.items():
        if "error" in res:
            continue
        for model_name, entry in res["models"].items():
            row = f"{backend:<11} {model_name:<7}"
            for num, den, label, targets in RATIOS:
                r = entry["ratios"].get(f"{num}/{den}")
                if r is None:
                    row += f" {'-':>24}"
                    continue
                cell = f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]"
                if backend in targets and meta["mode"] != "smoke":
                    ok = "ok" if r["median"] <= targets[backend] else "MISS"
                    cell += f" {ok}<={targets[backend]:.2f}"
                row += f" {cell:>24}"
            p(row)
    if meta["memory"] == "off":
        p("\nMemory: not measured (--memory off).")
    else:
        _memory_report(p, results, meta)
    _traces_report(p, results)
    return "\n".join(lines)


def _memory_report(p, results, meta):
    p(f"\nMemory of a SAM step minus a plain step, in MiB and in trainable-weight sizes "
      f"(target <= ~{MEMORY_TARGET_WEIGHTS:.0f}x). RSS step peak: above the RSS between steps; "
      "RSS total peak: above the RSS before fit (adds optimizer slots, kept gradients, compiled code); "
      "XLA: the compiled step's buffers (exact). No RSS verdict for weights under "
      f"{RSS_VERDICT_MIN_WEIGHT_MIB:.0f} MiB: below the RSS noise.")
    for backend, res in results.items():
        if "error" in res:
            continue
        for model_name, entry in res["models"].items():
            m = entry.get("memory_sam_vs_plain") or {}
            parts = []
            rss_ok = entry["trainable_weight_bytes"] / 2**20 >= RSS_VERDICT_MIN_WEIGHT_MIB
            for label, name in (("rss_step_peak", "RSS step peak"), ("rss_total_peak", "RSS total peak")):
                if f"{label}_extra_mib" in m:
                    parts.append(f"{name} {m[f'{label}_extra_mib']:+.1f} MiB = "
                                 f"{m[f'{label}_extra_weights']:+.2f}x"
                                 + (_verdict(m[f"{label}_extra_weights"], meta) if rss_ok else ""))
            if "xla_peak_extra_mib" in m:
                parts.append(f"XLA {m['xla_peak_extra_mib']:+.2f} MiB = {m['xla_peak_extra_weights']:+.2f}x"
                             + _verdict(m["xla_peak_extra_weights"], meta))
            if "device_peak_extra_weights" in m:
                parts.append(f"device {m['device_peak_extra_weights']:+.2f}x weights")
            p(f"{backend:<11} {model_name:<7} " + ("; ".join(parts) if parts else "not measured"))


def _traces_report(p, results):
    p("\nTraces: train_step calls after the warm-up epoch / at the end; equal = no retracing "
      "(tensorflow, jax; torch runs eagerly).")
    retraced = [
        f"{b}/{m}/{n}"
        for b, res in results.items() if "error" not in res
        for m, e in res["models"].items()
        for n, c in e["configs"].items()
        if c["traces"] and c["traces"]["meaningful"] and c["traces"]["retraces_after_warmup"]
    ]
    p("retracing after warm-up: " + (", ".join(retraced) if retraced else "none"))


def plot(results, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({m for r in results.values() if "error" not in r for m in r["models"]},
                    key=lambda m: MODELS.index(m) if m in MODELS else 99)
    backends = [b for b, r in results.items() if "error" not in r]
    if not models or not backends:
        return False
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    width = 0.8 / len(RATIOS)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#7f7f7f"]
    for ax, model_name in zip(axes[0], models):
        for i, (num, den, label, targets) in enumerate(RATIOS):
            xs, ys, lo, hi = [], [], [], []
            for j, b in enumerate(backends):
                r = results[b]["models"].get(model_name, {}).get("ratios", {}).get(f"{num}/{den}")
                if r is None:
                    continue
                xs.append(j + (i - (len(RATIOS) - 1) / 2) * width)
                ys.append(r["median"])
                lo.append(r["median"] - r["min"])
                hi.append(r["max"] - r["median"])
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, color=colors[i % len(colors)],
                       label=PEER_LEGEND if num == "peer_sam" else label)
                for xv, b in zip(xs, [b for b in backends if results[b]["models"].get(model_name, {})
                                      .get("ratios", {}).get(f"{num}/{den}")]):
                    if b in targets:
                        ax.hlines(targets[b], xv - width / 2, xv + width / 2, colors="red", lw=1.5)
                for xv, yv, up in zip(xs, ys, hi):
                    ax.text(xv, yv + up, f"{yv:.2f}", ha="center", va="bottom", fontsize=6, rotation=90)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(2.0, color="k", lw=0.8, ls=":")
        ax.set_xticks(range(len(backends)))
        ax.set_xticklabels(backends)
        ax.set_title(f"{model_name}: step-time ratios (bars: median, whiskers: min-max over reps, "
                     "red: target)", fontsize=9)
        ax.set_ylabel("ratio of median step times")
    axes[0][0].legend(fontsize=7, loc="upper left")
    title = f"keras_ssam benchmark ({meta['mode']}, batch {meta['batch_size']}, {meta['machine']})"
    if meta["mode"] == "smoke":
        title += " - SMOKE: numbers meaningless"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="subset of " + ",".join(CONFIGS))
    parser.add_argument("--reps", type=int, help=f"interleaved repetitions (default {FULL['reps']})")
    parser.add_argument("--steps", type=int, help=f"steps per timed block (default {FULL['steps']})")
    parser.add_argument("--batch-size", type=int, help=f"default {FULL['batch_size']}")
    parser.add_argument("--mlp-width", type=int, help=f"default {FULL['mlp_width']}")
    parser.add_argument("--mlp-depth", type=int, help=f"default {FULL['mlp_depth']}")
    parser.add_argument("--resnet-width", type=int, help=f"default {FULL['resnet_width']}")
    parser.add_argument("--resnet-stages", type=int, help=f"default {FULL['resnet_stages']}")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--memory", choices=("fresh", "inline", "off"),
                        help="fresh child per config (default), inline (default with --smoke), or off")
    parser.add_argument("--cpus", type=int,
                        help="run the children on this many CPUs (affinity; sets every backend's "
                             "thread count); default: all")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repetition: checks the script works")
    # Internal: child processes.
    parser.add_argument("--child", choices=("timing", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child == "timing":
        return child_timing(args)
    if args.child == "memory":
        return child_memory(args)

    defaults = SMOKE if args.smoke else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.memory is None:
        args.memory = "inline" if args.smoke else "fresh"
    backends = [b for b in args.backends.split(",") if b]
    models = [m for m in args.models.split(",") if m]
    configs = [c for c in args.configs.split(",") if c]
    for kind, chosen, allowed in (("backend", backends, BACKENDS), ("model", models, MODELS),
                                  ("config", configs, CONFIGS)):
        bad = sorted(set(chosen) - set(allowed))
        if bad:
            parser.error(f"unknown {kind}(s) {bad}; choose from {allowed}")
    if "ssam_split2" in configs and args.batch_size % 2:
        parser.error("--batch-size must be even for ssam_split2 (num_batch_splits=2)")
    if args.reps < 1 or args.steps < 1:
        parser.error("--reps and --steps must be >= 1")
    sizes = {k: getattr(args, k) for k in SIZE_KEYS}
    cpus = None
    if args.cpus is not None:
        allowed = sorted(os.sched_getaffinity(0))
        if not 1 <= args.cpus <= len(allowed):
            parser.error(f"--cpus must be between 1 and {len(allowed)}")
        cpus = set(allowed[: args.cpus])

    meta = {
        "mode": "smoke" if args.smoke else "full",
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "reps": args.reps,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "sizes": sizes,
        "memory": args.memory,
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}".strip(),
        "cpu_count": os.cpu_count(),
        "child_cpus": sorted(cpus) if cpus else "all",
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "hyperparameters": {"sgd_learning_rate": LEARNING_RATE, "sgd_momentum": MOMENTUM, "rho": RHO,
                            "ssam_adapt": {"rho": 0.5, "adaptive": True, "eta": 0.01}},
        "timing_method": (
            "per-step wall time; Keras: callback on_train_batch_begin->on_train_batch_end "
            "(logs are pythonified before the callback runs, which syncs); peers: numpy batch "
            "conversion to loss read back as float. Warm-up epoch excluded. Interleaved reps, "
            "config order rotated each rep."),
        "memory_method": (
            "RSS (Linux /proc/self/status). step_peak_mib = VmHWM after one steady-state block "
            "minus VmRSS when the high-water mark was reset (clear_refs 5) after the warm-up "
            "epoch; fresh: one child process per config with MALLOC_MMAP_THRESHOLD_=65536; "
            "inline: inside the timing child (rough). JAX: XLA compiled memory_analysis too. "
            "GPU: allocator peak."),
    }
    common = ["--models", ",".join(models), "--steps", str(args.steps),
              "--batch-size", str(args.batch_size), "--sizes", json.dumps(sizes)]
    results = {}
    t_start = time.perf_counter()
    for backend in backends:
        print(f"[bench] {backend}: timing {len(configs)} configs x {len(models)} models, "
              f"{args.reps} reps x {args.steps} steps ...", flush=True)
        t0 = time.perf_counter()
        res, err = _spawn(backend, ["--child", "timing", "--configs", ",".join(configs),
                                    "--reps", str(args.reps),
                                    "--memory", "inline" if args.memory == "inline" else "off",
                                    *common], cpus=cpus)
        if err:
            print(f"[bench] {backend}: FAILED\n{err}", flush=True)
            results[backend] = {"error": err}
            continue
        print(f"[bench] {backend}: timing done in {time.perf_counter() - t0:.0f} s", flush=True)
        if args.memory == "fresh":
            for model_name in models:
                for name in res["models"][model_name]["configs"]:
                    mem, err = _spawn(
                        backend,
                        ["--child", "memory", "--configs", name,
                         "--models", model_name, *common[2:]],
                        env_extra={"MALLOC_MMAP_THRESHOLD_": "65536"},
                        cpus=cpus,
                    )
                    res["models"][model_name]["configs"][name]["memory"] = mem or {"error": err}
                    if err:
                        print(f"[bench] {backend}/{model_name}/{name}: memory child failed\n{err}", flush=True)
            print(f"[bench] {backend}: memory done", flush=True)
        for entry in res["models"].values():
            entry["ratios"] = {
                f"{num}/{den}": r
                for num, den, _, _ in RATIOS
                if (r := _ratio(entry["configs"], num, den)) is not None
            }
            entry["targets"] = {
                f"{num}/{den}": {"max": t[backend], "met": entry["ratios"][f"{num}/{den}"]["median"] <= t[backend]}
                for num, den, _, t in RATIOS
                if backend in t and f"{num}/{den}" in entry["ratios"]
            }
            entry["memory_sam_vs_plain"] = _memory_extra(entry)
            rss_ok = entry["trainable_weight_bytes"] / 2**20 >= RSS_VERDICT_MIN_WEIGHT_MIB
            for label in ("rss_step_peak", "rss_total_peak", "xla_peak"):
                extra = entry["memory_sam_vs_plain"].get(f"{label}_extra_weights")
                if extra is not None and (rss_ok or label == "xla_peak"):
                    entry["targets"][f"memory_sam_extra_weights/{label}"] = {
                        "max": MEMORY_TARGET_WEIGHTS, "met": extra <= MEMORY_TARGET_WEIGHTS, "value": extra}
        results[backend] = res
    meta["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)

    os.makedirs(args.out, exist_ok=True)
    text = report(results, meta)
    print("\n" + text)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    with open(os.path.join(args.out, "bench.txt"), "w") as f:
        f.write(text + "\n")
    png = os.path.join(args.out, "bench.png")
    if plot(results, png, meta):
        print(f"\nwrote {os.path.join(args.out, 'bench.json')}, bench.txt, bench.png "
              f"({meta['wall_s']:.0f} s)")
    failed = [b for b, r in results.items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""What the clean-gradient fallback costs a JAX SAM step on XLA:CPU.

    python benchmarks/jax_fallback_cost.py

keras_ssam falls back to the clean gradient `g` on a step whose perturbed
gradient vanished (`sam_math.clean_gradient_fallback`), so `g` is read again
by the update after the second pass. On the benchmark's MLP (4.2 M weights,
batch 128) this script times, interleaved in one process, jitted steps with
donated state, median ms over 7 rounds of 20 steps:

* `keras plain`, `keras_ssam SAM`: Keras's and keras_ssam's train steps;
* `keras_ssam SAM, no fallback`: the same with the fallback replaced by the
  identity in this process (the library is unchanged);
* `pure JAX plain / SAM / SAM + fallback`: 20-line steps on
  `model.stateless_call` with SGD momentum, SAM as optax's, and the same SAM
  whose update reads `g` again (`where(vanished, g, g_asc)`).

Measures; asserts nothing.
"""

import os
import statistics
import sys
import time

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from sam_bench.configs import LEARNING_RATE, MOMENTUM, RHO  # noqa: E402  (same folder)
from sam_bench.profiling import build, mlp, stateless_state  # noqa: E402

from keras_ssam import sam_math  # noqa: E402

BATCH = 128


def keras_step(name, x, y, fallback=True):
    """A jitted Keras train step of benchmark configuration `name`, traced now."""
    model, optimizer = build(name)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    state = stateless_state(model)
    original = sam_math.clean_gradient_fallback
    if not fallback:
        sam_math.clean_gradient_fallback = lambda update, grads, vanished, overwrite=False: update
    try:
        step = jax.jit(lambda s, d: model.train_step(s, d)[1], donate_argnums=0)
        state = step(state, (x, y))  # traced here, with or without the fallback
    finally:
        sam_math.clean_gradient_fallback = original
    return step, state


def pure_steps(x, y):
    """(plain, SAM, SAM + fallback) as pure-JAX steps on the Keras MLP."""
    model = mlp()
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss(weights, xb, yb):
        logits, _ = model.stateless_call(weights, non_trainable, xb, training=True)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=1))

    grad = jax.grad(loss)

    def descend(weights, momentum, g):
        momentum = [MOMENTUM * m + gi for m, gi in zip(momentum, g)]
        return [w - LEARNING_RATE * m for w, m in zip(weights, momentum)], momentum

    def norm(g):
        return jnp.sqrt(sum(jnp.sum(gi * gi) for gi in g))

    def plain(state, xb, yb):
        weights, momentum = state
        return descend(weights, momentum, grad(weights, xb, yb))

    def sam(state, xb, yb, fallback=False):
        weights, momentum = state
        g = grad(weights, xb, yb)
        g_norm = norm(g)
        g_asc = grad([w + RHO * gi / (g_norm + 1e-12) for w, gi in zip(weights, g)], xb, yb)
        if fallback:
            vanished = (norm(g_asc) == 0) & (g_norm > 0)
            g_asc = [jnp.where(vanished, gi, ai) for gi, ai in zip(g, g_asc)]
        return descend(weights, momentum, g_asc)

    steps = {}
    for name, fn in (("pure JAX plain", plain), ("pure JAX SAM", sam),
                     ("pure JAX SAM + fallback", lambda s, xb, yb: sam(s, xb, yb, fallback=True))):
        step = jax.jit(lambda s, d, fn=fn: fn(s, *d), donate_argnums=0)
        state = ([jnp.array(w, copy=True) for w in trainable], [jnp.zeros_like(w) for w in trainable])
        steps[name] = (step, step(state, (x, y)))
    return steps


def main():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, BATCH).astype("int32")
    steps = {"keras plain": keras_step("plain", x, y), "keras_ssam SAM": keras_step("sam", x, y),
             "keras_ssam SAM, no fallback": keras_step("sam", x, y, fallback=False)}
    steps.update(pure_steps(x, y))
    steps = {name: list(entry) for name, entry in steps.items()}
    data = jax.device_put((x, y))
    times = {name: [] for name in steps}
    for _ in range(7):
        for name, entry in steps.items():
            step, state = entry
            jax.block_until_ready(state)
            start = time.perf_counter()
            for _ in range(20):
                state = step(state, data)
            jax.block_until_ready(state)
            times[name].append((time.perf_counter() - start) / 20 * 1e3)
            entry[1] = state
    print(f"JAX {jax.__version__}, keras {keras.__version__}, {os.cpu_count()} CPUs; median ms [rounds]")
    for name, ts in times.items():
        print(f"{name:<28} {statistics.median(ts):6.1f}  {[round(t, 1) for t in ts]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

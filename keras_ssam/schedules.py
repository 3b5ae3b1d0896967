"""Which steps run the perturbed pass: `sam_probability` and its draws.

A SAM optimizer's `sam_probability` is the probability that a step runs the
perturbed pass (RST: Zhao et al., "Randomized Sharpness-Aware Training for
Boosting Computational Efficiency in Deep Learning", 2022): a float in
[0, 1], a `keras.optimizers.schedules.LearningRateSchedule`, or a callable of
the iteration count (e.g. `lambda it: it % 5 == 0`, SAM every 5 steps). The
draws come from a fixed table seeded by the optimizer's `seed`, so a step's
decision is a function of `(seed, iteration)` alone: the same on every
backend and replica, and a resumed run continues the pattern.
"""

from __future__ import annotations

import numbers

import numpy as np
from keras import ops

from keras_ssam._validation import check_number
from keras_ssam.backend import backend_module

DRAW_TABLE_SIZE = 1 << 16
_TABLES: dict = {}


def is_schedule(value) -> bool:
    """Whether `value` is a schedule (a `LearningRateSchedule` or another
    callable of the iteration count) rather than a number."""
    return callable(value) and not isinstance(value, numbers.Real)


def check_sam_probability(value) -> None:
    if is_schedule(value):
        return
    check_number("sam_probability", value, minimum=0.0, maximum=1.0)


def draw_table(seed: int) -> np.ndarray:
    """The 2^16 float32 uniforms that `sam_step_draws` combines, drawn once
    per seed from NumPy's default generator."""
    table = _TABLES.get(seed)
    if table is None:
        table = _TABLES[seed] = np.random.default_rng(seed).random(DRAW_TABLE_SIZE, dtype=np.float32)
    return table


def sam_step_draws(seed: int, iterations) -> np.ndarray:
    """The uniform draws `u_t` that decide which steps run the perturbed pass.

    The step at iteration `t` (the base optimizer's `iterations` before the
    step: 0 for the first step of training) runs the perturbed pass iff
    `u_t < p_t`, where `p_t` is `sam_probability` (or its value at `t`).
    With `T` a table of 2^16 float32 uniforms drawn once from `seed` (NumPy's
    default generator), `u_t = frac(T[t mod 2^16] + T[(t // 2^16) mod 2^16])`
    in float32: the same numbers on every backend and every replica, a
    function of `(seed, t)` only (so a resumed run continues the pattern),
    with period 2^32.

    Args:
        seed: the SAM optimizer's `seed` (`optimizer.seed`; drawn at
            construction when `None` was given).
        iterations: one iteration count `t`, or an array of them.

    Returns:
        float32 NumPy array of the draws `u_t`, the shape of `iterations`
        (a 0-d array for one `t`). These are the draws, not the decisions:
        compare them with `sam_probability`.

    Example:

    ```python
    optimizer = keras_ssam.SAM(keras.optimizers.SGD(0.1), sam_probability=0.5, seed=3)
    runs = keras_ssam.sam_step_draws(optimizer.seed, range(10)) < 0.5
    ```
    """
    table = draw_table(seed)
    t = np.asarray(iterations, np.int64)
    s = table[t % DRAW_TABLE_SIZE] + table[(t // DRAW_TABLE_SIZE) % DRAW_TABLE_SIZE]
    return (s - np.floor(s)).astype(np.float32)


def probability_at(sam_probability, iteration):
    """`sam_probability` at `iteration` (a float, or a float32 tensor)."""
    if isinstance(sam_probability, numbers.Real):
        return float(sam_probability)
    return ops.cast(sam_probability(ops.cast(iteration, "float32")), "float32")


def drawn(sam_probability, seed: int, iteration):
    """Whether the step at `iteration` runs the perturbed pass under
    `sam_probability`: `True` or `False` when that is known when tracing
    (a constant probability of 0 or 1), else a scalar boolean tensor
    `u_t < p_t` (see `sam_step_draws`)."""
    if isinstance(sam_probability, numbers.Real):
        if sam_probability >= 1:
            return True
        if sam_probability <= 0:
            return False
    # The table as a constant of the step (a backend may keep one tensor).
    constant = getattr(backend_module("", "keras_ssam"), "constant", ops.convert_to_tensor)
    draws = constant(draw_table(seed))
    low = ops.cast(iteration % DRAW_TABLE_SIZE, "int32")
    high = ops.cast((iteration // DRAW_TABLE_SIZE) % DRAW_TABLE_SIZE, "int32")
    s = ops.take(draws, low) + ops.take(draws, high)
    return ops.less(s - ops.floor(s), probability_at(sam_probability, iteration))

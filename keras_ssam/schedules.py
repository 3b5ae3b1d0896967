"""Which steps run the perturbed pass: `sam_probability` and its draws.

A SAM optimizer's `sam_probability` is the probability that a step runs the
perturbed pass (or a policy: `AdaptiveSteps`) (RST: Zhao et al., "Randomized Sharpness-Aware Training for
Boosting Computational Efficiency in Deep Learning", 2022): a float in
[0, 1], a `keras.optimizers.schedules.LearningRateSchedule`, or a callable of
the iteration count (e.g. `lambda it: it % 5 == 0`, SAM every 5 steps). The
draws come from a fixed table seeded by the optimizer's `seed`, so a step's
decision is a function of `(seed, iteration)` alone: the same on every
backend and replica, and a resumed run continues the pattern.
"""

from __future__ import annotations

import math
import numbers

import keras
import numpy as np
from keras import ops

from keras_ssam._validation import check_int, check_number
from keras_ssam.backend import backend_module

DRAW_TABLE_SIZE = 1 << 16
_TABLES: dict = {}


def is_schedule(value) -> bool:
    """Whether `value` is a schedule (a `LearningRateSchedule` or another
    callable of the iteration count) rather than a number."""
    return callable(value) and not isinstance(value, numbers.Real)


def check_sam_probability(value) -> None:
    if is_schedule(value) or isinstance(value, AdaptiveSteps):
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


def host_drawn(sam_probability, seed: int, iteration: int) -> bool:
    """`drawn` at a Python int `iteration`, computed on the host, in the same
    float32 arithmetic as the step's."""
    if isinstance(sam_probability, numbers.Real):
        if sam_probability >= 1:
            return True
        if sam_probability <= 0:
            return False
        probability = np.float32(sam_probability)
    elif hasattr(sam_probability, "host_probability"):
        probability = np.float32(sam_probability.host_probability(iteration))
    else:
        probability = np.float32(ops.convert_to_numpy(sam_probability(float(iteration))))
    if probability >= 1:
        return True
    if probability <= 0:
        return False
    return bool(sam_step_draws(seed, iteration) < probability)


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


@keras.saving.register_keras_serializable(package="keras_ssam")
class EveryK:
    """`sam_probability` schedule: the perturbed pass on every `k`-th step
    (`t % k == offset`), a plain step in between (the "SAM every k steps"
    practitioners use; LookSAM reuses a direction in between instead).

    Args:
        k: an int >= 1.
        offset: which step of each cycle runs it, in `[0, k)`.

    Example:

    ```python
    optimizer = keras_ssam.SSAM(keras.optimizers.SGD(0.05), rho=0.5,
                                sam_probability=keras_ssam.schedules.EveryK(5))
    ```
    """

    def __init__(self, k: int, offset: int = 0):
        check_int("k", k, 1)
        check_int("offset", offset, 0)
        if offset >= k:
            raise ValueError(f"Argument `offset` must be < k ({k}). Received: offset={offset!r}")
        self.k = int(k)
        self.offset = int(offset)

    def __call__(self, iteration):
        return ops.cast(ops.equal(ops.mod(ops.cast(iteration, "int32"), self.k), self.offset), "float32")

    def host_probability(self, iteration: int) -> float:
        return float(iteration % self.k == self.offset)

    def get_config(self):
        return {"k": self.k, "offset": self.offset}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_ssam")
class LatePhase:
    """`sam_probability` schedule: plain steps before `start_step`, the
    perturbed pass from then on (SAM late in training: Zhou et al., "Sharpness-
    Aware Minimization Efficiently Selects Flatter Minima Late in Training",
    ICLR 2025).

    Args:
        start_step: the first iteration that runs the perturbed pass, e.g.
            `int(0.7 * epochs * steps_per_epoch)` for the last 30%.

    Example:

    ```python
    optimizer = keras_ssam.SSAM(keras.optimizers.SGD(0.05), rho=0.5,
                                sam_probability=keras_ssam.schedules.LatePhase(700))
    ```
    """

    def __init__(self, start_step: int):
        check_int("start_step", start_step, 0)
        self.start_step = int(start_step)

    def __call__(self, iteration):
        return ops.cast(ops.greater_equal(ops.cast(iteration, "float32"), float(self.start_step)), "float32")

    def host_probability(self, iteration: int) -> float:
        return float(iteration >= self.start_step)

    def get_config(self):
        return {"start_step": self.start_step}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_ssam")
class AdaptiveSteps:
    """`sam_probability` policy: the perturbed pass only where the squared
    clean-gradient norm is large (AE-SAM: Jiang, Yang, Zhang & Kwok, "An
    Adaptive Policy to Employ Sharpness-Aware Minimization", ICLR 2023).

    With `n_t = ||g_t||^2` (the clean gradient, which every step computes
    anyway, so deciding costs one norm):

        mu_t      = delta mu_{t-1} + (1 - delta) n_t
        sigma_t^2 = delta sigma_{t-1}^2 + (1 - delta) (n_t - mu_t)^2
        perturbed pass iff  n_t >= mu_t + c_t sigma_t

    with `c_t` going linearly from `c_start` at step 0 to `c_end` at
    `total_steps` (and `c_end` after): a decreasing `c_t` runs the perturbed
    pass on more steps as training goes on, as the paper intends. The paper
    gives the schedule's form; the default end points (1 to -1, i.e. from
    about 16% to about 84% of the steps for a normal `n_t`) and `delta` are
    keras_ssam's choice, not a figure taken from the paper. `mu` and `sigma^2`
    start at 0 and live in the SAM optimizer's variables (saved and
    restored). The decision needs the clean gradient, so single-pass
    variants (MomentumSAM, RandomSAM without `mix`) refuse it.

    Args:
        total_steps: the steps over which `c_t` goes from `c_start` to
            `c_end` (usually all of training).
        delta: the statistics' decay, in [0, 1).
        c_start: the threshold at step 0, in standard deviations.
        c_end: the threshold from `total_steps` on.

    Example:

    ```python
    optimizer = keras_ssam.SSAM(keras.optimizers.SGD(0.05), rho=0.5,
                                sam_probability=keras_ssam.schedules.AdaptiveSteps(total_steps=1000))
    ```
    """

    needs_gradient = True

    def __init__(self, total_steps: int, delta: float = 0.9, c_start: float = 1.0, c_end: float = -1.0):
        check_int("total_steps", total_steps, 1)
        check_number("delta", delta, minimum=0.0)
        if delta >= 1:
            raise ValueError(f"Argument `delta` must be a finite number >= 0 and < 1. Received: delta={delta!r}")
        check_number("c_start", c_start, minimum=-math.inf)
        check_number("c_end", c_end, minimum=-math.inf)
        self.total_steps = int(total_steps)
        self.delta = float(delta)
        self.c_start = float(c_start)
        self.c_end = float(c_end)

    def threshold_scale(self, iteration):
        """`c_t`."""
        fraction = ops.minimum(ops.cast(iteration, "float32") / float(self.total_steps), 1.0)
        return self.c_start + (self.c_end - self.c_start) * fraction

    def create_variables(self, optimizer) -> list:
        """The statistics `[mu, sigma^2]`, as variables of `optimizer`."""
        return [
            optimizer.add_variable(shape=(), dtype="float32", initializer="zeros", name=name)
            for name in ("ae_sam_mean", "ae_sam_variance")
        ]

    def decide(self, iteration, grad_norm, variables):
        """Updates the statistics in `variables` with `||g||` and returns
        whether this step runs the perturbed pass (a boolean tensor)."""
        mean, variance = variables
        n = ops.square(ops.cast(grad_norm, "float32"))
        new_mean = self.delta * mean.value + (1.0 - self.delta) * n
        new_variance = self.delta * variance.value + (1.0 - self.delta) * ops.square(n - new_mean)
        mean.assign(new_mean)
        variance.assign(new_variance)
        return ops.greater_equal(n, new_mean + self.threshold_scale(iteration) * ops.sqrt(new_variance))

    def get_config(self):
        return {"total_steps": self.total_steps, "delta": self.delta, "c_start": self.c_start, "c_end": self.c_end}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

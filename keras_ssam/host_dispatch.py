"""Step decisions made on the host: two compiled steps, picked per step.

When whether step `t` runs the perturbed pass is a function of `t` (and the
seed) alone (`sam_probability` as a number or a schedule, LookSAM's `t % k`,
`schedules.EveryK`, `schedules.LatePhase`), `SAMModel` compiles two train
steps, one with the perturbed pass and one without, neither holding a
conditional, and picks one on the host before each step from a counter kept
in step with the optimizer's `iterations`. A skipped step then costs a plain
step, with no conditional and no device-to-host read (XLA:GPU and TensorFlow
read a conditional's predicate on the host; torch's Python `if` reads a
device scalar).

It applies with `steps_per_execution == 1` and without a LossScaleOptimizer
(whose skipped overflow steps do not advance `iterations`); elsewhere, and for
decisions that need the gradient (`schedules.AdaptiveSteps`), the step keeps
its compiled conditional. The counter is read from `iterations` once at the
first step of every `fit` / `train_on_batch` call (after `BackupAndRestore`
or a `load_model` restored it) and counts the steps from there.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_ssam.backend import backend_module


def applies(model, sam) -> bool:
    """Whether `model`'s steps are dispatched on the host."""
    if model.steps_per_execution != 1 or isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
        return False
    first = sam.host_decision(0)
    if first is None:
        return False
    # A decision that never changes needs no dispatch: the step has no
    # conditional already.
    return not (sam.always_runs_perturbed_pass() or _never(sam))


def _never(sam):
    p = sam.sam_probability
    return isinstance(p, (int, float)) and p <= 0


class HostDispatch:
    """The train function: the step with or without the perturbed pass, by
    the SAM optimizer's `host_decision` at the host's step counter."""

    def __init__(self, model, sam, with_pass, without_pass):
        self.model = model
        self.sam = sam
        self.functions = {True: with_pass, False: without_pass}
        self.iteration = None

    def resync(self) -> None:
        """Reads the counter from `iterations` again at the next step."""
        self.iteration = None

    def __call__(self, *args):
        if self.iteration is None:
            read = getattr(backend_module("", "keras_ssam"), "host_iteration", _host_iteration)
            self.iteration = read(self.model, *args)
        run = bool(self.sam.host_decision(self.iteration))
        # Read by the step when it is traced (TensorFlow, JAX: once per
        # function) or run (torch).
        self.model.forced_step_decision = run
        try:
            result = self.functions[run](*args)
        finally:
            self.model.forced_step_decision = None
        self.iteration += 1
        return result


def decided_step(model, decision: bool):
    """`model.train_step` with the perturbed pass (`decision=True`) or
    without it, whoever calls it."""

    def train_step(*args):
        outer, model.forced_step_decision = model.forced_step_decision, decision
        try:
            return type(model).train_step(model, *args)
        finally:
            model.forced_step_decision = outer

    return train_step


def _host_iteration(model, *args):
    return int(ops.convert_to_numpy(model.optimizer.iterations))

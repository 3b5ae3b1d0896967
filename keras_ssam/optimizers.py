"""SAM, USAM and SSAM: Keras optimizers that wrap a base optimizer.

`SAM` is the sharpness-aware policy: its hyper-parameters and the public
variant contract (`perturbation`, `update_gradients`, `skipped_update`,
`split_update`, `runs_perturbed_pass`, `build_state` / `state_variables` /
`next_state`) that `keras_ssam.step` calls, with the math in `sam_math`.
Forwarding to the base optimizer is `ForwardingOptimizer`'s; the passes are
run by `keras_ssam.SAMModel`.
"""

from __future__ import annotations

import numbers
import random

import keras
from keras import ops

from keras_ssam import sam_math, schedules
from keras_ssam._validation import check_bool, check_int, check_number
from keras_ssam._wrapper import StepOnlyOptimizer
from keras_ssam.perturb import check_perturb
from keras_ssam.schedules import sam_step_draws  # noqa: F401  (public here since 0.1)


@keras.saving.register_keras_serializable(package="keras_ssam")
class SAM(StepOnlyOptimizer):
    """Sharpness-aware minimization around any Keras optimizer.

    With `g` the gradient of the batch loss at the weights `w` and
    `T = |w| + eta` when `adaptive` (else 1), one step is:

        e     = rho * T^2 g / (||T g|| + epsilon)  (normalize=True, SAM/ASAM)
        e     = rho * T^2 g                        (normalize=False, USAM)
        g_asc = gradient of the same batch loss at w + e
        gamma = ||T(w) g|| / (||T(w + e) g_asc|| + epsilon)   (stable=True)
        w     <- base_optimizer update of w with gamma * g_asc (or g_asc)

    Norms are global L2 norms over all trainable weights. The update is
    applied at `w`, never at `w + e`; `rho=0` is plain training with the base
    optimizer. A step whose `g_asc` is exactly zero while `g` is not (the
    ascent saturated the loss) takes `g` instead: it would otherwise change
    nothing. Use with `keras_ssam.SAMModel`, whose `train_step` runs the two
    passes.

    Args:
        base_optimizer: a `keras.optimizers.Optimizer` instance that makes the
            weight update (SGD, Adam, AdamW, ...), with its own clipping,
            weight decay, EMA and gradient accumulation settings.
        rho: perturbation radius (with `normalize=False` the radius is
            `rho * ||T g||`, so rho is on another scale), a float >= 0, a
            `keras.optimizers.schedules.LearningRateSchedule`, or a callable
            of the iteration count (e.g. rho proportional to the learning
            rate, as in GSAM).
        normalize: divide the ascent direction by its norm (SAM, Foret et
            al. 2021). `False` gives unnormalized SAM (USAM).
        stable: rescale the perturbed gradient to the norm of the clean one
            (SSAM, Tan et al. 2025).
        adaptive: scale the ascent by `T = |w| + eta` (ASAM, Kwon et al.
            2021).
        eta: ASAM's offset; only with `adaptive=True`.
        max_scale: upper bound on SSAM's factor gamma; only with
            `stable=True`.
        epsilon: added to the denominators of the norm divisions.
        sam_probability: the probability that a step runs the perturbed
            pass (otherwise it is a plain step on `g`): a float in [0, 1], a
            `LearningRateSchedule` or a callable of the iteration count
            (e.g. `lambda it: it % 5 == 0`). Draws are reproducible from
            `seed` (see `keras_ssam.sam_step_draws`).
        seed: seed of the `sam_probability` draws; drawn from Python's
            `random` (seeded by `keras.utils.set_random_seed`) when `None`.
        perturb: which trainable weights are perturbed: `"all"`,
            `"no_norm"` (not normalization layers nor biases), `"norm_only"`
            (SAM-ON) or a callable taking the `keras.Variable` and returning
            a bool (see `keras_ssam.perturb`). The others get `e = 0` and
            are left out of `||T g||`; every weight is still updated with
            the gradient at `w + e`.
        name: name of the optimizer.

    Example:

    ```python
    model = keras_ssam.SAMModel(inner_model)
    model.compile(
        optimizer=keras_ssam.SAM(keras.optimizers.SGD(0.05, momentum=0.9),
                                 rho=0.05),
        loss="sparse_categorical_crossentropy",
    )
    model.fit(x, y, epochs=10)
    ```
    """

    def __init__(
        self,
        base_optimizer: keras.optimizers.Optimizer,
        rho=0.05,
        *,
        normalize: bool = True,
        stable: bool = False,
        adaptive: bool = False,
        eta: float = 0.0,
        max_scale: float | None = None,
        epsilon: float = 1e-12,
        sam_probability=1.0,
        seed: int | None = None,
        perturb="all",
        name: str | None = None,
    ):
        _check_arguments(
            base_optimizer, rho, normalize=normalize, stable=stable, adaptive=adaptive, eta=eta,
            max_scale=max_scale, epsilon=epsilon, sam_probability=sam_probability, seed=seed, perturb=perturb,
            merged_lora=self.perturbs_merged_lora, owner=type(self).__name__,
        )
        super().__init__(base_optimizer, name=name)
        self.rho = rho
        self.normalize = normalize
        self.stable = stable
        self.adaptive = adaptive
        self.eta = eta
        self.max_scale = max_scale
        self.epsilon = epsilon
        self.sam_probability = sam_probability
        self.perturb = perturb
        # Like keras.random.SeedGenerator: from Python's `random`, which
        # keras.utils.set_random_seed seeds. Saved, so draws resume exactly.
        # Only drawn when some step is random: the default takes nothing from
        # `random`, so the layers built after it get the same weights as before.
        if seed is None and not (isinstance(sam_probability, numbers.Real) and sam_probability in (0, 1)):
            seed = random.randint(1, 10**9)
        self.seed = seed if seed is None else int(seed)
        self._decision_variables = []

    # -- The variant contract: what keras_ssam.step calls. --

    def current_rho(self):
        """rho at the current iteration (a float or a scalar tensor)."""
        if isinstance(self.rho, numbers.Real):
            return float(self.rho)
        # A float step, so callables like `lambda step: 0.1 * (step + 1)` work
        # on TensorFlow too, where `iterations` is an int64 tensor.
        return ops.cast(self.rho(ops.cast(self.iterations, "float32")), "float32")

    def always_runs_perturbed_pass(self) -> bool:
        """Whether every step runs the perturbed pass (known when tracing)."""
        if self.decision_needs_gradient():
            return False
        return schedules.drawn(self.sam_probability, self.seed, 0) is True

    def decision_needs_gradient(self) -> bool:
        """Whether `runs_perturbed_pass` reads the clean gradient's norm
        (`schedules.AdaptiveSteps`)."""
        return getattr(self.sam_probability, "needs_gradient", False)

    def runs_perturbed_pass(self, iteration, grad_norm=None):
        """Whether the step at `iteration` (the count before the step) runs
        the perturbed pass: `True` or `False` when known when tracing, else
        a scalar boolean tensor (the step then runs a conditional). By
        default the `sam_probability` draw (`keras_ssam.sam_step_draws`) or
        policy (`grad_norm` is the unscaled clean `||g||` when
        `decision_needs_gradient()`); LookSAM adds its `t % k`."""
        if self.decision_needs_gradient():
            return self.sam_probability.decide(iteration, grad_norm, self._decision_variables)
        return schedules.drawn(self.sam_probability, self.seed, iteration)

    def host_decision(self, iteration: int) -> bool | None:
        """`runs_perturbed_pass` at a Python int `iteration`, made on the
        host, or `None` where the decision needs the device (the gradient:
        `schedules.AdaptiveSteps`). It must agree with `runs_perturbed_pass`:
        `SAMModel` then compiles a step with and one without the perturbed
        pass and picks one per step (`keras_ssam.host_dispatch`)."""
        if self.decision_needs_gradient():
            return None
        return schedules.host_drawn(self.sam_probability, self.seed, iteration)

    def perturbation(self, grads, weights, grad_scale=None, *, mask=None, overwrite_grads=False):
        """The ascent step `e` for each weight, and `||T g||`.

        Args:
            grads: gradients at `weights` (of the loss times `grad_scale`).
            weights: the current weight values.
            grad_scale: loss-scale factor the gradients carry, or `None`.
            mask: a bool per weight (`perturb`), or `None`: all.
            overwrite_grads: the caller gives `grads` up: on torch `e` is
                computed in their memory.

        Returns:
            `(perturbations, grad_norm)`: `e` per weight (`None` where not
            perturbed) and the clean `||T g||` over all weights (SSAM's
            gamma, the fallback and the diagnostics use it).
        """
        return sam_math.sam_perturbation(
            grads,
            weights,
            self.current_rho(),
            normalize=self.normalize,
            adaptive=self.adaptive,
            eta=self.eta,
            epsilon=self.epsilon,
            grad_scale=grad_scale,
            overwrite_grads=overwrite_grads,
            mask=mask,
        )

    def update_gradients(
        self,
        grads,
        perturbed_grads,
        perturbed_weights,
        grad_norm,
        grad_scale=None,
        *,
        need_stats=False,
        overwrite_grads=False,
        global_grads=None,
        global_perturbed_grads=None,
    ):
        """The gradient handed to the base optimizer after the perturbed
        pass, and diagnostics.

        On a step where the perturbed gradient is exactly zero while the
        clean one is not (the ascent saturated the loss), every variant's
        update would be 0 and training would silently stop: that step
        falls back to the clean gradient `g`, and the `clean_fallback`
        diagnostic counts it.

        Args:
            grads: the clean gradients at w (the fallback).
            perturbed_grads: gradients at `perturbed_weights` = w + e.
            perturbed_weights: w + e (only adaptive SAM reads them).
            grad_norm: the clean `||T g||`, as returned by `perturbation`.
            grad_scale: loss-scale factor the gradients carry, or `None`.
            need_stats: also return the diagnostics.
            overwrite_grads: the caller gives `perturbed_grads` up: on torch
                the update is computed in their memory.
            global_grads: under tf.distribute, the all-reduced clean
                gradients, while `grads` is this replica's share (which the
                optimizer all-reduces): norms and coefficients come from the
                global ones. `None`: the same as `grads`.
            global_perturbed_grads: the same for `perturbed_grads`.

        Returns:
            `(update_grads, stats)` where `stats` holds `perturbed_grad_norm`
            (`||T(w + e) g_asc||`), `renorm_factor` (gamma; 1.0 when not
            stable) and `clean_fallback` (1.0 on a step that fell back to
            `g`), or is empty unless `need_stats`.
        """
        perturbed_norm = sam_math.weighted_grad_norm(
            perturbed_grads if global_perturbed_grads is None else global_perturbed_grads,
            perturbed_weights,
            adaptive=self.adaptive,
            eta=self.eta,
            grad_scale=grad_scale,
        )
        if self.stable:
            gamma = sam_math.renormalization_factor(
                grad_norm, perturbed_norm, epsilon=self.epsilon, max_scale=self.max_scale
            )
            update = sam_math.scale_gradients(perturbed_grads, gamma, overwrite=overwrite_grads)
        else:
            gamma = ops.ones_like(perturbed_norm)
            update = list(perturbed_grads)
        vanished = sam_math.perturbed_gradient_vanished(grad_norm, perturbed_norm)
        update = sam_math.clean_gradient_fallback(update, grads, vanished, overwrite=overwrite_grads)
        if not need_stats:
            return update, {}
        return update, {
            "perturbed_grad_norm": perturbed_norm,
            "renorm_factor": ops.where(vanished, ops.ones_like(gamma), gamma),
            "clean_fallback": ops.cast(vanished, "float32"),
        }

    # A single-pass variant takes the step's only gradient at w + e, with e
    # known before any gradient (`perturbation_before_gradient`): Momentum-SAM,
    # random weight perturbation. That pass is stateful, as Keras's own step.
    single_pass = False

    def check_model(self, model) -> None:
        """Raises if this optimizer cannot train `model` (called by
        `SAMModel` before the first step, while the weights are intact)."""

    # Whether `perturb="merged_lora"` (noise on frozen LoRA kernels, through
    # `non_trainable_perturbation`) is supported.
    perturbs_merged_lora = False

    def non_trainable_perturbation(self, model, weights, non_trainable_weights):
        """A single-pass variant's perturbation of `model`'s non-trainable
        weights (values in `non_trainable_weights`, in the order of
        `model.non_trainable_variables`; `None`: unperturbed), or `None`:
        none (the default). RandomSAM's Flat-LoRA noise on merged LoRA
        weights goes through the frozen kernels."""
        return None

    def perturbation_before_gradient(self, weights, *, mask=None):
        """A single-pass variant's `e` per weight (`None`: not perturbed),
        from its state or a seeded draw, before the step's gradient; and a
        scalar for the diagnostics' `grad_norm` (the norm of the direction).
        Only called when `single_pass` is true."""
        raise NotImplementedError(f"{type(self).__name__} takes its perturbation from the clean gradient.")

    def skipped_update(self, grads):
        """The gradient handed to the base optimizer on a step without the
        perturbed pass: the clean gradient. The step gives `grads` up (torch
        may compute the result in their memory)."""
        return list(grads)

    def split_update(self, grads, update):
        """`(base_update, decoupled)`: the gradient the base optimizer
        applies, and per weight a term subtracted after its update, times
        the learning rate (`None`: none; WSAM's decoupled sharpness term).
        Called with every step's update, skipped steps' too."""
        return update, None

    # State a variant keeps between steps (LookSAM's stored direction,
    # F-SAM's moving average) lives in optimizer variables created by
    # `build_state` and listed by `state_variables` (ForwardingOptimizer),
    # so it saves, loads and, on JAX, flows through the stateless step.

    # Whether the new state is linear in the gradients, so that a step over
    # batch chunks takes the chunks' states weighted by their sizes (F-SAM's
    # average); otherwise chunks are refused (LookSAM's stored direction).
    state_averages_over_chunks = False

    def next_state(self, grads, perturbed_grads, grad_norm, grad_scale=None):
        """New values of `state_variables()` after a step with the perturbed
        pass (a skipped step leaves them unchanged); none for SAM. A
        single-pass variant gets `grads=None` and is called on every step."""
        return []

    def step_description(self) -> str | None:
        """A line `SAMModel(..., diagnostics=True)` prints when training
        starts (a choice the variant made once, e.g. Momentum-SAM's
        direction), or `None`."""
        return None

    # -- Keras integration: forwarding and the guard (StepOnlyOptimizer). --

    def own_variables(self):
        # The step decision's statistics (AdaptiveSteps) after the variant's.
        return self.state_variables() + list(self._decision_variables)

    def build(self, var_list):
        if self.decision_needs_gradient() and not self._decision_variables:
            self._decision_variables = self.sam_probability.create_variables(self)
        super().build(var_list)

    # -- Saving. --

    def get_config(self):
        config = super().get_config()
        config.update({
            "rho": _serialize(self.rho),
            "normalize": self.normalize,
            "stable": self.stable,
            "adaptive": self.adaptive,
            "eta": self.eta,
            "max_scale": self.max_scale,
            "epsilon": self.epsilon,
            "sam_probability": _serialize(self.sam_probability),
            "seed": self.seed,
            "perturb": _serialize(self.perturb),
        })
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("rho", "sam_probability", "perturb"):
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(config[key], custom_objects=custom_objects)
        return super().from_config(config, custom_objects=custom_objects)


def _serialize(value):
    """A number or preset as is, a schedule or callable serialized."""
    if isinstance(value, (numbers.Real, str)):
        return value
    return keras.saving.serialize_keras_object(value)


def _check_arguments(
    base_optimizer, rho, *, normalize, stable, adaptive, eta, max_scale, epsilon, sam_probability, seed, perturb,
    merged_lora, owner,
):
    """`SAM`'s argument checks: each error names the argument and the value."""
    _check_base_optimizer(base_optimizer)
    if not schedules.is_schedule(rho):
        check_number("rho", rho, minimum=0.0)
    check_number("eta", eta, minimum=0.0)
    check_number("epsilon", epsilon, minimum=0.0)
    check_number("max_scale", max_scale, minimum=0.0, allow_equal=False, allow_none=True)
    if eta and not adaptive:
        raise ValueError(
            "Argument `eta` only applies to the adaptive variant (ASAM); "
            f"set adaptive=True or leave eta=0. Received: eta={eta!r}, "
            f"adaptive={adaptive!r}"
        )
    if max_scale is not None and not stable:
        raise ValueError(
            "Argument `max_scale` bounds SSAM's renormalization factor and "
            "only applies with stable=True. Received: "
            f"max_scale={max_scale!r}, stable={stable!r}"
        )
    schedules.check_sam_probability(sam_probability)
    check_perturb(perturb)
    if perturb == "merged_lora" and not merged_lora:
        raise ValueError(
            "Argument `perturb='merged_lora'` is random weight perturbation of the merged "
            "LoRA weights (Flat-LoRA): use keras_ssam.RandomSAM(..., perturb='merged_lora'). "
            f"Received: perturb={perturb!r} for {owner}"
        )
    if seed is not None:
        check_int("seed", seed, 0)
    check_bool("normalize", normalize)
    check_bool("stable", stable)
    check_bool("adaptive", adaptive)


def _check_base_optimizer(base_optimizer):
    if isinstance(base_optimizer, SAM):
        raise ValueError(
            "Argument `base_optimizer` is already a SAM optimizer "
            f"({type(base_optimizer).__name__}); SAM optimizers cannot be "
            f"nested. Received: base_optimizer={base_optimizer!r}"
        )
    if isinstance(base_optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError(
            "Argument `base_optimizer` must not be a LossScaleOptimizer: "
            "pass the plain optimizer (under a `mixed_float16` policy "
            "`compile` wraps the SAM optimizer in one). "
            f"Received: base_optimizer={base_optimizer!r}"
        )
    if not isinstance(base_optimizer, keras.optimizers.Optimizer):
        raise ValueError(
            "Argument `base_optimizer` must be a keras.optimizers."
            "Optimizer instance, e.g. keras.optimizers.SGD(0.1). "
            f"Received: base_optimizer={base_optimizer!r}"
        )


@keras.saving.register_keras_serializable(package="keras_ssam")
class USAM(SAM):
    """Unnormalized SAM: `SAM(..., normalize=False)`, `e = rho * g`.

    The SSAM paper (Tan et al., JMLR 2025) analyses this form and calls it
    SAM. Arguments are those of `keras_ssam.SAM`.

    Example:

    ```python
    optimizer = keras_ssam.USAM(keras.optimizers.SGD(0.05), rho=0.1)
    ```
    """

    def __init__(self, base_optimizer, rho=0.05, *, normalize=False, **kwargs):
        super().__init__(base_optimizer, rho, normalize=normalize, **kwargs)


@keras.saving.register_keras_serializable(package="keras_ssam")
class SSAM(SAM):
    """Stable SAM: `SAM(..., normalize=False, stable=True)`.

    The paper's Algorithm 1 (Tan et al., "Stabilizing Sharpness-aware
    Minimization Through A Simple Renormalization Strategy", JMLR 2025): the
    unnormalized ascent `e = rho * g`, then the perturbed gradient rescaled by
    `gamma = ||g|| / ||g_asc||`, so the descent step has the clean gradient's
    norm. `SSAM(..., normalize=True)` renormalizes the original SAM instead.
    Arguments are those of `keras_ssam.SAM`. The perturbation radius is
    `rho * ||g||`: pick rho near the radius you want over a typical `||g||`
    (the default, 0.05, is the authors' code's).

    Example:

    ```python
    optimizer = keras_ssam.SSAM(keras.optimizers.SGD(0.05, momentum=0.9),
                                rho=0.2)
    ```
    """

    def __init__(
        self, base_optimizer, rho=0.05, *, normalize=False, stable=True, **kwargs
    ):
        super().__init__(
            base_optimizer, rho, normalize=normalize, stable=stable, **kwargs
        )




def find_sam_optimizer(optimizer):
    """The SAM optimizer inside `optimizer` (itself, or a LossScaleOptimizer's
    inner optimizer), or `None`."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer if isinstance(optimizer, SAM) else None

"""SAM, USAM and SSAM: Keras optimizers that wrap a base optimizer.

The wrapper owns the sharpness-aware hyper-parameters and the math (in
`keras.ops`, see `sam_math`); the weight update is the base optimizer's, so
its momentum, clipping, weight decay, accumulation, EMA and schedules act on
the sharpness-aware gradient exactly as they would on a plain one. The two
forward-backward passes are run by `keras_ssam.SAMModel`.
"""

import contextlib
import numbers
import random
import sys

import keras
import numpy as np
from keras import ops

from keras_ssam import sam_math
from keras_ssam._validation import check_int, check_number
from keras_ssam.backend import backend_module
from keras_ssam.perturb import check_perturb

_SAM_MODEL_HINT = (
    "SAM optimizers need the gradient at a perturbed point, which only "
    "keras_ssam.SAMModel computes: wrap your model, "
    "`keras_ssam.SAMModel(model)`, and compile that."
)


def _is_rho_schedule(rho):
    return isinstance(
        rho, keras.optimizers.schedules.LearningRateSchedule
    ) or (callable(rho) and not isinstance(rho, numbers.Real))


_DRAW_TABLE_SIZE = 1 << 16


def _draw_table(seed):
    return np.random.default_rng(seed).random(_DRAW_TABLE_SIZE, dtype=np.float32)


def sam_step_draws(seed, iterations):
    """The uniform draws `u_t` that decide which steps run the perturbed pass.

    A step at iteration `t` runs it iff `u_t < sam_probability(t)`. With `T`
    a table of 2^16 float32 uniforms drawn once from `seed` (NumPy's
    default generator), `u_t = frac(T[t mod 2^16] + T[(t // 2^16) mod 2^16])`
    in float32: the same numbers on every backend and every replica, a
    function of `(seed, t)` only (so a resumed run continues the pattern),
    with period 2^32.

    Args:
        seed: the optimizer's `seed`.
        iterations: an int or an array of iteration counts.

    Returns:
        float32 NumPy array of `u_t`, the shape of `iterations`.
    """
    table = _draw_table(seed)
    t = np.asarray(iterations, np.int64)
    s = table[t % _DRAW_TABLE_SIZE] + table[(t // _DRAW_TABLE_SIZE) % _DRAW_TABLE_SIZE]
    return (s - np.floor(s)).astype(np.float32)


def _check_sam_probability(value):
    if _is_rho_schedule(value):
        return
    check_number("sam_probability", value, minimum=0.0, maximum=1.0)


@keras.saving.register_keras_serializable(package="keras_ssam")
class SAM(keras.optimizers.Optimizer):
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
        base_optimizer,
        rho=0.05,
        *,
        normalize=True,
        stable=False,
        adaptive=False,
        eta=0.0,
        max_scale=None,
        epsilon=1e-12,
        sam_probability=1.0,
        seed=None,
        perturb="all",
        name=None,
    ):
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
        if not _is_rho_schedule(rho):
            check_number("rho", rho, minimum=0.0)
        check_number("eta", eta, minimum=0.0)
        check_number("epsilon", epsilon, minimum=0.0)
        check_number(
            "max_scale", max_scale, minimum=0.0, allow_equal=False, allow_none=True
        )
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
        _check_sam_probability(sam_probability)
        check_perturb(perturb)
        if seed is not None:
            check_int("seed", seed, 0)
        for flag_name, flag in (
            ("normalize", normalize),
            ("stable", stable),
            ("adaptive", adaptive),
        ):
            if not isinstance(flag, bool):
                raise ValueError(
                    f"Argument `{flag_name}` must be a bool. "
                    f"Received: {flag_name}={flag!r}"
                )
        super().__init__(learning_rate=0.0, name=name)
        self.base_optimizer = base_optimizer
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
        self._draws = None
        self._sam_step_depth = 0
        # Set by SAMModel when compiled with this optimizer.
        self._attached_to_sam_model = False

    # -- The SAM math, used by SAMModel's train_step on every backend. --

    def current_rho(self):
        """rho at the current iteration (a float or a scalar tensor)."""
        if isinstance(self.rho, numbers.Real):
            return float(self.rho)
        # A float step, so callables like `lambda step: 0.1 * (step + 1)` work
        # on TensorFlow too, where `iterations` is an int64 tensor.
        return ops.cast(self.rho(ops.cast(self.iterations, "float32")), "float32")

    def _always_perturbed(self):
        """Whether every step runs the perturbed pass, known when tracing."""
        p = self.sam_probability
        return isinstance(p, numbers.Real) and p >= 1

    def _runs_perturbed_pass(self):
        """Whether this step runs the perturbed pass: `True` or `False` when
        known when tracing, else a scalar boolean tensor (`u_t < p_t`, see
        `sam_step_draws`)."""
        p = self.sam_probability
        if isinstance(p, numbers.Real):
            if p >= 1:
                return True
            if p <= 0:
                return False
            probability = p
        else:
            probability = ops.cast(p(ops.cast(self.iterations, "float32")), "float32")
        if self._draws is None:
            self._draws = _draw_table(self.seed)
        # A constant of each trace (TensorFlow, JAX: a tensor made while
        # tracing must not outlive the trace); torch keeps one tensor.
        if keras.backend.backend() == "torch" and not hasattr(self._draws, "device"):
            self._draws = ops.convert_to_tensor(self._draws)
        t = ops.cast(self.iterations, "int32" if keras.backend.backend() == "jax" else "int64")
        draws = ops.convert_to_tensor(self._draws)
        s = ops.take(draws, t % _DRAW_TABLE_SIZE) + ops.take(
            draws, (t // _DRAW_TABLE_SIZE) % _DRAW_TABLE_SIZE
        )
        return ops.less(s - ops.floor(s), probability)

    def skipped_update(self, grads):
        """The gradient handed to the base optimizer on a step without the
        perturbed pass: the clean gradient. The step gives `grads` up (torch
        may compute the result in their memory)."""
        return list(grads)

    def _perturbed_step_state(self, grads, perturbed_grads, grad_norm, grad_scale=None):
        """New values of this optimizer's own variables after a perturbed
        pass (in the order of `_state_variables`); none for SAM."""
        return []

    # Whether the new state is linear in the gradients, so that a step over
    # batch chunks takes the chunks' states weighted by their sizes (F-SAM's
    # average); otherwise chunks are refused (LookSAM's stored direction).
    _state_averages_over_chunks = False

    def _decoupled_update(self, grads):
        """`(base_grads, decoupled)`: the gradients for the base optimizer,
        and per weight a term subtracted after its update, times the
        learning rate (`None`: nothing; WSAM's decoupled sharpness term)."""
        return grads, None

    def _state_variables(self):
        return []

    def perturbation(self, grads, weights, grad_scale=None, overwrite_grads=False, mask=None):
        """The ascent step `e` for each weight, and `||T g||`.

        Args:
            grads: gradients at `weights` (of the loss times `grad_scale`).
            weights: the current weight values.
            grad_scale: loss-scale factor the gradients carry, or `None`.
            overwrite_grads: the caller gives `grads` up: on torch `e` is
                computed in their memory.
            mask: a bool per weight (`perturb`), or `None`: all.

        Returns:
            `(perturbations, grad_norm)`.
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
        need_stats=False,
        norm_perturbed_grads=None,
        overwrite_grads=False,
        norm_grads=None,
    ):
        """The gradient handed to the base optimizer, and diagnostics.

        On a step where the perturbed gradient is exactly zero while the
        clean one is not (the ascent saturated the loss), every variant's
        update would be 0 and training would silently stop: that step
        falls back to the clean gradient `g`, and the `clean_fallback`
        diagnostic counts it.

        Args:
            grads: the clean gradients at w (the fallback).
            perturbed_grads: gradients at `perturbed_weights` = w + e.
            perturbed_weights: w + e (only adaptive SAM reads them).
            grad_norm: `||T g||` as returned by `perturbation`.
            grad_scale: loss-scale factor the gradients carry, or `None`.
            need_stats: also return the diagnostics.
            norm_perturbed_grads: the gradients whose norm gamma uses, when
                they differ from the ones it scales (under tf.distribute, the
                all-reduced perturbed gradient, while each replica hands its
                own share to the optimizer, which all-reduces it).
            overwrite_grads: the caller gives `perturbed_grads` up: on torch
                the update is computed in their memory.
            norm_grads: the all-reduced clean gradients under tf.distribute
                (as `norm_perturbed_grads`), for variants whose update
                mixes `g` and `g_asc` with global coefficients (GSAM).

        Returns:
            `(update_grads, stats)` where `stats` holds `perturbed_grad_norm`,
            `renorm_factor` (1.0 when not stable) and `clean_fallback` (1.0
            on a step that fell back to `g`), or is empty unless
            `need_stats`.
        """
        perturbed_norm = sam_math.perturbed_grad_norm(
            perturbed_grads if norm_perturbed_grads is None else norm_perturbed_grads,
            perturbed_weights,
            adaptive=self.adaptive,
            eta=self.eta,
            grad_scale=grad_scale,
        )
        if self.stable:
            gamma = sam_math.renormalization_factor(
                grad_norm,
                perturbed_norm,
                epsilon=self.epsilon,
                max_scale=self.max_scale,
            )
            update = sam_math.scale_gradients(perturbed_grads, gamma, overwrite=overwrite_grads)
        else:
            gamma = ops.ones_like(perturbed_norm)
            update = list(perturbed_grads)
        vanished = sam_math.perturbed_gradient_vanished(grad_norm, perturbed_norm)
        update = sam_math.clean_gradient_fallback(
            update, grads, vanished, overwrite=overwrite_grads
        )
        if not need_stats:
            return update, {}
        return update, {
            "perturbed_grad_norm": perturbed_norm,
            "renorm_factor": ops.where(vanished, ops.ones_like(gamma), gamma),
            "clean_fallback": ops.cast(vanished, "float32"),
        }

    @contextlib.contextmanager
    def _sam_step(self):
        """Marks an `apply` as the end of a two-pass SAM step.

        `SAMModel` applies the sharpness-aware gradient inside this context;
        anywhere else `apply` raises, so a SAM optimizer compiled into a plain
        `keras.Model` cannot silently train as its base optimizer.
        """
        self._sam_step_depth += 1
        try:
            yield
        finally:
            self._sam_step_depth -= 1

    def _check_in_sam_step(self):
        if not self._sam_step_depth:
            raise RuntimeError(
                f"{type(self).__name__}.apply was called outside "
                f"keras_ssam.SAMModel. {_SAM_MODEL_HINT}"
            )

    # -- Everything else is the base optimizer's. --

    @property
    def variables(self):
        return self.base_optimizer.variables + self._state_variables()

    def build(self, var_list):
        # Keras builds the optimizer before the first step (and, on JAX,
        # before it moves the variables into the step's state): refuse
        # training here, while the model is still intact.
        if not (self._attached_to_sam_model or self._sam_step_depth):
            if _called_from_training():
                raise RuntimeError(
                    f"{type(self).__name__} was compiled into a model that is "
                    f"not a keras_ssam.SAMModel. {_SAM_MODEL_HINT}"
                )
            # JAX and torch also build it for `evaluate`, which a plain model
            # may run: create the state, but stay unbuilt so that `fit`
            # builds again, and refuses.
            if not self.base_optimizer.built:
                self.base_optimizer.build(var_list)
            self._build_state(var_list)
            return
        self.base_optimizer.build(var_list)
        self._build_state(var_list)
        self.built = True

    def _build_state(self, var_list):
        """Creates this optimizer's own variables (see `_state_variables`),
        once."""

    def apply(self, grads, trainable_variables=None):
        self._check_in_sam_step()
        grads, decoupled = self._decoupled_update(grads)
        if decoupled is None:
            self.base_optimizer.apply(grads, trainable_variables)
        else:
            variables = (
                self.base_optimizer._trainable_variables
                if trainable_variables is None
                else trainable_variables
            )
            # Under tf.distribute each replica holds a share of the term; every
            # replica's copy of the weights takes the sum.
            sum_over_replicas = getattr(backend_module("", "keras_ssam"), "sum_over_replicas", None)
            if sum_over_replicas is not None:
                decoupled = sum_over_replicas(decoupled)
            # The learning rate of this step, before `apply` advances it.
            learning_rate = ops.convert_to_tensor(self.base_optimizer.learning_rate)
            self.base_optimizer.apply(grads, trainable_variables)
            for variable, term in zip(variables, decoupled):
                if term is not None:
                    variable.assign(
                        variable - ops.cast(learning_rate, variable.dtype) * ops.cast(term, variable.dtype)
                    )
        self.built = True

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        self._check_in_sam_step()
        # The base optimizer's variables come first; this optimizer's own
        # (already updated by the step) pass through. LossScaleOptimizer
        # hands over the variables themselves inside a StatelessScope: read
        # them there.
        count = len(self.base_optimizer.variables)
        grads, decoupled = self._decoupled_update(grads)
        if decoupled is not None:
            mapping = list(zip(self.base_optimizer.variables, optimizer_variables[:count]))
            with keras.StatelessScope(state_mapping=mapping):
                learning_rate = ops.convert_to_tensor(self.base_optimizer.learning_rate)
        trainable_variables, base_values = self.base_optimizer.stateless_apply(
            optimizer_variables[:count], grads, trainable_variables
        )
        if decoupled is not None:
            trainable_variables = [
                w if term is None else w - ops.cast(learning_rate, w.dtype) * ops.cast(term, w.dtype)
                for w, term in zip(trainable_variables, decoupled)
            ]
        own_values = [ops.convert_to_tensor(v) for v in optimizer_variables[count:]]
        return trainable_variables, list(base_values) + own_values

    def finalize_variable_values(self, var_list):
        self.base_optimizer.finalize_variable_values(var_list)

    def scale_loss(self, loss):
        return self.base_optimizer.scale_loss(loss)

    @property
    def loss_scale_factor(self):
        base = self.__dict__.get("base_optimizer")
        return None if base is None else base.loss_scale_factor

    @loss_scale_factor.setter
    def loss_scale_factor(self, value):
        # LossScaleOptimizer turns off its inner optimizer's static scaling;
        # that scaling lives on the base optimizer.
        base = self.__dict__.get("base_optimizer")
        if base is not None:
            base.loss_scale_factor = value

    @property
    def learning_rate(self):
        return self.base_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        base = self.__dict__.get("base_optimizer")
        if base is not None:
            base.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.base_optimizer.iterations

    def get_config(self):
        rho, sam_probability = (
            v if isinstance(v, numbers.Real) else keras.saving.serialize_keras_object(v)
            for v in (self.rho, self.sam_probability)
        )
        return {
            "name": self.name,
            "base_optimizer": keras.saving.serialize_keras_object(
                self.base_optimizer
            ),
            "rho": rho,
            "normalize": self.normalize,
            "stable": self.stable,
            "adaptive": self.adaptive,
            "eta": self.eta,
            "max_scale": self.max_scale,
            "epsilon": self.epsilon,
            "sam_probability": sam_probability,
            "seed": self.seed,
            "perturb": self.perturb
            if isinstance(self.perturb, str)
            else keras.saving.serialize_keras_object(self.perturb),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["base_optimizer"] = keras.saving.deserialize_keras_object(
            config["base_optimizer"], custom_objects=custom_objects
        )
        for key in ("rho", "sam_probability", "perturb"):
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(
                    config[key], custom_objects=custom_objects
                )
        return cls(**config)


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


def _called_from_training():
    """Whether a `keras.Model`'s `fit` or `train_on_batch` is on the stack.

    Keras's trainers build the compiled optimizer from `fit`,
    `train_on_batch` and (JAX, torch) `evaluate`/`test_on_batch`, through
    the same private method; the caller is the one way to tell them apart.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in ("fit", "train_on_batch") and isinstance(
            frame.f_locals.get("self"), keras.Model
        ):
            return True
        frame = frame.f_back
    return False


def find_sam_optimizer(optimizer):
    """The SAM optimizer inside `optimizer` (itself, or a LossScaleOptimizer's
    inner optimizer), or `None`."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer if isinstance(optimizer, SAM) else None

"""Momentum-SAM: sharpness-aware training at the cost of plain training.

Becker, Altrock & Buchholz, "Momentum-SAM: Sharpness Aware Minimization
without Computational Overhead", arXiv 2401.12033; the authors' code
MarlonBecker/MSAM (`optimizer/msam.py`, `optimizer/adamW_msam.py`).
"""

from __future__ import annotations

import keras
from keras import ops

from keras_ssam import sam_math
from keras_ssam._validation import check_number
from keras_ssam.optimizers import SAM

# Base optimizers whose own state holds a gradient average with a known sign:
# (attribute of the per-weight variables, sign of v in it).
_FIRST_MOMENTS = {
    "Adam": ("_momentums", 1.0),
    "AdamW": ("_momentums", 1.0),
    "Nadam": ("_momentums", 1.0),
    "Lamb": ("_momentums", 1.0),
    "Lion": ("_momentums", 1.0),
    "Adamax": ("_m", 1.0),
}


def _base_direction(base_optimizer):
    """`(attribute, sign, description)` of the base optimizer's gradient
    average, or `None` (keras_ssam keeps its own)."""
    # isinstance: on torch Keras hands out backend subclasses (TorchSGD, ...).
    if isinstance(base_optimizer, keras.optimizers.SGD) and base_optimizer.momentum:
        # Keras's SGD stores m <- mu m - lr g: the accumulated gradient is -m / lr.
        return "momentums", -1.0, "the base SGD's momentum"
    for name, (attribute, sign) in _FIRST_MOMENTS.items():
        kind = getattr(keras.optimizers, name, None)
        if kind is not None and isinstance(base_optimizer, kind):
            return attribute, sign, f"the base {type(base_optimizer).__name__}'s first moment"
    return None


@keras.saving.register_keras_serializable(package="keras_ssam")
class MomentumSAM(SAM):
    """Momentum-SAM: one pass per step, at a point ahead along the momentum.

    With `v` the accumulated gradient (the momentum), one step is:

        e = -rho * v / (||v|| + epsilon)
        g = gradient of the batch loss at w + e      (the step's only pass)
        w <- base_optimizer update of w with g

    The perturbation needs no gradient of its own, so a step costs one
    forward-backward pass, like plain training. `v` is taken from the base
    optimizer's own state where that is a gradient average with a known
    sign: Keras `SGD` with momentum (which stores `m = -lr v`), and the first
    moment of `Adam`, `AdamW`, `Nadam`, `Adamax`, `Lamb` and `Lion` (the
    authors' AdamW form); otherwise (SGD without momentum,
    `ScheduleFreeAdamW`, `Muon`, any other optimizer) keras_ssam keeps its
    own average of the step's gradients, `m <- beta m + (1 - beta) g`, in
    optimizer variables. `direction` says which, and `SAMModel(...,
    diagnostics=True)` prints it when training starts. The first step
    (zero momentum) is a plain step.

    The weights hold `w` between steps (the authors' code keeps them at
    `w + e` and moves them back by hand), so evaluation, callbacks and
    checkpoints see `w`. The pass at `w + e` is the step's only pass: the
    logged loss and metrics are taken there, and it updates BatchNorm
    statistics and draws dropout noise as Keras's own step does. With
    Keras's SGD the direction includes each step's learning rate (`m`
    accumulates `lr g`), which the authors' SGD (`v` accumulates `g`) does
    not: the two differ only under a learning-rate schedule.

    `stable=True` (SSAM) is refused: its factor is the clean gradient's
    norm over the perturbed one's, and a one-pass step never computes the
    clean gradient. `num_batch_splits` is refused (the perturbation does not
    depend on the batch).

    Args:
        base_optimizer: the Keras optimizer that makes the update.
        rho: the perturbation radius `||e||` (a float >= 0, a schedule or a
            callable of the iteration count). The authors' SGD default is
            0.3, their AdamW's 1; MSAM's useful rho is several times SAM's.
        beta: decay of keras_ssam's own gradient average, used only when the
            base optimizer has no usable momentum.
        epsilon: added to `||v||`.
        sam_probability: as in `keras_ssam.SAM` (a step not drawn takes
            its gradient at `w`).
        seed: as in `keras_ssam.SAM`.
        perturb: as in `keras_ssam.SAM`.
        name: name of the optimizer.

    Example:

    ```python
    model = keras_ssam.SAMModel(inner_model)
    model.compile(
        optimizer=keras_ssam.MomentumSAM(keras.optimizers.SGD(0.05, momentum=0.9), rho=0.3),
        loss="sparse_categorical_crossentropy",
    )
    ```
    """

    single_pass = True

    def __init__(
        self,
        base_optimizer: keras.optimizers.Optimizer,
        rho=0.3,
        *,
        beta: float = 0.9,
        epsilon: float = 1e-12,
        stable: bool = False,
        sam_probability=1.0,
        seed: int | None = None,
        perturb="all",
        name: str | None = None,
    ):
        if stable is not False:
            raise ValueError(
                "Argument `stable` is not supported by MomentumSAM: SSAM rescales the "
                "perturbed gradient to the clean gradient's norm, and a one-pass step "
                f"never computes the clean gradient. Received: stable={stable!r}"
            )
        check_number("beta", beta, minimum=0.0)
        if beta >= 1:
            raise ValueError(
                "Argument `beta` must be a finite number >= 0 and < 1 (the decay of the "
                f"gradient average). Received: beta={beta!r}"
            )
        super().__init__(
            base_optimizer, rho, epsilon=epsilon, sam_probability=sam_probability, seed=seed,
            perturb=perturb, name=name,
        )
        self.beta = beta
        found = _base_direction(base_optimizer)
        self._direction_attribute, self._direction_sign = (None, 1.0) if found is None else found[:2]
        self.direction = (
            "keras_ssam's own moving average of the step's gradients" if found is None else found[2]
        )
        self._average = []

    def build_state(self, var_list):
        if self._direction_attribute is None and not self._average:
            self._average = [self.add_variable_from_reference(v, name="msam_average") for v in var_list]

    def state_variables(self):
        return list(self._average)

    def _direction(self):
        if self._direction_attribute is None:
            return [v.value for v in self._average]
        return [v.value for v in getattr(self.base_optimizer, self._direction_attribute)]

    def perturbation_before_gradient(self, weights, *, mask=None):
        if isinstance(self.rho, (int, float)) and self.rho == 0:
            # rho=0 is plain training: the pass runs at w itself.
            return [None] * len(weights), ops.zeros((), "float32")
        direction = self._direction()
        if mask is not None:
            direction = [d if keep else None for d, keep in zip(direction, mask)]
        perturbations, norm = sam_math.momentum_ascent(
            direction, self.current_rho(), sign=self._direction_sign, epsilon=self.epsilon
        )
        perturbations = [None if e is None else ops.cast(e, ops.dtype(w)) for e, w in zip(perturbations, weights)]
        return perturbations, norm

    def next_state(self, grads, perturbed_grads, grad_norm, grad_scale=None):
        if self._direction_attribute is not None:
            return []
        return sam_math.gradient_moving_average(
            [v.value for v in self._average], perturbed_grads, self.beta, grad_scale=grad_scale
        )

    def step_description(self):
        return f"{type(self).__name__}: the perturbation follows {self.direction}."

    def get_config(self):
        config = super().get_config()
        for key in ("normalize", "stable", "adaptive", "eta", "max_scale"):
            config.pop(key)
        config["beta"] = self.beta
        return config

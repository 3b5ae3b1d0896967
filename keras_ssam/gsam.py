"""GSAM: SAM's gradient less the clean gradient's part that widens the gap.

Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan & Liu, "Surrogate
Gap Guided Sharpness-Aware Minimization", ICLR 2022 (arXiv 2203.08065).
"""

from __future__ import annotations

import keras
from keras import ops

from keras_ssam import sam_math
from keras_ssam._validation import check_number
from keras_ssam.optimizers import SAM


@keras.saving.register_keras_serializable(package="keras_ssam")
class GSAM(SAM):
    """Surrogate-gap guided SAM.

    With `g` the clean gradient and `g_asc` the gradient at `w + e` (`e` as
    in `keras_ssam.SAM`; SSAM's `gamma g_asc` when `stable`):

        g_perp = g - (<g, g_asc> / ||g_asc||^2) g_asc
        update = g_asc - alpha * g_perp

    `g_perp` ascends the surrogate gap `L(w + e) - L(w)`; removing it
    lowers the gap while the descent along `g_asc` is kept (Algorithm 1).

    The paper lets rho follow the learning rate: with `rho_min` set,

        rho_t = rho_min + (rho - rho_min) (lr_t - lr_min) / (lr_max - lr_min)

    clipped to `[rho_min, rho]`, with `lr_t` the base optimizer's learning
    rate at the step. The clip guards a warm-up whose learning rate starts
    below `lr_min`, where the formula gives a negative rho
    (google-research/big_vision#80).

    The arguments `base_optimizer`, `rho`, `normalize`, `stable`,
    `adaptive`, `eta`, `max_scale`, `epsilon`, `sam_probability`, `seed`,
    `perturb`, `name` are `keras_ssam.SAM`'s; with `rho_min`, `rho` is
    rho_max.

    Args:
        alpha: weight of the surrogate-gap correction, in [0, 1].
        rho_min: the radius at `lr_min`; `None` keeps `rho` as given.
        lr_max: the learning rate at which rho is `rho` (the peak of the
            schedule); required with `rho_min`.
        lr_min: the learning rate at which rho is `rho_min` (the end of
            the schedule).

    Example:

    ```python
    schedule = keras.optimizers.schedules.CosineDecay(0.0, 10_000,
                                                      warmup_target=0.1,
                                                      warmup_steps=500)
    optimizer = keras_ssam.GSAM(keras.optimizers.SGD(schedule, momentum=0.9),
                                rho=0.1, alpha=0.3, rho_min=0.02,
                                lr_max=0.1, lr_min=0.0)
    ```
    """

    def __init__(
        self,
        base_optimizer: keras.optimizers.Optimizer,
        rho: float = 0.05,
        *,
        alpha: float = 0.4,
        rho_min: float | None = None,
        lr_max: float | None = None,
        lr_min: float = 0.0,
        **kwargs,
    ):
        check_number("alpha", alpha, minimum=0.0, maximum=1.0)
        if rho_min is None:
            if lr_max is not None or lr_min != 0.0:
                raise ValueError(
                    "Arguments `lr_max` and `lr_min` set the range over which rho "
                    "follows the learning rate, and only apply with `rho_min`. "
                    f"Received: rho_min=None, lr_max={lr_max!r}, lr_min={lr_min!r}"
                )
        else:
            check_number("rho", rho, minimum=0.0)
            check_number("rho_min", rho_min, minimum=0.0, maximum=rho)
            check_number("lr_min", lr_min, minimum=0.0)
            if lr_max is None:
                raise ValueError(
                    "Argument `lr_max` is required with `rho_min`: rho is `rho` "
                    "when the learning rate is `lr_max`. Received: lr_max=None"
                )
            check_number("lr_max", lr_max, minimum=lr_min, allow_equal=False)
        super().__init__(base_optimizer, rho, **kwargs)
        self.alpha = alpha
        self.rho_min = rho_min
        self.lr_max = lr_max
        self.lr_min = lr_min

    def current_rho(self):
        if self.rho_min is None:
            return super().current_rho()
        learning_rate = ops.cast(self.learning_rate, "float32")
        fraction = (learning_rate - self.lr_min) / (self.lr_max - self.lr_min)
        rho = self.rho_min + (self.rho - self.rho_min) * fraction
        return ops.clip(rho, self.rho_min, self.rho)

    def update_gradients(self, grads, perturbed_grads, perturbed_weights, grad_norm, grad_scale=None, *,
                         need_stats=False, overwrite_grads=False, global_grads=None,
                         global_perturbed_grads=None):
        # The coefficient from the global gradients (all-reduced under
        # tf.distribute): u = gamma g_asc, or g on a fallback step.
        coefficient = sam_math.surrogate_gap_coefficient(
            perturbed_grads if global_perturbed_grads is None else global_perturbed_grads,
            grads if global_grads is None else global_grads,
        )
        update, stats = super().update_gradients(
            grads, perturbed_grads, perturbed_weights, grad_norm, grad_scale,
            need_stats=True, overwrite_grads=overwrite_grads,
            global_perturbed_grads=global_perturbed_grads,
        )
        coefficient = ops.where(
            stats["clean_fallback"] > 0,
            ops.ones_like(coefficient),
            coefficient / ops.cast(stats["renorm_factor"], ops.dtype(coefficient)),
        )
        update = sam_math.surrogate_gap_update(update, grads, self.alpha, coefficient=coefficient)
        return update, (stats if need_stats else {})

    def get_config(self):
        config = super().get_config()
        config.update(
            {"alpha": self.alpha, "rho_min": self.rho_min, "lr_max": self.lr_max, "lr_min": self.lr_min}
        )
        return config

"""WSAM: sharpness as a weighted regularization term.

Yue, Jiang, Ye, Gao, Liu & Zhang, "Sharpness-Aware Minimization Revisited:
Weighted Sharpness as a Regularization Term", KDD 2023 (arXiv 2305.15817).
"""

from __future__ import annotations

import keras

from keras_ssam import sam_math
from keras_ssam._validation import check_bool, check_number
from keras_ssam.optimizers import SAM


@keras.saving.register_keras_serializable(package="keras_ssam")
class WSAM(SAM):
    """Weighted SAM: minimizes `L(w) + gamma / (1 - gamma) * (L(w + e) - L(w))`.

    With `g` the clean gradient, `g_asc` the gradient at `w + e` (`e` as in
    `keras_ssam.SAM`; SSAM's `gamma_s g_asc` when `stable`) and
    `a = gamma / (1 - gamma)`:

        decouple=False:  the base optimizer updates w with g + a (g_asc - g)
        decouple=True:   the base optimizer updates w with g, then
                         w <- w - lr * a * (g_asc - g)

    The decoupled form (the paper's Algorithm 1, and the default) keeps the
    sharpness term out of the base optimizer's momentum and preconditioning,
    as AdamW does with weight decay; `lr` is the base optimizer's learning
    rate at the step, and the term is applied on every step (also while the
    base optimizer accumulates gradients), unclipped. gamma = 1/2 without
    decoupling is SAM.

    The arguments `base_optimizer`, `rho`, `normalize`, `stable`,
    `adaptive`, `eta`, `max_scale`, `epsilon`, `sam_probability`, `seed`,
    `perturb`, `name` are `keras_ssam.SAM`'s.

    Args:
        gamma: the sharpness weight, in [0, 1).
        decouple: apply the sharpness term after the base optimizer's
            update instead of through it.

    Example:

    ```python
    optimizer = keras_ssam.WSAM(keras.optimizers.SGD(0.05, momentum=0.9),
                                rho=0.05, gamma=0.9)
    ```
    """

    def __init__(
        self,
        base_optimizer: keras.optimizers.Optimizer,
        rho=0.05,
        *,
        gamma: float = 0.9,
        decouple: bool = True,
        **kwargs,
    ):
        check_number("gamma", gamma, minimum=0.0)
        if gamma >= 1:
            raise ValueError(
                "Argument `gamma` must be a finite number >= 0 and < 1 (the "
                f"sharpness weight is gamma / (1 - gamma)). Received: gamma={gamma!r}"
            )
        check_bool("decouple", decouple)
        super().__init__(base_optimizer, rho, **kwargs)
        self.gamma = gamma
        self.decouple = decouple

    def update_gradients(self, grads, perturbed_grads, *args, **kwargs):
        update, stats = super().update_gradients(grads, perturbed_grads, *args, **kwargs)
        if self.decouple:
            return update, stats  # `split_update` takes the sharpness term out
        return sam_math.weighted_sharpness_gradient(update, grads, self.gamma), stats

    def split_update(self, grads, update):
        if not self.decouple:
            return update, None
        # The base optimizer updates with g; the step subtracts
        # lr * a (u - g) after it (zero on a step without the perturbed pass).
        base = [u if g is None else g for g, u in zip(grads, update)]
        return base, sam_math.decoupled_sharpness_term(update, grads, self.gamma)

    def get_config(self):
        config = super().get_config()
        config.update({"gamma": self.gamma, "decouple": self.decouple})
        return config

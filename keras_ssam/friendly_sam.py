"""Friendly SAM: the ascent along the batch gradient's noise.

Li, Zhou, He, Cheng & Huang, "Friendly Sharpness-Aware Minimization",
CVPR 2024 (arXiv 2403.12350), Algorithm 1.
"""

from __future__ import annotations

import keras

from keras_ssam import sam_math
from keras_ssam._validation import check_number
from keras_ssam.optimizers import SAM


@keras.saving.register_keras_serializable(package="keras_ssam")
class FriendlySAM(SAM):
    """F-SAM: SAM whose ascent leaves out an estimate of the full gradient.

    With `g_t` the clean batch gradient:

        m_t = lmbda m_{t-1} + (1 - lmbda) g_t     (m_0 = 0)
        d_t = g_t - sigma m_t
        e   = rho T^2 d_t / ||T d_t||             (as SAM, on d_t)

    and the update is SAM's (SSAM's `gamma g_asc` when `stable`, gamma with
    the clean `||g_t||`). `m` is an exponential moving average of the batch
    gradients, kept in optimizer variables (save/load resumes exactly),
    updated on the steps that run the perturbed pass. With
    `num_batch_splits`, each chunk's `d` uses its own gradient and `m`
    takes the batch's (the chunks' mean).

    pytorch_optimizer's `FriendlySAM` (and the authors' code) subtract the
    previous average, `d_t = g_t - sigma m_{t-1}`, and start from
    `m_1 = g_1`, `d_1 = g_1`. The first step is the same in both; from the
    second on they differ (by ~50% in `e` in our tests), for every `sigma`:
    the paper's average starts from 0, theirs from `g_1`. This class follows
    the paper.

    The arguments `base_optimizer`, `rho`, `normalize`, `stable`,
    `adaptive`, `eta`, `max_scale`, `epsilon`, `sam_probability`, `seed`,
    `perturb`, `name` are `keras_ssam.SAM`'s.

    Args:
        sigma: weight of the full-gradient estimate removed from the
            ascent, >= 0 (the paper uses 1).
        lmbda: decay of the moving average, in [0, 1).

    Example:

    ```python
    optimizer = keras_ssam.FriendlySAM(keras.optimizers.SGD(0.05, momentum=0.9),
                                       rho=0.1, sigma=1.0, lmbda=0.9)
    ```
    """

    # m_t is linear in g_t: a chunked step averages the chunks' m_t.
    state_averages_over_chunks = True

    def __init__(
        self,
        base_optimizer: keras.optimizers.Optimizer,
        rho=0.05,
        *,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        **kwargs,
    ):
        check_number("sigma", sigma, minimum=0.0)
        check_number("lmbda", lmbda, minimum=0.0)
        if lmbda >= 1:
            raise ValueError(
                "Argument `lmbda` must be a finite number >= 0 and < 1 (the "
                f"moving average's decay). Received: lmbda={lmbda!r}"
            )
        super().__init__(base_optimizer, rho, **kwargs)
        self.sigma = sigma
        self.lmbda = lmbda
        self._momentum = []

    def build_state(self, var_list):
        if not self._momentum:
            self._momentum = [
                self.add_variable_from_reference(v, name="friendly_momentum") for v in var_list
            ]

    def state_variables(self):
        return list(self._momentum)

    def _new_momentum(self, grads, grad_scale):
        return sam_math.gradient_moving_average(
            [v.value for v in self._momentum], grads, self.lmbda, grad_scale=grad_scale
        )

    def perturbation(self, grads, weights, grad_scale=None, *, mask=None, overwrite_grads=False):
        momentum = self._new_momentum(grads, grad_scale)
        # Kept for this step's `next_state` (same gradients), so
        # the average is computed once; in __dict__, untracked by Keras.
        self.__dict__["_step_momentum"] = (grads, momentum)
        direction = sam_math.friendly_ascent_direction(grads, momentum, self.sigma, grad_scale=grad_scale)
        perturbations, _ = sam_math.sam_perturbation(
            direction, weights, self.current_rho(), normalize=self.normalize,
            adaptive=self.adaptive, eta=self.eta, epsilon=self.epsilon,
            grad_scale=grad_scale, overwrite_grads=True, mask=mask,
        )
        # SSAM's gamma, the fallback and the diagnostics use the clean ||T g||.
        grad_norm = sam_math.weighted_grad_norm(
            grads, weights, adaptive=self.adaptive, eta=self.eta, grad_scale=grad_scale
        )
        return perturbations, grad_norm

    def next_state(self, grads, perturbed_grads, grad_norm, grad_scale=None):
        pending = self.__dict__.pop("_step_momentum", None)
        if pending is not None and pending[0] is grads:
            return pending[1]
        return self._new_momentum(grads, grad_scale)

    def get_config(self):
        config = super().get_config()
        config.update({"sigma": self.sigma, "lmbda": self.lmbda})
        return config

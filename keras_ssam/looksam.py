"""LookSAM: a SAM step every `k` iterations, its direction reused between.

Liu, Mai, Chen, Hsieh & You, "Towards Efficient and Scalable Sharpness-Aware
Minimization", CVPR 2022 (arXiv 2203.02714), Algorithm 1.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_ssam import _kernels, sam_math
from keras_ssam._validation import check_bool, check_int, check_number
from keras_ssam.optimizers import SAM


@keras.saving.register_keras_serializable(package="keras_ssam")
class LookSAM(SAM):
    """SAM's perturbed pass every `k` iterations; in between, one pass.

    With `g` the clean gradient and `g_s` the gradient at `w + e` (`e` as
    in `keras_ssam.SAM`):

        t % k == 0:  update g_s (SSAM's gamma g_s when stable), and store
                     g_v = g_s - (<g, g_s> / ||g||^2) g
        otherwise:   u = g + alpha (||g|| / ||g_v||) g_v,
                     update u (u ||g|| / ||u|| when stable)

    Norms and the projection are over all weights, or per weight tensor
    when `layerwise` (the paper's large-batch variant, and what
    pytorch_optimizer's LookSAM does). `stable=True` carries SSAM's
    renormalization over: every update, reused or not, has the clean
    gradient's norm. The steps in between run only the clean pass, so a
    step costs about `(k + 1) / k` plain steps. `g_v` lives in optimizer
    variables: save/load resumes exactly, mid-cycle too. `sam_probability`
    further thins the SAM steps (both must hold).

    The arguments `base_optimizer`, `rho`, `normalize`, `stable`,
    `adaptive`, `eta`, `max_scale`, `epsilon`, `sam_probability`, `seed`,
    `name` are `keras_ssam.SAM`'s.

    Args:
        k: a perturbed pass every `k` iterations (an int >= 1; iteration 0
            has one).
        alpha: weight of the reused direction, in [0, 1].
        layerwise: norms and projections per weight tensor.

    Example:

    ```python
    model = keras_ssam.SAMModel(inner_model)
    model.compile(
        optimizer=keras_ssam.LookSAM(keras.optimizers.SGD(0.05, momentum=0.9),
                                     rho=0.05, k=5, alpha=0.7),
        loss="sparse_categorical_crossentropy",
    )
    ```
    """

    def __init__(
        self,
        base_optimizer: keras.optimizers.Optimizer,
        rho=0.05,
        *,
        k: int = 5,
        alpha: float = 0.7,
        layerwise: bool = False,
        normalize: bool = True,
        **kwargs,
    ):
        check_int("k", k, 1)
        check_number("alpha", alpha, minimum=0.0, maximum=1.0)
        check_bool("layerwise", layerwise)
        super().__init__(base_optimizer, rho, normalize=normalize, **kwargs)
        self.k = int(k)
        self.alpha = alpha
        self.layerwise = layerwise
        self._orthogonal = []

    def always_runs_perturbed_pass(self):
        return self.k == 1 and super().always_runs_perturbed_pass()

    def runs_perturbed_pass(self, iteration, grad_norm=None):
        drawn = super().runs_perturbed_pass(iteration, grad_norm)
        if self.k == 1 or drawn is False:
            return drawn
        on_cycle = ops.equal(ops.mod(iteration, self.k), 0)
        return on_cycle if drawn is True else ops.logical_and(on_cycle, drawn)

    def host_decision(self, iteration):
        drawn = super().host_decision(iteration)
        return drawn if drawn is None else bool(drawn and iteration % self.k == 0)

    def build_state(self, var_list):
        if not self._orthogonal:
            self._orthogonal = [
                self.add_variable_from_reference(v, name="looksam_orthogonal") for v in var_list
            ]

    def state_variables(self):
        return list(self._orthogonal)

    def skipped_update(self, grads):
        grad_norm = sam_math.global_norm(grads) if self.stable else None
        # The step gives the clean gradients up: torch adds the reused
        # direction in their memory.
        update = sam_math.reuse_orthogonal_component(
            grads, [v.value for v in self._orthogonal], self.alpha, layerwise=self.layerwise,
            overwrite_grads=True,
        )
        if self.stable:
            update = sam_math.rescale_to_norm(update, grad_norm)
        return update

    def next_state(self, grads, perturbed_grads, grad_norm, grad_scale=None):
        orthogonal = sam_math.orthogonal_component(grads, perturbed_grads, layerwise=self.layerwise)
        # A vanished g_s (the step falls back to g) keeps the last direction.
        vanished = sam_math.perturbed_gradient_vanished(
            grad_norm, sam_math.global_norm(perturbed_grads)
        )
        previous = [ops.convert_to_tensor(v.value) for v in self._orthogonal]
        orthogonal = [p if o is None else ops.cast(o, p.dtype) for p, o in zip(previous, orthogonal)]
        # The new directions are this step's own tensors: torch selects in place.
        return _kernels.select_(vanished, previous, orthogonal)

    def get_config(self):
        config = super().get_config()
        config.update({"k": self.k, "alpha": self.alpha, "layerwise": self.layerwise})
        return config

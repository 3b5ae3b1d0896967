"""Random weight perturbation: sharpness-aware training from noise.

Li et al., "Revisiting Random Weight Perturbation for Efficiently Improving
Generalization", TMLR 2024; the authors' code nblt/mARWP
(`train_marwp.py`).
"""

from __future__ import annotations

import random

import keras
from keras import ops

from keras_ssam import perturb as perturb_module
from keras_ssam import sam_math
from keras_ssam._validation import check_bool, check_number
from keras_ssam.backend import backend_module
from keras_ssam.optimizers import SAM


@keras.saving.register_keras_serializable(package="keras_ssam")
class RandomSAM(SAM):
    """Random weight perturbation (RWP), its mixed (m-RWP) and adaptive
    (ARWP) forms.

    With `z` standard normal draws and, for each output unit `j` of a
    weight (Keras keeps output units on the last axis), `W_j = W[..., j]`:

        eps_j = sigma * ||W_j|| * z_j          (a vector or scalar weight:
                                                 its whole norm, + 1e-16)
        g     = gradient of the batch loss at w + eps
        w    <- base_optimizer update of w with g                   (mix=None)
             or with mix * g + (1 - mix) * g(w)                     (mix=lam)

    Without `mix` a step runs one forward-backward pass, at `w + eps`, like
    plain training plus the noise; that pass is the step's only one (its
    loss and metrics are logged, it updates BatchNorm statistics). With
    `mix=lam` (m-RWP) a step runs two passes, the clean one at `w` and one
    at `w + eps`, on the same batch (the authors' code takes the two on
    consecutive batches). With `adaptive=True` (ARWP) the noise of each
    output unit is divided by `sqrt(1 + eta F_j)`, where `F` accumulates the
    squared perturbed gradients, `F <- beta F + g_eps^2` (summed over the
    output unit's slice), kept in optimizer variables.

    The noise of step `t` is drawn from `(seed, t)` alone, so it is
    reproducible, identical on every replica and after a resume, and never
    stored. `perturb=` selects the perturbed weights as on every SAM
    optimizer, and `perturb="merged_lora"` is Flat-LoRA (Li et al., ICML
    2025): after `enable_lora(rank)`, the noise goes on each LoRA layer's
    merged weight `W + (alpha / rank) A B`, scaled by its norms, through the
    frozen `W` (the factors `A`, `B` are trained at the noisy merged
    weight; nothing weight-sized is kept). `sam_probability` skips the
    noise on some steps.

    Args:
        base_optimizer: the Keras optimizer that makes the update.
        sigma: the relative noise scale (a float >= 0, a schedule or a
            callable of the iteration count; the authors use 0.01-0.015).
        mix: `None` (one pass), or the weight `lam` in (0, 1] of the
            perturbed gradient (m-RWP, two passes; the authors use 0.5).
        adaptive: ARWP's noise scaling.
        eta: ARWP's `eta` (the default is the authors' code's); only with
            `adaptive=True`.
        beta: ARWP's `beta`, the decay of `F` (the default is the authors'
            code's); only with `adaptive=True`.
        sam_probability: as in `keras_ssam.SAM`.
        seed: the seed of the noise (and of the `sam_probability` draws);
            drawn from Python's `random` when `None`.
        perturb: as in `keras_ssam.SAM`, or `"merged_lora"` (Flat-LoRA).
        name: name of the optimizer.

    Example:

    ```python
    optimizer = keras_ssam.RandomSAM(keras.optimizers.SGD(0.05, momentum=0.9), sigma=0.01)
    ```
    """

    perturbs_merged_lora = True

    def __init__(
        self,
        base_optimizer: keras.optimizers.Optimizer,
        sigma=0.01,
        *,
        mix: float | None = None,
        adaptive: bool = False,
        eta: float = 1.0,
        beta: float = 0.9,
        sam_probability=1.0,
        seed: int | None = None,
        perturb="all",
        name: str | None = None,
    ):
        if not callable(sigma):
            check_number("sigma", sigma, minimum=0.0)
        if mix is not None:
            check_number("mix", mix, minimum=0.0, maximum=1.0, allow_equal=False)
        check_bool("adaptive", adaptive)
        check_number("eta", eta, minimum=0.0)
        check_number("beta", beta, minimum=0.0)
        if beta >= 1:
            raise ValueError(
                f"Argument `beta` must be a finite number >= 0 and < 1. Received: beta={beta!r}"
            )
        if not adaptive and (eta != 1.0 or beta != 0.9):
            raise ValueError(
                "Arguments `eta` and `beta` only apply to the adaptive noise (ARWP); set "
                f"adaptive=True or leave them. Received: eta={eta!r}, beta={beta!r}, adaptive={adaptive!r}"
            )
        if perturb == "merged_lora" and (mix is not None or adaptive):
            raise ValueError(
                "Argument `perturb='merged_lora'` (Flat-LoRA) takes one pass per step without "
                f"the adaptive noise: use mix=None and adaptive=False. Received: mix={mix!r}, "
                f"adaptive={adaptive!r}"
            )
        if seed is None:
            # As keras.random.SeedGenerator: from Python's `random`, which
            # keras.utils.set_random_seed seeds.
            seed = random.randint(1, 10**9)
        super().__init__(
            base_optimizer, sigma, sam_probability=sam_probability, seed=seed, perturb=perturb, name=name
        )
        self.mix = mix
        self.adaptive_noise = adaptive
        self.noise_eta = eta
        self.noise_beta = beta
        # Without `mix` the noisy pass is the step's only pass.
        self.single_pass = mix is None
        self._fisher = []

    @property
    def sigma(self):
        return self.rho

    def build_state(self, var_list):
        if self.adaptive_noise and not self._fisher:
            self._fisher = [self.add_variable_from_reference(v, name="rwp_fisher") for v in var_list]

    def state_variables(self):
        return list(self._fisher)

    def draw_noise(self, weights):
        """Standard normal draws shaped as `weights`, a function of `(seed,
        iteration)` only. Override to feed other noise in."""
        shapes = [tuple(w.shape) for w in weights]
        sizes = [max(1, int(_size(s))) for s in shapes]
        normals = backend_module("", "keras_ssam").stateless_normal((sum(sizes),), self.seed, self.iterations)
        parts = ops.split(normals, _offsets(sizes)) if len(sizes) > 1 else [normals]
        return [ops.reshape(p[: _size(s)], s) for p, s in zip(parts, shapes)]  # [:0] for an empty weight

    def _noise(self, weights, mask):
        normals = self.draw_noise(weights)
        if mask is not None:
            normals = [z if keep else None for z, keep in zip(normals, mask)]
        fisher = [v.value for v in self._fisher] if self.adaptive_noise else None
        noise = sam_math.filter_wise_noise(weights, normals, self.current_rho(), fisher=fisher, eta=self.noise_eta)
        return [None if e is None else ops.cast(e, ops.dtype(w)) for e, w in zip(noise, weights)]

    def perturbation_before_gradient(self, weights, *, mask=None):
        if self.perturb == "merged_lora":
            return [None] * len(weights), ops.zeros((), "float32")  # see non_trainable_perturbation
        noise = self._noise(weights, mask)
        return noise, sam_math.global_norm(noise)

    def check_model(self, model):
        if self.perturb == "merged_lora" and not perturb_module.lora_layers(model):
            raise ValueError(
                "Argument `perturb='merged_lora'` needs LoRA layers (`layer.enable_lora(rank)` on "
                f"Dense / EinsumDense layers); model {model.name!r} has none."
            )

    def non_trainable_perturbation(self, model, weights, non_trainable_weights):
        """Flat-LoRA (`perturb="merged_lora"`): filter-wise noise on each LoRA
        layer's merged kernel `W + s A B`, scaled by the merged kernel's
        norms, added through the frozen `W` (Li et al., "Flat-LoRA: Low-Rank
        Adaptation over a Flat Loss Landscape", ICML 2025). Drawn from
        `(seed, iteration)` like the rest: nothing weight-sized is kept."""
        if self.perturb != "merged_lora":
            return None
        layers = perturb_module.lora_layers(model)
        trainable = {id(v): i for i, v in enumerate(model.trainable_variables)}
        frozen = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
        merged = []
        for kernel, a, b, scale in layers:
            w = non_trainable_weights[frozen[id(kernel)]]
            product = ops.matmul(weights[trainable[id(a)]], weights[trainable[id(b)]])
            merged.append(ops.cast(w, "float32") + scale * ops.cast(product, "float32"))
        noise = sam_math.filter_wise_noise(merged, self.draw_noise(merged), self.current_rho())
        offsets = [None] * len(non_trainable_weights)
        for (kernel, _, _, _), e in zip(layers, noise):
            offsets[frozen[id(kernel)]] = e
        return offsets

    def perturbation(self, grads, weights, grad_scale=None, *, mask=None, overwrite_grads=False):
        # m-RWP: the noise does not depend on the gradient; the clean norm is
        # for the diagnostics and the fallback.
        return self._noise(weights, mask), sam_math.weighted_grad_norm(grads, weights, grad_scale=grad_scale)

    def update_gradients(self, grads, perturbed_grads, *args, **kwargs):
        update, stats = super().update_gradients(grads, perturbed_grads, *args, **kwargs)
        return sam_math.mixed_gradient(update, grads, self.mix), stats

    def next_state(self, grads, perturbed_grads, grad_norm, grad_scale=None):
        if not self.adaptive_noise:
            return []
        return sam_math.squared_gradient_sum([v.value for v in self._fisher], perturbed_grads, self.noise_beta,
                                             grad_scale=grad_scale)

    def get_config(self):
        config = super().get_config()
        for key in ("normalize", "stable", "adaptive", "eta", "max_scale", "epsilon"):
            config.pop(key)
        config["sigma"] = config.pop("rho")
        config.update({"mix": self.mix, "adaptive": self.adaptive_noise, "eta": self.noise_eta,
                       "beta": self.noise_beta})
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if isinstance(config.get("sigma"), dict):
            config["sigma"] = keras.saving.deserialize_keras_object(config["sigma"], custom_objects=custom_objects)
        return super().from_config(config, custom_objects=custom_objects)


def _size(shape):
    size = 1
    for n in shape:
        size *= n
    return size


def _offsets(sizes):
    offsets, total = [], 0
    for n in sizes[:-1]:
        total += n
        offsets.append(total)
    return offsets

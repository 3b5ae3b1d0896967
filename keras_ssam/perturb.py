"""Which trainable weights a SAM step perturbs: the `perturb=` argument.

Presets:
  "all":       every trainable weight (SAM).
  "no_norm":   all but the weights of normalization layers and biases.
  "norm_only": only the weights of normalization layers (SAM-ON: Mueller et
               al., "Normalization Layers Are All That Sharpness-Aware
               Minimization Needs", NeurIPS 2023).
  "merged_lora": RandomSAM only (Flat-LoRA: Li et al., "Flat-LoRA: Low-Rank
               Adaptation over a Flat Loss Landscape", ICML 2025): the noise
               goes on each LoRA layer's merged weight `W + s A B`, through
               its frozen `W`; no trainable weight is perturbed itself.

A normalization layer is an instance of one of Keras's normalization layers
(`BatchNormalization`, `LayerNormalization`, `GroupNormalization`,
`RMSNormalization`, ...) or of a class whose name ends in `Normalization`
or `Norm` (KerasHub's and users' own, e.g. `RMSNorm`). A bias is a
variable named `bias` or ending in `_bias` (Dense, Conv, EinsumDense, RNN
cells, attention). Anything else, e.g.
`lambda v: "embedding" not in v.path`, is a callable taking the
`keras.Variable` and returning a bool.
"""

from __future__ import annotations

import keras
import numpy as np

PRESETS = ("all", "no_norm", "norm_only", "merged_lora")


def check_perturb(perturb) -> None:
    if callable(perturb) and not isinstance(perturb, str):
        return
    if perturb not in PRESETS:
        raise ValueError(
            f"Argument `perturb` must be one of {PRESETS} or a callable taking a "
            "keras.Variable and returning a bool (True: perturbed). "
            f"Received: perturb={perturb!r}"
        )


def _normalization_types():
    names = (
        "BatchNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "UnitNormalization",
        "RMSNormalization",
    )
    return tuple(getattr(keras.layers, n) for n in names if hasattr(keras.layers, n))


def is_normalization_layer(layer: keras.layers.Layer) -> bool:
    if isinstance(layer, keras.layers.Wrapper):
        return False  # e.g. SpectralNormalization: the weights are the wrapped layer's
    name = type(layer).__name__
    return (
        isinstance(layer, _normalization_types())
        or name.endswith("Normalization")
        or name.endswith("Norm")
    )


def is_bias(variable: keras.Variable) -> bool:
    name = variable.name.rpartition("/")[2]
    return name == "bias" or name.endswith("_bias")


def _layers(model):
    """Every layer inside `model`, itself included, depth first."""
    seen, stack, found = set(), [model], []
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        found.append(layer)
        stack.extend(getattr(layer, "_layers", []))
    return found


def lora_layers(model: keras.Model) -> list:
    """`(frozen_kernel, lora_kernel_a, lora_kernel_b, scale)` for each layer
    of `model` with LoRA enabled (Keras's `Dense` and `EinsumDense` after
    `enable_lora(rank)`), whose merged kernel is
    `frozen_kernel + scale * lora_kernel_a @ lora_kernel_b`, with
    `scale = lora_alpha / lora_rank`."""
    found = []
    for layer in _layers(model):
        if not getattr(layer, "lora_enabled", False):
            continue
        frozen = [v for v in layer.non_trainable_weights if v.name == "kernel"]
        if len(frozen) != 1:
            raise ValueError(
                f"perturb='merged_lora': LoRA layer {layer.name!r} has no single frozen "
                f"'kernel' weight (found {[v.path for v in layer.non_trainable_weights]})."
            )
        found.append((frozen[0], layer.lora_kernel_a, layer.lora_kernel_b, layer.lora_alpha / layer.lora_rank))
    return found


def perturbed_mask(perturb, variables: list, model: keras.Model) -> list | None:
    """A bool per variable of `variables` (True: perturbed), or `None` when
    every variable is.

    Raises:
        ValueError: when the selection leaves no weight perturbed (SAM would
            silently be plain training), or a callable returns a non-bool.
    """
    if perturb == "all":
        return None
    if perturb == "merged_lora":
        # Flat-LoRA: no trainable weight is perturbed itself; RandomSAM
        # perturbs the merged weights W + BA (`lora_layers`).
        return [False] * len(variables)
    if callable(perturb) and not isinstance(perturb, str):
        mask = []
        for v in variables:
            keep = perturb(v)
            if isinstance(keep, np.bool_):
                keep = bool(keep)
            if not isinstance(keep, bool):
                raise ValueError(
                    "Argument `perturb` must return a bool for each variable. "
                    f"Received: perturb({v.path!r}) = {keep!r}"
                )
            mask.append(keep)
    else:
        norm_ids = {
            id(v)
            for layer in _layers(model)
            if is_normalization_layer(layer)
            for v in layer.weights
        }
        in_norm = [id(v) in norm_ids for v in variables]
        if perturb == "norm_only":
            mask = in_norm
        else:
            mask = [not n and not is_bias(v) for n, v in zip(in_norm, variables)]
    if variables and not any(mask):
        raise ValueError(
            f"Argument `perturb={perturb!r}` selects none of the model's "
            f"{len(variables)} trainable weights, so no step would be "
            "sharpness-aware. Select at least one weight, or train without SAM."
        )
    return None if all(mask) else mask

"""One module per Keras backend with only that backend's mechanics.

`<backend>.py` exposes `train_step(model, ...)` with the signature of the
backend's stock `Model.train_step`; the SAM math comes from the optimizer.
`<backend>_hessian.py` holds that backend's gradient and Hessian-vector
product for `keras_ssam.flatness`, and `<backend>_kernels.py` (where there is
one) its faster forms of `keras_ssam._kernels`. `backend_module` picks the one for the
backend Keras runs on.
"""

import importlib
import sys

import keras

SUPPORTED_BACKENDS = ("tensorflow", "jax", "torch")


def backend_module(suffix, feature):
    """`keras_ssam.backend.<backend><suffix>` for Keras's backend; `feature`
    names what needs it in the error for an unsupported backend."""
    name = keras.backend.backend()
    if name not in SUPPORTED_BACKENDS:
        raise NotImplementedError(
            f"{feature} supports the tensorflow, jax and torch backends; "
            f"KERAS_BACKEND is {name!r}."
        )
    # The import system's own cache (no functools cache: the torch step calls
    # this, and torch.compile warns on every traced functools.lru_cache call).
    module = sys.modules.get(f"keras_ssam.backend.{name}{suffix}")
    return module if module is not None else importlib.import_module(f"keras_ssam.backend.{name}{suffix}")


def backend_kernels():
    """`keras_ssam.backend.<backend>_kernels` (the backend's own kernels for
    `keras_ssam._kernels`), or `None` where the backend has none."""
    name = f"keras_ssam.backend.{keras.backend.backend()}_kernels"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:
            raise
        return None

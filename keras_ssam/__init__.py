"""keras_ssam: sharpness-aware training (SAM, USAM, SSAM, ASAM) for Keras 3.

Public API:
    SAM, USAM, SSAM, LookSAM, GSAM, FriendlySAM, WSAM: optimizers wrapping
        any Keras optimizer.
    sam_step_draws: the draws that decide which steps a `sam_probability`
        runs the perturbed pass on.
    StepUpdate: what one SAM step hands to the base optimizer (the variant
        contract, see `keras_ssam.SAM` and docs/architecture.md).
    SAMModel: a `keras.Model` wrapper whose `fit` runs the two SAM passes.
    flatness: Hessian top eigenvalue and trace estimates of a model's loss.
"""

# The packages each Keras backend imports; a missing one means the backend
# Keras selected is not installed (Keras defaults to TensorFlow).
_BACKEND_PACKAGES = {
    "tensorflow": ("tensorflow",),
    "jax": ("jax", "jaxlib"),
    "torch": ("torch",),
}


def _selected_backend():
    """(backend, where Keras took it from), without importing keras."""
    import json
    import os
    import sys

    config = sys.modules.get("keras.src.backend.config")  # imported before the backend
    path = getattr(config, "_config_path", None)
    if path is None:
        home = os.environ.get("KERAS_HOME") or os.path.join(
            os.path.expanduser("~") if os.access(os.path.expanduser("~"), os.W_OK) else "/tmp", ".keras")
        path = os.path.join(home, "keras.json")
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"], "the KERAS_BACKEND environment variable"
    try:
        with open(os.path.expanduser(path)) as f:
            backend = json.load(f).get("backend")
        if backend:
            return backend, f"{path} (KERAS_BACKEND is not set)"
    except (OSError, ValueError, AttributeError):
        pass
    return "tensorflow", "Keras's default (KERAS_BACKEND is not set)"


def _missing_backend_error(err):
    """An ImportError naming KERAS_BACKEND if `err` is the selected backend's package missing, else None."""
    import importlib.util

    backend, source = _selected_backend()
    missing = (err.name or "").partition(".")[0]
    if missing not in _BACKEND_PACKAGES.get(backend, ()):
        return None
    others = [b for b in _BACKEND_PACKAGES if b != backend]
    installed = [b for b in others if importlib.util.find_spec(_BACKEND_PACKAGES[b][0]) is not None]
    example = (installed or [b for b in ("jax", "torch") if b != backend])[0]
    found = f" ({', '.join(installed)} installed here)" if installed else ""
    return ImportError(
        f"keras_ssam could not import Keras: Keras selected the {backend!r} backend (from {source}), "
        f"but the {missing!r} package is not installed. Either select an installed backend with "
        f"KERAS_BACKEND{found}, e.g. `export KERAS_BACKEND={example}`, or install this backend: "
        f'`pip install "keras_ssam[{backend}]"`.'
    )


try:
    import keras  # noqa: F401  (imports the backend's framework)

    from keras_ssam import flatness
    from keras_ssam.friendly_sam import FriendlySAM
    from keras_ssam.gsam import GSAM
    from keras_ssam.looksam import LookSAM
    from keras_ssam.model import SAMModel
    from keras_ssam.momentum_sam import MomentumSAM
    from keras_ssam.optimizers import SAM, SSAM, USAM
    from keras_ssam.random_sam import RandomSAM
    from keras_ssam.schedules import sam_step_draws
    from keras_ssam.step import StepUpdate
    from keras_ssam.tf_keras import SharpnessAwareMinimization
    from keras_ssam.wsam import WSAM
except ModuleNotFoundError as _err:
    _friendly = _missing_backend_error(_err)
    if _friendly is None:
        raise
    raise _friendly from _err

__version__ = "0.2.0"

__all__ = [
    "FriendlySAM",
    "GSAM",
    "LookSAM",
    "MomentumSAM",
    "RandomSAM",
    "SAM",
    "SSAM",
    "SAMModel",
    "SharpnessAwareMinimization",
    "StepUpdate",
    "USAM",
    "WSAM",
    "flatness",
    "sam_step_draws",
    "__version__",
]

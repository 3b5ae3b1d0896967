"""keras_ssam: sharpness-aware training (SAM, USAM, SSAM, ASAM) for Keras 3.

Public API:
    SAM, USAM, SSAM: optimizers wrapping any Keras optimizer.
    SAMModel: a `keras.Model` wrapper whose `fit` runs the two SAM passes.
    flatness: Hessian top eigenvalue and trace estimates of a model's loss.
"""

from keras_ssam import flatness
from keras_ssam.model import SAMModel
from keras_ssam.optimizers import SAM, SSAM, USAM

__version__ = "0.1.0"

__all__ = ["SAM", "SSAM", "SAMModel", "USAM", "flatness", "__version__"]

"""What the toy-objective examples share: an objective f(w) is a Keras model
whose only weight is w and whose output is f(w); the loss returns that output,
so `fit` minimizes f with whichever method the model is compiled with.
"""

import keras

import keras_ssam

METHODS = ("SGD", "SAM", "USAM", "SSAM", "SSAM-norm")


def value_loss(y_true, y_pred):
    """The model's output is the objective: minimize it."""
    del y_true
    return y_pred


def make_optimizer(method, lr, rho):
    """Plain SGD or one of keras_ssam's methods around SGD(lr)."""
    base = keras.optimizers.SGD(learning_rate=lr)
    if method == "SGD":
        return base
    if method == "SAM":
        return keras_ssam.SAM(base, rho=rho)
    if method == "USAM":
        return keras_ssam.USAM(base, rho=rho)
    if method == "SSAM":
        return keras_ssam.SSAM(base, rho=rho)
    if method == "SSAM-norm":
        return keras_ssam.SSAM(base, rho=rho, normalize=True)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")

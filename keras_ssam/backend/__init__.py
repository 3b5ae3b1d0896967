"""One module per Keras backend with only that backend's two-pass mechanics.

Each exposes `train_step(model, ...)` with the signature of the backend's
stock `Model.train_step`; the SAM math comes from the optimizer.
`<backend>_hessian.py` holds that backend's gradient and Hessian-vector
product for `keras_ssam.flatness`.
"""

"""The Keras internals keras_ssam relies on, each with the reason no public
API does the job. Every version `pyproject.toml` declares is tested
(`scripts/test_all_backends.py --keras oldest`), which is what checks them.

Imports (`keras.src`), here only:

- `unscale_loss_for_distribution` (`keras.src.losses.loss`): under
  `tf.distribute` Keras scales each replica's loss by 1 / num_replicas (so
  that summing replicas' gradients gives the mean); the TensorFlow step undoes
  it for logging and diagnostics, as Keras's own TensorFlow train_step does.
  Keras exports no public equivalent. `None` if it moves; the TensorFlow
  backend module then falls back to its own copy.

Private attributes of Keras objects, used by the train steps
(`keras_ssam/backend/<name>.py`, `keras_ssam/step.py`):

- `Model._compute_loss`: the shim over the overridable `compute_loss` that
  Keras's own train steps call; calling `compute_loss` directly skips it
  (and its handling of a user override's signature).
- `Model._loss_tracker`: the `Mean` behind the logged `loss`; a custom
  train step must update it as Keras's does, or `loss` is not logged.
- `Trainer._update_metrics_variables` (JAX): updates the compiled metrics
  statelessly and returns the logs; the stateless counterpart of
  `compute_metrics`, which Keras exports only statefully.
- `Layer._losses_override`: where `stateless_call(..., return_losses=True)`'s
  forward-pass losses go so that `compute_loss` reads them at the perturbed
  weights; Keras's own stateless loss path does the same.
- `Optimizer._trainable_variables` (WSAM's decoupled term, when `apply` is
  called without the variables): the list the base optimizer was built with.
"""

try:
    from keras.src.losses.loss import unscale_loss_for_distribution
except ImportError:  # pragma: no cover - moved in some future Keras
    unscale_loss_for_distribution = None


__all__ = ["unscale_loss_for_distribution"]

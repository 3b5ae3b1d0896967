"""The one place keras_ssam imports Keras internals (`keras.src`).

Everything else imports Keras's public API only. Each name below says why
no public API does the job, and falls back across Keras versions (every
version `pyproject.toml` declares) if the internal name moves or goes.

Private *attributes* of Keras objects used by the train steps
(`Model._compute_loss`, `Model._loss_tracker`, `Layer._losses_override`,
`Trainer._update_metrics_variables`) are not imports and are not listed here;
the oldest-Keras run of the test suite (`scripts/test_all_backends.py
--keras oldest`) is what checks them.
"""

try:
    # Under `tf.distribute` Keras scales each replica's loss by
    # 1 / num_replicas_in_sync (so that summing replicas' gradients gives the
    # mean); this undoes it for logging and diagnostics, as Keras's own
    # TensorFlow train_step does. Keras exports no public equivalent.
    from keras.src.losses.loss import unscale_loss_for_distribution
except ImportError:  # pragma: no cover - moved in some future Keras

    def unscale_loss_for_distribution(value):
        """The same as Keras's (keras/src/losses/loss.py, Keras 3.12-3.15)."""
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
            if num_replicas > 1:
                value = keras.ops.multiply(
                    value, keras.ops.cast(num_replicas, value.dtype)
                )
        return value


__all__ = ["unscale_loss_for_distribution"]

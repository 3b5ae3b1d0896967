"""Data-parallel SAM/SSAM training with keras_ssam on Keras's own engines.

JAX (`keras.distribution.DataParallel`), one host, all its accelerators:

    KERAS_BACKEND=jax python examples/distributed_training.py

TensorFlow (`tf.distribute.MirroredStrategy`), one host, all its GPUs:

    KERAS_BACKEND=tensorflow python examples/distributed_training.py

On a CPU-only machine, simulate devices to try it (what CI does):

    KERAS_BACKEND=jax python examples/distributed_training.py --cpu-devices 4 --epochs 1
    KERAS_BACKEND=tensorflow python examples/distributed_training.py --cpu-devices 2 --epochs 1

Multi-host JAX: start the same command on every host after
`keras.distribution.initialize(job_addresses, num_processes, process_id)`
(pass them with --coordinator, --num-processes, --process-id); every process
feeds its own slice of the global batch. Multi-worker TensorFlow: set
TF_CONFIG on each worker and pass --multi-worker to use
`tf.distribute.MultiWorkerMirroredStrategy` (documented, not tested here).

`--scope global` (default): g, e and SSAM's gamma from the all-reduced
gradient, so the run equals single-device training on the global batch.
`--scope local`: each replica perturbs with its own gradient (m-sharpness).
The torch backend is refused: Keras's torch trainer has no
DistributedDataParallel in `fit`.
"""

import argparse
import os
import sys


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scope", choices=("global", "local"), default="global")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--cpu-devices", type=int, default=0, help="simulate N CPU devices")
    parser.add_argument("--multi-worker", action="store_true")
    parser.add_argument("--coordinator", default=None)
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    return parser.parse_args()


ARGS = parse_args()
BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
if ARGS.cpu_devices:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.cpu_devices}"
if BACKEND == "tensorflow":
    import tensorflow as tf

    if ARGS.cpu_devices:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * ARGS.cpu_devices
        )

import contextlib  # noqa: E402

import keras  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_ssam  # noqa: E402


def strategy_scope():
    """The backend's data-parallel set-up; returns a context for building."""
    if BACKEND == "jax":
        if ARGS.coordinator:
            keras.distribution.initialize(ARGS.coordinator, ARGS.num_processes, ARGS.process_id)
        devices = keras.distribution.list_devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        print(f"JAX DataParallel over {len(devices)} devices")
        return contextlib.nullcontext()
    if BACKEND == "tensorflow":
        if ARGS.multi_worker:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
        else:
            devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
                d.name for d in tf.config.list_logical_devices("CPU")
            ]
            strategy = tf.distribute.MirroredStrategy(devices)
        print(f"tf.distribute with {strategy.num_replicas_in_sync} replicas")
        return strategy.scope()
    sys.exit("The torch backend has no data-parallel fit in Keras; use jax or tensorflow.")


def main():
    digits = load_digits()
    x = (digits.images[..., None] / 16.0).astype("float32")
    y = digits.target.astype("int32")
    n = len(x) // ARGS.batch_size * ARGS.batch_size  # whole global batches
    x, y = x[:n], y[:n]
    keras.utils.set_random_seed(0)
    with strategy_scope():
        inner = keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                keras.layers.Conv2D(16, 3, activation="relu"),
                keras.layers.Flatten(),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
        model = keras_ssam.SAMModel(inner, perturbation_scope=ARGS.scope, diagnostics=True)
        model.compile(
            optimizer=keras_ssam.SSAM(keras.optimizers.SGD(0.05, momentum=0.9), rho=0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    history = model.fit(x, y, batch_size=ARGS.batch_size, epochs=ARGS.epochs, verbose=2)
    final = {k: round(float(v[-1]), 4) for k, v in history.history.items()}
    print(f"scope={ARGS.scope}: {final}")


if __name__ == "__main__":
    main()

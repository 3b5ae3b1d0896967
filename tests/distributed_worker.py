"""Trains the same small model on one device and data-parallel, in one
process with simulated CPU devices, and prints the weights as JSON.

    python tests/distributed_worker.py jax|tensorflow|jax-model-parallel [variants]

With `variants`, trains GSAM (normalized, and stable), FriendlySAM and WSAM
(decoupled) with the global perturbation scope on one device and data
parallel instead; a run that raises records the error and its traceback.

Run in a subprocess by tests/test_distributed.py: the device count has to be
fixed before the backend initializes.
"""

import json
import os
import sys

REPLICAS = 4 if sys.argv[1].startswith("jax") else 2
MODE = sys.argv[1]
os.environ["KERAS_BACKEND"] = "jax" if MODE.startswith("jax") else "tensorflow"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={REPLICAS}"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if MODE == "tensorflow":
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * REPLICAS
    )

import contextlib
import traceback

import keras
import numpy as np

import keras_ssam

BATCH = 16


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4 * BATCH, 6)).astype("float32")
    y = rng.normal(size=(4 * BATCH, 2)).astype("float32")
    return x, y


VARIANTS = {
    "gsam": lambda base: keras_ssam.GSAM(base, rho=0.2, alpha=0.3),
    "gsam_stable": lambda base: keras_ssam.GSAM(base, rho=0.5, alpha=0.3, normalize=False, stable=True),
    "friendly_sam": lambda base: keras_ssam.FriendlySAM(base, rho=0.2, sigma=1.0, lmbda=0.8),
    "wsam_decoupled": lambda base: keras_ssam.WSAM(base, rho=0.2, gamma=0.8, decouple=True),
}


def train(distributed, scope, splits=1, stable=True, variant=None):
    """Weights and History after 2 epochs of 4 batches of SSAM (or SAM, or
    a VARIANTS optimizer)."""
    keras.utils.set_random_seed(0)
    context = contextlib.nullcontext()
    if distributed and MODE == "tensorflow":
        devices = [f"/cpu:{i}" for i in range(REPLICAS)]
        context = tf.distribute.MirroredStrategy(devices).scope()
    elif distributed:
        import jax

        if MODE == "jax-model-parallel":
            mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], jax.devices())
            layouts = keras.distribution.LayoutMap(mesh)
            layouts["dense.*kernel"] = (None, "model")
            dist = keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch")
        else:
            dist = keras.distribution.DataParallel(devices=jax.devices())
        keras.distribution.set_distribution(dist)
    try:
        with context:
            inner = keras.Sequential(
                [
                    keras.Input((6,)),
                    keras.layers.Dense(8, activation="tanh", name="dense_a"),
                    keras.layers.Dense(2, name="dense_b"),
                ]
            )
            model = keras_ssam.SAMModel(
                inner, diagnostics=True, num_batch_splits=splits, perturbation_scope=scope
            )
            base = keras.optimizers.SGD(0.1, momentum=0.9)
            if variant is not None:
                optimizer = VARIANTS[variant](base)
            elif stable:
                optimizer = keras_ssam.SSAM(base, rho=0.5)
            else:
                optimizer = keras_ssam.SAM(base, rho=0.2)
            model.compile(optimizer=optimizer, loss="mse")
        x, y = data()
        history = model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        weights = [np.asarray(w, np.float64).tolist() for w in model.get_weights()]
        result = {"weights": weights, "history": history.history}
        if distributed and MODE == "tensorflow":
            # get_weights reads the first replica's copy: check the others.
            result["replicas_agree"] = all(
                np.array_equal(copies[0].numpy(), c.numpy())
                for copies in (v.value.values for v in model.trainable_variables)
                for c in copies
            )
        return result
    finally:
        if distributed and MODE != "tensorflow":
            keras.distribution.set_distribution(None)


def train_or_error(*args, **kwargs):
    try:
        return train(*args, **kwargs)
    except Exception as e:  # noqa: BLE001  (reported to the test)
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def main_variants():
    result = {
        name: {
            "single": train_or_error(False, "global", variant=name),
            "global": train_or_error(True, "global", variant=name),
        }
        for name in VARIANTS
    }
    print("RESULT " + json.dumps(result))


def main():
    shards = 2 if MODE == "jax-model-parallel" else REPLICAS
    result = {
        "replicas": shards,
        "single": train(False, "global"),
        "global": train(True, "global"),
        "local": train(True, "local"),
        "single_split": train(False, "global", splits=shards),
        "single_sam": train(False, "global", stable=False),
        "global_sam": train(True, "global", stable=False),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    if sys.argv[2:] == ["variants"]:
        main_variants()
    else:
        main()

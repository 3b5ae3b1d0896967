"""CIFAR-10 with a ResNet-18: SGD, SAM, USAM or SSAM (for GPU users).

    KERAS_BACKEND=jax python examples/cifar10_resnet.py --method SSAM            # full run (GPU)
    KERAS_BACKEND=jax python examples/cifar10_resnet.py --method SAM --epochs 200 --rho 0.05
    KERAS_BACKEND=jax python examples/cifar10_resnet.py --synthetic --steps 3 --width 8   # CI smoke test

The setting of the SSAM paper's CIFAR experiments (Tan et al., "Stabilizing
Sharpness-aware Minimization Through A Simple Renormalization Strategy", JMLR
2025, arXiv 2401.07250): CIFAR-10, a ResNet-18, SGD with momentum 0.9, weight
decay and a cosine learning-rate schedule, with the sharpness-aware variant
chosen by --method:

    SGD    plain SGD (keras.Model)
    SAM    keras_ssam.SAM:  e = rho g / ||g||           (Foret et al. 2021)
    USAM   keras_ssam.USAM: e = rho g                   (the paper's "SAM")
    SSAM   keras_ssam.SSAM: e = rho g, update with gamma g_asc,
           gamma = ||g|| / ||g_asc||                    (the paper's Algorithm 1)

Model: the CIFAR variant of ResNet-18 (He et al. 2016) used by most SAM code:
a 3x3 stem without max pooling, four stages of two basic blocks with
`--width`, 2x, 4x, 8x channels (64 gives the usual 11M parameters), strides
1, 2, 2, 2, BatchNormalization, global average pooling, a linear classifier.
Augmentation (random horizontal flips, random shifts of up to 4 pixels with
zero fill, per image) and per-channel normalization are layers inside the
model, so they run on the accelerator on every backend and are off at
inference; the SAM step's perturbed pass sees the same augmented batch as
the clean pass.

Weight decay is an L2 penalty (wd / 2) ||w||^2 on every kernel and
BatchNormalization scale and offset, i.e. the gradient gets `+ wd * w`
before momentum, as `torch.optim.SGD(weight_decay=wd)` does (Keras's own
`SGD(weight_decay=...)` is decoupled and bypasses momentum, so the same
number decays about 1 / (1 - momentum) times less). Being part of the loss,
it also enters SAM's ascent step.

Data: `keras.datasets.cifar10.load_data()`, which downloads CIFAR-10 once
(about 170 MB) into ~/.keras/datasets; without network access it fails and
the script says so. `--synthetic` trains on random images of the same shape
(no download) for `--steps` steps: a smoke test of the whole pipeline, whose
accuracy means nothing.

Results: no accuracy is claimed here. Numbers must come from your own runs,
reported with the machine (the script prints the backend and device) and the
full command line; the defaults are a common CIFAR-10 ResNet-18 recipe, not
a copy of the paper's hyper-parameters (see its experimental section for
those). The run's history (loss, accuracy, and with --diagnostics
`grad_norm`, `perturbed_grad_norm`, `renorm_factor`, `sharpness` per epoch)
is saved as JSON under --out.
"""

import argparse
import json
import os
import platform
import sys
import time

import keras
import numpy as np

import keras_ssam

METHODS = ("SGD", "SAM", "USAM", "SSAM")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


# -- Model. --


def _conv(filters, kernel, strides, l2):
    return keras.layers.Conv2D(
        filters, kernel, strides=strides, padding="same", use_bias=False,
        kernel_initializer="he_normal", kernel_regularizer=l2,
    )


def _bn(l2):
    return keras.layers.BatchNormalization(
        momentum=0.9, epsilon=1e-5, gamma_regularizer=l2, beta_regularizer=l2
    )


def _basic_block(x, filters, strides, l2):
    shortcut = x
    y = _conv(filters, 3, strides, l2)(x)
    y = _bn(l2)(y)
    y = keras.layers.ReLU()(y)
    y = _conv(filters, 3, 1, l2)(y)
    y = _bn(l2)(y)
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv(filters, 1, strides, l2)(x)
        shortcut = _bn(l2)(shortcut)
    return keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))


def build_resnet18(width=64, weight_decay=5e-4, num_classes=10, augment=True):
    """CIFAR ResNet-18 (basic blocks [2, 2, 2, 2]) with augmentation and
    normalization layers in front; inputs are float images in [0, 1]."""
    l2 = keras.regularizers.L2(weight_decay / 2) if weight_decay else None
    inputs = keras.Input((32, 32, 3))
    x = inputs
    if augment:
        x = keras.layers.RandomFlip("horizontal")(x)
        x = keras.layers.RandomTranslation(
            4 / 32, 4 / 32, fill_mode="constant", interpolation="nearest"
        )(x)
    x = keras.layers.Normalization(
        mean=list(CIFAR_MEAN), variance=[s * s for s in CIFAR_STD]
    )(x)
    x = _conv(width, 3, 1, l2)(x)
    x = _bn(l2)(x)
    x = keras.layers.ReLU()(x)
    for stage, multiplier in enumerate((1, 2, 4, 8)):
        for block in range(2):
            strides = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(x, width * multiplier, strides, l2)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(
        num_classes, kernel_regularizer=l2, bias_regularizer=l2, dtype="float32"
    )(x)
    return keras.Model(inputs, outputs, name=f"resnet18_w{width}")


def make_optimizer(args, steps_per_epoch):
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=args.lr, decay_steps=args.epochs * steps_per_epoch
    )
    base = keras.optimizers.SGD(
        learning_rate=schedule, momentum=args.momentum, nesterov=args.nesterov
    )
    if args.method == "SGD":
        return base
    cls = {"SAM": keras_ssam.SAM, "USAM": keras_ssam.USAM, "SSAM": keras_ssam.SSAM}
    return cls[args.method](base, rho=args.rho)


# -- Data. --


def load_cifar10():
    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as error:  # no network, proxy, disk, ...
        sys.exit(
            f"Could not load CIFAR-10 with keras.datasets.cifar10.load_data(): "
            f"{type(error).__name__}: {error}\nIt downloads about 170 MB once "
            "into ~/.keras/datasets; run where that is possible, or copy the "
            "archive there, or use --synthetic for a smoke test."
        )
    return (
        (x_train.astype("float32") / 255.0, y_train.reshape(-1).astype("int32")),
        (x_test.astype("float32") / 255.0, y_test.reshape(-1).astype("int32")),
    )


def synthetic_cifar10(num_train, num_test, seed):
    rng = np.random.default_rng(seed)
    def images(n):
        return rng.random((n, 32, 32, 3), dtype=np.float32)
    def labels(n):
        return rng.integers(0, 10, size=n).astype("int32")
    return (images(num_train), labels(num_train)), (images(num_test), labels(num_test))


# -- Reporting. --


def describe_device():
    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            devices = jax.devices()
            kinds = sorted({f"{d.platform}:{getattr(d, 'device_kind', '')}" for d in devices})
            return ", ".join(kinds) + f" x{len(devices)}"
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            if gpus:
                names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
                return ", ".join(names)
            return "cpu"
        if backend == "torch":
            import torch

            if torch.cuda.is_available():
                return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            return "cpu"
    except Exception as error:  # a description must never stop a run
        return f"unknown ({type(error).__name__})"
    return "unknown"


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=METHODS, default="SSAM")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1, help="initial learning rate (cosine decay to 0)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--nesterov", action="store_true")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="coupled L2, as torch SGD's weight_decay")
    parser.add_argument("--rho", type=float, default=0.05, help="perturbation radius (not for SGD)")
    parser.add_argument("--width", type=int, default=64, help="channels of the first stage (64: ResNet-18)")
    parser.add_argument("--no-augment", dest="augment", action="store_false")
    parser.add_argument("--diagnostics", action="store_true",
                        help="log grad_norm, perturbed_grad_norm, renorm_factor, sharpness (SAM methods)")
    parser.add_argument("--mixed-precision", action="store_true", help="mixed_float16 policy (GPU)")
    parser.add_argument("--validate-every", type=int, default=10, help="epochs between test-set evaluations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic", action="store_true",
                        help="random data of CIFAR-10's shape, no download; trains --steps steps")
    parser.add_argument("--steps", type=int, default=3, help="training steps with --synthetic")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "width", "steps", "validate_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("lr", "rho"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")

    if args.mixed_precision:
        keras.config.set_dtype_policy("mixed_float16")
    keras.utils.set_random_seed(args.seed)
    if args.synthetic:
        args.epochs = 1
        (x_train, y_train), (x_test, y_test) = synthetic_cifar10(
            args.steps * args.batch_size, args.batch_size, args.seed
        )
    else:
        (x_train, y_train), (x_test, y_test) = load_cifar10()
    steps_per_epoch = -(-len(x_train) // args.batch_size)

    device = describe_device()
    print(
        f"backend {keras.backend.backend()} (keras {keras.__version__}), device {device}, "
        f"host {platform.node()}\n{'synthetic ' if args.synthetic else ''}CIFAR-10: "
        f"train {len(x_train)}, test {len(x_test)}; method {args.method}, epochs "
        f"{args.epochs} x {steps_per_epoch} steps, batch {args.batch_size}, lr {args.lr} "
        f"(cosine), momentum {args.momentum}, weight decay {args.weight_decay}"
        + ("" if args.method == "SGD" else f", rho {args.rho}"),
        flush=True,
    )

    model = build_resnet18(args.width, args.weight_decay, augment=args.augment)
    if args.method != "SGD":
        model = keras_ssam.SAMModel(model, diagnostics=args.diagnostics)
    model.compile(
        optimizer=make_optimizer(args, steps_per_epoch),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    print(f"parameters: {model.count_params():,}")
    timer = EpochTimer()
    start = time.perf_counter()
    history = model.fit(
        x_train, y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        validation_freq=min(args.validate_every, args.epochs),
        callbacks=[timer, keras.callbacks.TerminateOnNaN()],
        verbose=2,
    )
    train_seconds = time.perf_counter() - start
    test_loss, test_accuracy = model.evaluate(x_test, y_test, batch_size=512, verbose=0)

    steady = timer.seconds[1:] or timer.seconds
    print(
        f"\n{args.method}: test accuracy {test_accuracy:.4f}, test loss {test_loss:.4f}, "
        f"{sum(steady) / len(steady):.1f} s/epoch "
        f"({'excl.' if len(timer.seconds) > 1 else 'incl.'} compilation), "
        f"total {train_seconds:.0f} s on {device}"
        + ("  [synthetic data: the accuracy means nothing]" if args.synthetic else "")
    )
    os.makedirs(args.out, exist_ok=True)
    name = f"cifar10_resnet_{args.method}{'_synthetic' if args.synthetic else ''}.json"
    path = os.path.join(args.out, name)
    with open(path, "w") as f:
        json.dump(
            {
                "command": " ".join(sys.argv),
                "backend": keras.backend.backend(),
                "keras": keras.__version__,
                "device": device,
                "host": platform.node(),
                "args": vars(args),
                "test_accuracy": float(test_accuracy),
                "test_loss": float(test_loss),
                "epoch_seconds": timer.seconds,
                "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
            },
            f,
            indent=1,
        )
    print(f"saved {path}")
    return test_accuracy


if __name__ == "__main__":
    main()

"""LoRA fine-tuning with Stable SAM: a tiny KerasHub BERT classifier.

    KERAS_BACKEND=jax python examples/lora_finetune.py             # or tensorflow, torch
    KERAS_BACKEND=jax python examples/lora_finetune.py --steps 3   # smoke run (CI)

What it shows: `backbone.enable_lora(rank)` freezes the whole KerasHub
backbone and adds trainable low-rank factors (`lora_kernel_a`,
`lora_kernel_b`) to its attention query and value projections; the
classification head stays trainable. Wrapped in `keras_ssam.SAMModel` and
compiled with `keras_ssam.SSAM(keras.optimizers.AdamW(...))`, each step
perturbs and updates only those trainable weights: the frozen weights are
never perturbed and never change, and every norm (SSAM's `||g||`, the
logged `grad_norm`) is taken over the trainable weights alone. The script
prints the fraction of weights that are trainable, the training loss before
and after fine-tuning, and checks that the frozen weights did not move (it
exits 1 if they did). See docs/guides/lora.md.

The backbone is built from its constructor arguments (2 layers, hidden size
32 by default) with random weights: nothing is downloaded, no preset, no
tokenizer (the inputs are token ids). The task is generated keyword
spotting: each sequence of random token ids holds one keyword, id 1 or id 2,
which is its class. A real fine-tune would start from a pretrained preset
instead, e.g. `keras_hub.models.BertTextClassifier.from_preset(...)`.

Needs KerasHub, installed without its tensorflow-text dependency (which
would replace tensorflow-cpu with the full tensorflow):
`pip install --no-deps -r requirements-hub.txt`.

Flags: --steps (training steps), --batch-size, --rank, --rho, --lr, --layers,
--hidden, --heads, --seq-len, --vocab, --seed, --json PATH (writes the
printed numbers as JSON).
"""

import argparse
import json
import math
import sys

import keras
import numpy as np

import keras_ssam

try:
    import keras_hub
except ImportError as error:  # keras-hub is not a dependency of keras_ssam
    sys.exit(f"{error}: this example needs KerasHub: pip install --no-deps -r requirements-hub.txt")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=80, help="training steps (batches); 3 for a smoke run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--rho", type=float, default=0.1, help="SSAM's rho (radius rho * ||g||)")
    p.add_argument("--lr", type=float, default=3e-2, help="AdamW learning rate")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--vocab", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def build_classifier(args):
    """A BERT classifier from a small config, random weights, LoRA enabled
    on the backbone (query and value projections of every layer)."""
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=args.vocab,
        num_layers=args.layers,
        num_heads=args.heads,
        hidden_dim=args.hidden,
        intermediate_dim=2 * args.hidden,
        max_sequence_length=args.seq_len,
    )
    classifier = keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=2, preprocessor=None)
    backbone.enable_lora(args.rank)
    return classifier


def make_data(n, args, seed):
    """Token ids (no tokenizer needed) and their labels: each sequence holds
    one keyword, token id 1 (class 0) or 2 (class 1), at a random position
    after the first; the other tokens are random ids 3.. (0 is the padding
    id). The classifier reads the first position's output, which sees the
    keyword only through attention (whose query and value projections LoRA
    adapts)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, args.vocab, size=(n, args.seq_len))
    y = rng.integers(0, 2, size=n)
    ids[np.arange(n), rng.integers(1, args.seq_len, size=n)] = 1 + y
    x = {
        "token_ids": ids.astype("int32"),
        "segment_ids": np.zeros_like(ids, dtype="int32"),
        "padding_mask": np.ones_like(ids, dtype="bool"),
    }
    return x, y.astype("int32")


def snapshot(variables):
    return {v.path: np.array(keras.ops.convert_to_numpy(v)) for v in variables}


def max_change(before, variables):
    after = snapshot(variables)
    return max((float(np.max(np.abs(after[k] - before[k]))) for k in before), default=0.0)


def count(variables):
    return sum(math.prod(v.shape) for v in variables)


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    classifier = build_classifier(args)

    trainable, frozen = classifier.trainable_weights, classifier.non_trainable_weights
    n_trainable, n_total = count(trainable), count(classifier.weights)
    lora_factors = [v for v in trainable if v.name in ("lora_kernel_a", "lora_kernel_b")]
    print(f"backend {keras.backend.backend()}, keras {keras.__version__}, keras_hub {keras_hub.__version__}")
    print(f"weights: {n_total} total, {n_trainable} trainable ({100 * n_trainable / n_total:.2f}%): "
          f"{count(lora_factors)} in {len(lora_factors)} LoRA factors (rank {args.rank}), "
          f"the rest the LoRA layers' biases and the classification head")

    model = keras_ssam.SAMModel(classifier, diagnostics=True)
    model.compile(
        # SSAM's ascent is e = rho * g (radius rho * ||g||, over the trainable
        # weights only), and its descent gradient is rescaled to ||g||.
        optimizer=keras_ssam.SSAM(keras.optimizers.AdamW(args.lr, weight_decay=1e-4), rho=args.rho),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    # One batch shape throughout: each pass is compiled once.
    bs = args.batch_size
    x, y = make_data(args.steps * bs, args, args.seed)
    x_val, y_val = make_data(max(4, args.steps // 4) * bs, args, args.seed + 1)

    frozen_before, lora_before = snapshot(frozen), snapshot(lora_factors)
    before = model.evaluate(x, y, batch_size=bs, verbose=0, return_dict=True)
    val_before = model.evaluate(x_val, y_val, batch_size=bs, verbose=0, return_dict=True)
    history = model.fit(x, y, batch_size=bs, epochs=1, shuffle=False, verbose=0).history
    after = model.evaluate(x, y, batch_size=bs, verbose=0, return_dict=True)
    val_after = model.evaluate(x_val, y_val, batch_size=bs, verbose=0, return_dict=True)

    result = {
        "backend": keras.backend.backend(),
        "steps": args.steps,
        "rank": args.rank,
        "total_params": n_total,
        "trainable_params": n_trainable,
        "trainable_fraction": n_trainable / n_total,
        "lora_params": count(lora_factors),
        "loss_before": float(before["loss"]),
        "loss_after": float(after["loss"]),
        "val_loss_before": float(val_before["loss"]),
        "val_loss_after": float(val_after["loss"]),
        "val_accuracy_before": float(val_before["accuracy"]),
        "val_accuracy_after": float(val_after["accuracy"]),
        "grad_norm": float(history["grad_norm"][0]),
        "sharpness": float(history["sharpness"][0]),
        "frozen_max_abs_change": max_change(frozen_before, frozen),
        "lora_max_abs_change": max_change(lora_before, lora_factors),
    }
    print(f"train loss  before {result['loss_before']:.4f}  after {result['loss_after']:.4f}  ({args.steps} steps)")
    print(f"held-out    loss {result['val_loss_before']:.4f} -> {result['val_loss_after']:.4f}, "
          f"accuracy {result['val_accuracy_before']:.3f} -> {result['val_accuracy_after']:.3f}")
    print(f"mean ||g|| over the trainable weights {result['grad_norm']:.4g}, "
          f"mean sharpness (loss at w+e minus loss at w) {result['sharpness']:.4g}")
    print(f"max |change| of the frozen weights {result['frozen_max_abs_change']:.3g}, "
          f"of the LoRA factors {result['lora_max_abs_change']:.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if result["frozen_max_abs_change"] != 0.0:
        print("FAILED: a frozen weight changed")
        return 1
    print("check passed: the frozen weights did not change")
    return 0


if __name__ == "__main__":
    sys.exit(main())

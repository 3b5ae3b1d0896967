"""The LoRA fine-tuning example (examples/lora_finetune.py) and SAM on a
KerasHub backbone's LoRA layers, on the current backend.

1. The example's quick mode (`--steps 3`) runs as a subprocess and reports
   the weight counts of a tiny BERT with LoRA (checked against the counts
   written out here from the architecture), finite losses, frozen weights
   unchanged and LoRA factors changed.
2. In-process, on the example's model: `backbone.enable_lora` leaves exactly
   the query/value LoRA factors, their biases and the classification head
   trainable; one SSAM step with SGD leaves every frozen weight bit-for-bit
   as it was, and moves the trainable weights by `lr * gamma * g_asc`, whose
   norm is `||g||` over the trainable weights, the logged `grad_norm`
   (SSAM's gamma = ||g|| / ||g_asc||): a `grad_norm` that counted frozen
   weights would not match. `perturb="no_norm"` leaves out the biases.

KerasHub is installed without its dependencies (requirements-hub.txt: its
tensorflow-text requirement would replace tensorflow-cpu). These tests skip
only when the running Keras is older than the installed keras-hub declares
it needs (e.g. `--keras oldest` with a keras-hub that needs a newer Keras);
a missing keras-hub is an error, not a skip.
"""

import importlib.metadata
import importlib.util
import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import BACKEND
from keras import ops
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "lora_finetune.py")
INSTALL = "pip install --no-deps -r requirements-hub.txt"


def _keras_hub_status():
    """(None, None) when keras_hub can be used here, else ("fail" | "skip", reason)."""
    try:
        dist = importlib.metadata.distribution("keras-hub")
    except importlib.metadata.PackageNotFoundError:
        return "fail", f"keras-hub is not installed; install it with `{INSTALL}`"
    running = Version(keras.__version__)
    for req in map(Requirement, dist.requires or []):
        if req.name == "keras" and (req.marker is None or req.marker.evaluate({"extra": ""})):
            if not req.specifier.contains(running, prereleases=True):
                return "skip", (
                    f"keras-hub {dist.version} requires {req}, and this run uses Keras {keras.__version__}"
                )
    return None, None


STATUS, REASON = _keras_hub_status()


@pytest.fixture(autouse=True)
def _needs_keras_hub():
    if STATUS == "fail":
        pytest.fail(REASON, pytrace=False)
    if STATUS == "skip":
        pytest.skip(REASON)


# The tiny BERT of both tests.
CONFIG = dict(layers=2, hidden=32, heads=2, rank=4, vocab=200, seq_len=16, batch_size=8)


def _flags(**overrides):
    cfg = {**CONFIG, **overrides}
    return [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]


def expected_counts(layers, hidden, heads, rank, vocab, seq_len, num_classes=2, **_):
    """(trainable, total) weights of keras_hub's BertTextClassifier with
    intermediate size 2 * hidden after `backbone.enable_lora(rank)`, from the
    architecture: embeddings (token, position, 2 segments, LayerNorm); per
    layer query/key/value/output projections (kernel hidden x hidden, bias),
    two LayerNorms, the feed-forward pair; the pooler; the head. LoRA on the
    query and value projections: A (hidden, heads, rank), B (rank, head_dim)."""
    inter, head_dim = 2 * hidden, hidden // heads
    embeddings = vocab * hidden + seq_len * hidden + 2 * hidden + 2 * hidden
    per_layer = 4 * (hidden * hidden + hidden) + 2 * 2 * hidden + (hidden * inter + inter) + (inter * hidden + hidden)
    pooler = hidden * hidden + hidden
    head = hidden * num_classes + num_classes
    lora_per_projection = hidden * heads * rank + rank * head_dim
    lora = layers * 2 * lora_per_projection
    trainable = lora + layers * 2 * hidden + head  # factors, query/value biases, head
    total = embeddings + layers * per_layer + pooler + head + lora
    return trainable, total


# --------------------------------------------------------------------------
# 1. The example's quick mode
# --------------------------------------------------------------------------


def test_example_quick_mode(tmp_path):
    out_json = tmp_path / "lora.json"
    run = subprocess.run(
        [sys.executable, EXAMPLE, "--steps", "3", *_flags(), "--json", str(out_json)],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, KERAS_BACKEND=BACKEND),
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "check passed: the frozen weights did not change" in run.stdout, run.stdout
    result = json.loads(out_json.read_text())
    assert result["backend"] == BACKEND and result["steps"] == 3

    trainable, total = expected_counts(**CONFIG)
    assert (result["trainable_params"], result["total_params"]) == (trainable, total)
    assert result["trainable_fraction"] == pytest.approx(trainable / total, rel=1e-12)
    assert result["trainable_fraction"] < 0.1  # LoRA: a few percent of the weights
    assert f"({100 * trainable / total:.2f}%)" in run.stdout

    for key in ("loss_before", "loss_after", "val_loss_before", "val_loss_after", "grad_norm", "sharpness"):
        assert math.isfinite(result[key]), (key, result)
    # Two balanced classes, small random logits: the loss starts near ln 2.
    assert abs(result["loss_before"] - math.log(2)) < 0.05, result
    assert result["grad_norm"] > 0
    assert result["frozen_max_abs_change"] == 0.0
    assert result["lora_max_abs_change"] > 0.0


# --------------------------------------------------------------------------
# 2. In-process, on the example's model
# --------------------------------------------------------------------------


def _example_module():
    spec = importlib.util.spec_from_file_location("lora_finetune", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _classifier_and_data(seed=0):
    example = _example_module()
    args = example.parse_args(_flags())
    classifier = example.build_classifier(args)
    x, y = example.make_data(args.batch_size, args, seed)
    return classifier, x, y


def _values(variables):
    return {v.path: np.asarray(ops.convert_to_numpy(v), np.float64) for v in variables}


def _expected_trainable_paths():
    paths = {"logits/kernel", "logits/bias"}
    for i in range(CONFIG["layers"]):
        for proj in ("query", "value"):
            prefix = f"transformer_layer_{i}/self_attention_layer/{proj}/"
            paths |= {prefix + n for n in ("lora_kernel_a", "lora_kernel_b", "bias")}
    return paths


def test_ssam_step_on_hub_backbone_moves_trainable_weights_by_grad_norm():
    import keras_ssam

    lr = 1.0
    classifier, x, y = _classifier_and_data()
    # The weights (non_trainable_variables also hold the dropout RNG state).
    trainable, frozen = classifier.trainable_weights, classifier.non_trainable_weights
    assert {v.path for v in trainable} == _expected_trainable_paths()
    # Every kernel of the backbone is frozen, the LoRA targets' included.
    frozen_paths = {v.path for v in frozen}
    for i in range(CONFIG["layers"]):
        for proj in ("query", "key", "value", "attention_output"):
            assert f"transformer_layer_{i}/self_attention_layer/{proj}/kernel" in frozen_paths

    model = keras_ssam.SAMModel(classifier, diagnostics=True)
    model.compile(
        optimizer=keras_ssam.SSAM(keras.optimizers.SGD(lr), rho=0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    w0, f0 = _values(trainable), _values(frozen)
    logs = model.fit(x, y, batch_size=CONFIG["batch_size"], epochs=1, shuffle=False, verbose=0).history
    w1, f1 = _values(trainable), _values(frozen)

    for path in f0:
        np.testing.assert_array_equal(f1[path], f0[path], err_msg=path)
    grad_norm = float(logs["grad_norm"][0])
    assert float(logs["clean_fallback"][0]) == 0.0
    assert grad_norm > 0 and float(logs["sharpness"][0]) != 0.0
    # SSAM: update = gamma * g_asc with gamma = ||g|| / ||g_asc||, norms over
    # the trainable weights, so ||w1 - w0|| / lr = ||g||. rtol: w1 - w0 of
    # float32 weights carries a rounding of ~1e-7 |w| per element, up to
    # ~1e-5 of |w1 - w0| here.
    step_norm = math.sqrt(sum(np.sum((w1[p] - w0[p]) ** 2) for p in w0)) / lr
    np.testing.assert_allclose(step_norm, grad_norm, rtol=1e-4)
    # ... and it is a real step: the factors B (zero at first) moved.
    assert max(np.max(np.abs(w1[p])) for p in w1 if p.endswith("lora_kernel_b")) > 0


def test_no_norm_on_hub_backbone_perturbs_factors_and_head_kernel():
    import keras_ssam

    classifier, _, _ = _classifier_and_data()
    model = keras_ssam.SAMModel(classifier)
    model.compile(
        optimizer=keras_ssam.SAM(keras.optimizers.SGD(0.1), rho=0.05, perturb="no_norm"),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    mask = model._perturbed_mask()
    perturbed = {v.path for v, keep in zip(model.trainable_variables, mask) if keep}
    assert perturbed == {p for p in _expected_trainable_paths() if not p.endswith("bias")}

"""Data parallelism: JAX keras.distribution and tf.distribute.MirroredStrategy
on simulated CPU devices (a subprocess each: the device count is fixed before
the backend starts), and torch's refusal of multi-process training.

GSAM (normalized and stable), FriendlySAM and WSAM (decoupled) with the
global scope equal the single-device run of the global batch, except
FriendlySAM under tf.distribute with several replicas (its moving average
is optimizer state), which refuses."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import BACKEND

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")


def run_worker(mode, *extra):
    out = subprocess.run(
        [sys.executable, WORKER, mode, *extra], capture_output=True, text=True, timeout=600
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def max_difference(a, b):
    return max(
        float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
        for u, v in zip(a["weights"], b["weights"])
    )


WORKER_MODES = {"jax": ["jax", "jax-model-parallel"], "tensorflow": ["tensorflow"]}


@pytest.fixture(scope="module", params=WORKER_MODES.get(BACKEND, [None]))
def runs(request):
    if request.param is None:
        pytest.skip(f"Keras's {BACKEND} backend has no data-parallel fit")
    return run_worker(request.param)


def test_global_scope_equals_single_device(runs):
    # (tf.distribute) every replica's copy of the weights is the same.
    assert runs["global"].get("replicas_agree", True)
    assert runs["global_sam"].get("replicas_agree", True)
    # float32 sums in a different order: a few ulps of the weights (~1).
    assert max_difference(runs["global"], runs["single"]) < 1e-5
    assert max_difference(runs["global_sam"], runs["single_sam"]) < 1e-5
    for key in ("loss", "grad_norm", "perturbed_grad_norm", "renorm_factor", "sharpness"):
        np.testing.assert_allclose(
            runs["global"]["history"][key], runs["single"]["history"][key], rtol=1e-5
        )


def test_local_scope_perturbs_each_replica_with_its_own_gradient(runs):
    # Per-replica perturbation is m-sharpness with m = number of batch shards.
    assert max_difference(runs["local"], runs["single_split"]) < 1e-5
    # ...and differs from the global scope by far more than that tolerance.
    assert max_difference(runs["local"], runs["global"]) > 1e-2


VARIANT_MODES = {"jax": "jax", "tensorflow": "tensorflow"}
VARIANTS = ("gsam", "gsam_stable", "friendly_sam", "wsam_decoupled")


@pytest.fixture(scope="module")
def variant_runs():
    if BACKEND not in VARIANT_MODES:
        pytest.skip(f"Keras's {BACKEND} backend has no data-parallel fit")
    return run_worker(VARIANT_MODES[BACKEND], "variants")


def _assert_ran(run, what):
    assert "error" not in run, f"{what} raised:\n{run.get('traceback', run.get('error'))}"


@pytest.mark.parametrize(
    "variant",
    [
        v for v in VARIANTS
    ],
)
def test_variant_global_scope_equals_single_device(variant_runs, variant):
    runs = variant_runs[variant]
    _assert_ran(runs["single"], f"{variant} on one device")
    if BACKEND == "tensorflow" and variant == "friendly_sam":
        # F-SAM's moving average of the gradients is optimizer state, which
        # a replica cannot update alone: refused with the reason.
        error = runs["global"].get("error", "")
        assert error.startswith("NotImplementedError: FriendlySAM keeps a direction between steps"), error
        assert "tf.distribute with several replicas" in error and "replicas=2" in error, error
        return
    _assert_ran(runs["global"], f"{variant} data parallel")
    assert runs["global"].get("replicas_agree", True), "the replicas' copies of the weights differ"
    # float32 sums in a different order: a few ulps of the weights (~1).
    assert max_difference(runs["global"], runs["single"]) < 1e-5
    np.testing.assert_allclose(
        runs["global"]["history"]["loss"], runs["single"]["history"]["loss"], rtol=1e-5
    )
    # The variant is not SSAM under another name: its weights differ from
    # the other variants' by far more than the tolerance.
    for other in VARIANTS:
        if other != variant and "error" not in variant_runs[other]["single"]:
            assert max_difference(runs["single"], variant_runs[other]["single"]) > 1e-4, other


def test_torch_refuses_multi_process_training(monkeypatch):
    if BACKEND != "torch":
        pytest.skip("the torch backend's multi-process guard")
    import keras
    import torch

    import keras_ssam

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    model = keras_ssam.SAMModel(keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]))
    model.compile(optimizer=keras_ssam.SAM(keras.optimizers.SGD(0.1)), loss="mse")
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(RuntimeError, match="world_size=2"):
        model.train_on_batch(np.ones((4, 3), "float32"), np.ones((4, 1), "float32"))
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)

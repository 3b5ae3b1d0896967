"""Friction points a new user met, each pinned by a test: the error for a non-SAM optimizer, what
`sam_step_draws` returns, and what the set-up section says (TensorFlow's log noise, torch's CPU build, the
KerasHub step)."""

import os
import re

import keras
import numpy as np
import pytest

import keras_ssam

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def test_non_sam_optimizer_error_names_the_family():
    model = keras_ssam.SAMModel(keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]))
    with pytest.raises(ValueError) as error:
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    message = str(error.value)
    for name in ("SAM", "USAM", "SSAM", "LookSAM", "GSAM", "FriendlySAM", "WSAM"):
        assert re.search(rf"\b{name}\b", message), (name, message)
    assert "keras_ssam.SAM(keras.optimizers.SGD(0.1))" in message  # says what to write instead


def test_sam_step_draws_are_draws_not_decisions():
    """`sam_step_draws(seed, iterations)` returns the float32 uniforms, shaped as `iterations`; the decision is
    `draw < probability`, which is what a training run does (docs/guides/cheaper.md shows the same)."""
    optimizer = keras_ssam.SAM(keras.optimizers.SGD(0.05), sam_probability=0.5, seed=11)
    draws = keras_ssam.sam_step_draws(optimizer.seed, np.arange(12))
    assert draws.dtype == np.float32 and draws.shape == (12,)
    assert np.all((draws >= 0) & (draws < 1))
    one = keras_ssam.sam_step_draws(optimizer.seed, 3)
    assert one.shape == () and one == draws[3]

    x = np.random.default_rng(0).normal(size=(24, 3)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    model = keras_ssam.SAMModel(keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]), diagnostics=True)
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    runs = draws < np.float32(0.5)
    np.testing.assert_allclose(history.history["sam_step_fraction"], runs.reshape(2, 6).mean(axis=1))


def test_setup_section_quiets_tensorflow_and_names_the_cpu_torch_index():
    readme = _read("README.md")
    setup = readme[readme.index("## Set-up"):readme.index("\n## ", readme.index("## Set-up") + 1)]
    assert "TF_CPP_MIN_LOG_LEVEL=2" in setup
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in setup
    for page in ("README.md", "docs/guides/install.md"):
        text = _read(page)
        # The test command installs KerasHub (the LoRA tests) the way requirements-hub.txt says.
        assert "pip install -e \".[all,test]\" && pip install --no-deps -r requirements-hub.txt && " \
               "python scripts/test_all_backends.py" in text, page


def test_ci_runs_the_readme_test_command():
    """.ci/run installs what the README's test command installs, and runs the same test script."""
    ci = _read(".ci/run")
    assert "pip install torch==2.13.0" in ci
    assert "pip install --no-deps -r requirements-hub.txt" in ci
    assert "python scripts/test_all_backends.py" in ci

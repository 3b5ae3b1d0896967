"""What a new user meets: a missing backend package, saving a lambda `rho`, the shipped files."""

import os
import subprocess
import sys
import textwrap
import warnings
from importlib import resources

import keras
import numpy as np
import pytest
from conftest import BACKEND

import keras_ssam

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The package each backend imports first; blocking it looks like "not installed".
_PACKAGE = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[BACKEND]


def _import_keras_ssam_without(blocked):
    """Runs `import keras_ssam` in a fresh interpreter where `blocked` (and its submodules) cannot be found."""
    code = textwrap.dedent(f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == {blocked!r} or name.startswith({blocked!r} + "."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, Block())
        import keras_ssam
    """)
    env = dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_missing_backend_package_names_keras_backend():
    result = _import_keras_ssam_without(_PACKAGE)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: "), result.stderr
    assert "KERAS_BACKEND" in last
    assert f"{BACKEND!r} backend" in last
    assert f"{_PACKAGE!r} package is not installed" in last
    assert f'pip install "keras_ssam[{BACKEND}]"' in last
    # Chained to the original error.
    assert "ModuleNotFoundError" in result.stderr
    assert "direct cause of the following exception" in result.stderr


def test_other_missing_module_is_not_rewritten():
    result = _import_keras_ssam_without("keras")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last == "ModuleNotFoundError: No module named 'keras'", result.stderr
    assert "KERAS_BACKEND" not in result.stderr


def _train_and_save(rho, path):
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    model = keras_ssam.SAMModel(keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]))
    model.compile(optimizer=keras_ssam.SAM(keras.optimizers.SGD(0.1), rho=rho), loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save(path)
    return x, y, caught


def test_lambda_rho_saves_but_loads_only_with_safe_mode_false(tmp_path):
    path = str(tmp_path / "m.keras")
    x, y, caught = _train_and_save(lambda step: 0.05, path)
    assert any("lambda" in str(w.message) for w in caught)  # Keras warns at save time

    with pytest.raises(ValueError, match="deserialization of a Python lambda"):
        keras.models.load_model(path)

    loaded = keras.models.load_model(path, safe_mode=False)
    assert isinstance(loaded, keras_ssam.SAMModel)
    assert loaded.optimizer.rho(0) == 0.05
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)


_RHO_SCALE = 0.05


def test_lambda_rho_loses_the_names_it_refers_to(tmp_path):
    # Only the lambda's code is saved: a name it reads (here a module global) is gone after loading.
    path = str(tmp_path / "m.keras")
    x, y, _ = _train_and_save(lambda step: _RHO_SCALE, path)
    loaded = keras.models.load_model(path, safe_mode=False)
    with pytest.raises(NameError, match="_RHO_SCALE"):
        loaded.optimizer.rho(0)


def test_py_typed_and_license_are_shipped():
    assert resources.files("keras_ssam").joinpath("py.typed").is_file()
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pyproject = f.read()
    assert 'license = "Apache-2.0"' in pyproject
    assert 'license-files = ["LICENSE"]' in pyproject

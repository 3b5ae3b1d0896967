"""Shared test set-up. The backend is chosen by KERAS_BACKEND (see
scripts/test_all_backends.py, which runs the suite once per backend)."""

import os

import keras
import pytest

BACKEND = keras.backend.backend()


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {BACKEND} (KERAS_BACKEND={os.environ.get('KERAS_BACKEND')})"


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts from the same global seed and a clean Keras session."""
    # free_memory=False: a full gc.collect() per test costs ~1 s on torch.
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(1234)
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")

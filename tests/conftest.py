import os
from pathlib import Path

import pyro
import pytest
import torch

from pyrovae.data import load_dataset


@pytest.fixture(autouse=True)
def _fresh_pyro_state(tmp_path, monkeypatch):
    """Each test starts with an empty param store, a fixed seed and its own cache."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    monkeypatch.setenv("PYROVAE_CACHE_DIR", str(tmp_path / "cache"))
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real data sets; tests that need them skip where PYROVAE_DATA_DIR is unset."""
    path = os.environ.get("PYROVAE_DATA_DIR")
    if not path or not Path(path).is_dir():
        pytest.skip("PYROVAE_DATA_DIR is not set to the shared data folder")
    return Path(path)


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits", binarize="none")


@pytest.fixture(scope="session")
def binary_digits():
    return load_dataset("digits", binarize="static", seed=0)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

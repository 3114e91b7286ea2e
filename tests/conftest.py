import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Spawned ranks unpickle test functions by module name: make tests/ importable as a package root.
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def repo_root():
    return REPO_ROOT


@pytest.fixture(autouse=True)
def _torch_global_state_is_left_as_found():
    """A test (or the code it runs in-process) that flips torch's grad mode or default dtype would
    silently change every later test; fail the culprit instead, and restore the state."""
    import torch

    grad, dtype = torch.is_grad_enabled(), torch.get_default_dtype()
    yield
    leaked = []
    if torch.is_grad_enabled() != grad:
        leaked.append(f"grad mode {grad} -> {torch.is_grad_enabled()}")
        torch.set_grad_enabled(grad)
    if torch.get_default_dtype() != dtype:
        leaked.append(f"default dtype {dtype} -> {torch.get_default_dtype()}")
        torch.set_default_dtype(dtype)
    if leaked:
        pytest.fail("test leaked torch global state: " + "; ".join(leaked))

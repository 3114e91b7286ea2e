import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def repo_root():
    return REPO_ROOT


@pytest.fixture(autouse=True)
def _process_global_state_is_left_as_found():
    """A test (or the code it runs in-process) that flips torch's grad mode or default dtype, or
    blocks signals (a mask every later subprocess inherits), would silently change every later
    test; fail the culprit instead, and restore the state."""
    import signal

    import torch

    grad, dtype = torch.is_grad_enabled(), torch.get_default_dtype()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    leaked = []
    now = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    if now != mask:
        leaked.append(f"blocked signals {sorted(mask)} -> {sorted(now)}")
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if torch.is_grad_enabled() != grad:
        leaked.append(f"grad mode {grad} -> {torch.is_grad_enabled()}")
        torch.set_grad_enabled(grad)
    if torch.get_default_dtype() != dtype:
        leaked.append(f"default dtype {dtype} -> {torch.get_default_dtype()}")
        torch.set_default_dtype(dtype)
    # Entry points run in-process (evaluate, generate) flush denormals on purpose, as their own
    # processes should; give the next test IEEE denormals on this thread again.
    from megatron_bloom.distributed.init import surviving_denormals

    if surviving_denormals(1) == 0:
        torch.set_flush_denormal(False)
    if leaked:
        pytest.fail("test leaked torch global state: " + "; ".join(leaked))


def pytest_collection_finish(session):
    """Importing a test module must not block signals either (the subprocesses of every test would
    inherit the mask: a blocked SIGUSR1 once kept a trainer from ever seeing its stop signal)."""
    import signal

    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    if blocked:
        raise pytest.UsageError(f"collecting the tests blocked signals {sorted(blocked)}; "
                                "a module blocks them at import time")

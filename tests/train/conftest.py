"""Shared fixtures of the training-stage tests."""

import pytest


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: two on a busy 2-core machine spin on each other (about 20x
    slower than one in test_finetune.py). Modules opt in with `pytestmark = pytest.mark.usefixtures(...)`."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

import os
import signal

import pytest

try:
    import torch
    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    HAS_CUDA = False

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen
# before triton.jit decorates anything.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # Probing the GPU initialised CUDA in this process: vLLM's engine and worker processes must be spawned, not
    # forked (a forked child cannot use the parent's CUDA context).
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


def pytest_configure(config):
    config.addinivalue_line("markers", "timeout_s(seconds): fail the test if its call runs longer (SIGALRM; the "
                                       "device has no pytest-timeout)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    mark = item.get_closest_marker("timeout_s")
    if mark is None or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"{item.nodeid}: still running after {mark.args[0]} s (timeout_s)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(int(mark.args[0]))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module (restored after it): the codec tests' blocks are tiny (512 x D), and
    extra threads only add spin-wait contention on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

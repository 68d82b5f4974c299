import functools
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
    config.addinivalue_line("markers", "real_flash: keep kakeya_kernels.scratch.flash_varlen unpatched")


@functools.lru_cache(maxsize=None)
def _vllm_flash_available() -> bool:
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func  # noqa: F401
        return HAS_CUDA
    except ImportError:
        return False


@pytest.fixture(autouse=True)
def _reference_flash(request, monkeypatch):
    """Without vLLM's FlashAttention (CPU CI), the ``scratch_fa`` prefill launch calls a torch implementation of
    FlashAttention's paged varlen semantics (tests/kernel_cases.ref_flash_varlen), so its metadata and page views
    are tested here; the GPU suite runs the real one. ``@pytest.mark.real_flash`` opts out."""
    if request.node.get_closest_marker("real_flash") or _vllm_flash_available():
        yield
        return
    try:
        from kakeya_kernels import scratch
    except ImportError:      # a test environment without the package: nothing to patch
        yield
        return
    from tests.kernel_cases import ref_flash_varlen
    monkeypatch.setattr(scratch, "flash_varlen", lambda head_dim: (ref_flash_varlen, 3))
    yield


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

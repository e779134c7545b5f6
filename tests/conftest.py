"""Test configuration.

Triton kernels run on the CPU interpreter unless the caller set TRITON_INTERPRET itself
(the GPU check script sets TRITON_INTERPRET=0). The variable must be set before any
``@triton.jit`` function is created, hence here, at the top of conftest.

Nothing here queries the GPU at import or collection: ``requires_cuda`` tests are
skipped at setup time when torch sees no CUDA device.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import glob  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# scripts/setup.sh installs timm and a matching torchvision here, for the tests only (it says why).
TEST_SITE = os.path.join(sys.prefix, "test-site")
if os.path.isdir(TEST_SITE) and TEST_SITE not in sys.path:
    sys.path.append(TEST_SITE)


def _let_torchvision_import_without_its_ops() -> None:
    """PyPI's x86_64 torchvision is built against the CUDA torch: beside the CPU torch its C++ ops do
    not load, which torchvision allows everywhere but in registering fakes for two of them, so
    `import torchvision` (and with it timm, and transformers where torchvision is installed) stops
    with "operator torchvision::nms does not exist". The tests use none of its ops; declaring the
    two schemas lets the import finish. Nothing is declared where the ops load."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    libs = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    try:
        for lib in libs:
            torch.ops.load_library(lib)
        return
    except OSError:
        pass
    for name in ("nms", "qnms"):
        torch.library.define(f"torchvision::{name}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


_let_torchvision_import_without_its_ops()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires_cuda: needs a CUDA GPU; skipped at setup when none is visible")
    config.addinivalue_line("markers", "triton: runs Triton kernels (on the CPU interpreter unless TRITON_INTERPRET=0)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on a 2-core CPU")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("requires_cuda") is not None and not torch.cuda.is_available():
        pytest.skip("requires a CUDA GPU (none visible to torch)")
    if item.get_closest_marker("triton") is not None:
        from invnext.ops._dispatch import _triton_import_error

        err = _triton_import_error()
        if err:
            pytest.skip(err)


@pytest.fixture
def triton_device() -> torch.device:
    """Where Triton tests put their tensors: the GPU when kernels are compiled, else the CPU interpreter."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 but no CUDA GPU is visible")
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def restore_torch_threads():
    """Put torch's CPU thread count back after a test that changes it (the trainer sets ``threads``)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread(restore_torch_threads):
    """One compute thread: tiny tensors gain nothing from threads, and on a busy 2-core CPU hand-offs stall."""
    torch.set_num_threads(1)


@pytest.fixture(params=["compiled", "cupy"])
def kernels_from(request, monkeypatch):
    """Run a native-kernel test once per kernel source (the compiled module, CuPy/NVRTC); skip a
    source that is not usable here, saying why."""
    from invnext import native

    monkeypatch.setenv(native.SOURCE_ENV, request.param)
    native._reset()
    why = native.unavailable_reason()
    if why is not None:
        native._reset()
        pytest.skip(f"{request.param} kernels unavailable: {why}")
    yield request.param
    native._reset()


@pytest.fixture
def bench_wiring(monkeypatch, triton_device):
    """``stub(module, *timers)`` makes each named timing function of a benchmark module call its
    callable once and report 1 ms, and returns the list of what those calls gave back: a dry run
    that reaches every timed callable, so a GPU slot is not spent finding a wiring error."""
    if triton_device.type != "cpu":
        pytest.skip("a wiring check for the interpreter: on a GPU the benchmark itself runs")

    def stub(module, *timers):
        ran = []

        def once(fn, *_):
            ran.append(fn())
            return (1.0, 1.0, 1.0)

        for name in timers:
            monkeypatch.setattr(module, name, once)
        return ran

    return stub

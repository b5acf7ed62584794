import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter. Triton reads this variable when a
# kernel module is imported, so it is set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=None,
                     help="examples per op of the shape fuzzer (default: each tier's count; "
                          "tests/gpu/sanitize.sh passes a few)")
    parser.addoption("--fuzz-max-keys", type=int, default=None,
                     help="longest sequence the shape fuzzer draws (default: each tier's; "
                          "tests/gpu/sanitize.sh shrinks it for the append fuzzer, whose "
                          "token-by-token appends of 10,000 keys outlast memcheck)")


@pytest.fixture
def fuzz_examples(request):
    """The --fuzz-examples override, or None."""
    return request.config.getoption("--fuzz-examples")


@pytest.fixture
def fuzz_max_keys(request):
    """The --fuzz-max-keys override, or None."""
    return request.config.getoption("--fuzz-max-keys")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import kxops  # noqa: F401  (loads the extension and registers fake kernels / autograd)

# Fuzz profiles: a quick, deterministic one in `make test`; `make fuzz` (KXOPS_FUZZ=long) for
# before a release.
settings.register_profile("quick", max_examples=30, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("KXOPS_FUZZ", "quick"))

# Tolerances per dtype (atol, rtol) for comparing an op against kxops.reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ]),
]


def cuda_with_memory(gib):
    """Marks a test as cuda and skips it unless the GPU has at least `gib` GiB of memory (the
    tests of offsets past 2^31 elements)."""
    enough = (torch.cuda.is_available()
              and torch.cuda.get_device_properties(0).total_memory >= gib * 2**30)
    skip = pytest.mark.skipif(not enough, reason=f"needs a CUDA GPU with {gib} GiB")
    return lambda test: pytest.mark.cuda(skip(test))


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_close(actual, expected, dtype=None):
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True)


def assert_error_rule(ours, theirs, exact, dtype):
    """fp16/bf16 rule (docs/design.md §6): our error against an fp64 result is at most twice
    the error of the reference run at that precision, plus the dtype's tolerance (for exact
    references)."""
    if not exact.numel():
        return
    atol, rtol = TOLERANCES[dtype]
    our_error = (ours.double() - exact).abs().max().item()
    their_error = (theirs.double() - exact).abs().max().item()
    floor = atol + rtol * exact.abs().max().item()
    assert our_error <= 2 * their_error + floor, (our_error, their_error, floor)

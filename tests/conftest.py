"""pytest fixtures and settings; the helpers the tests import live in tests/utils.py."""

import os

# torch.compile's on-disk caches key a graph by its ops, not by the custom ops' fake kernels:
# a cache filled by another build of kxops (another checkout or branch, an older commit) would
# hand back compiled code that asserts that build's output shapes. Tests compile afresh.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import pytest
import torch
from hypothesis import HealthCheck, settings

import kxops  # noqa: F401  (loads the extension and registers fake kernels / autograd)
from tests.utils import DEVICES

# Fuzz profiles: a quick, deterministic one in `make test`; `make fuzz` (KXOPS_FUZZ=long) for
# before a release.
settings.register_profile("quick", max_examples=30, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("KXOPS_FUZZ", "quick"))


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["mkl", "onednn"])
def cpu_gemm(request):
    """The test runs under each CPU GEMM engine of the fused ops (csrc/gemm.h) in turn, in this
    process; the process's own choice is restored after. oneDNN is skipped where torch's oneDNN
    fp32 matmul does not run (CPUs without AVX-512, builds without oneDNN)."""
    from tests.utils import switched

    yield from switched(lambda engine: torch.ops.kxops._set_cpu_gemm_engine(engine),
                        request.param)

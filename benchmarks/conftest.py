"""Shared benchmark fixtures: the devices to run on and a timer that synchronises CUDA."""

import pytest
import torch

import kxops  # noqa: F401

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def size_for(sizes, index):
    """The index-th problem size of this device's list; skip when the device has fewer."""
    if index >= len(sizes):
        pytest.skip("size not benchmarked on this device")
    return sizes[index]


def run_timed(benchmark, fn, device, *, group, provider, nbytes=None, **info):
    """Time ``fn`` (synchronising inside the timed call on CUDA) and label the row."""
    def call():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    call()  # warm-up outside the timing (compilation, allocator)
    benchmark.group = group
    benchmark.extra_info.update(provider=provider, device=device.type, bytes=nbytes, **info)
    benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)

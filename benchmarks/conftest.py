"""Shared benchmark fixtures: the devices to run on and timers that synchronise CUDA."""

import os

import pytest
import torch

import kxops  # noqa: F401

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MODES = ["forward", "backward", "full"]
ROUNDS = 5


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


def size_for(sizes, index):
    """The index-th problem size of this device's list; skip when the device has fewer."""
    if index >= len(sizes):
        pytest.skip("size not benchmarked on this device")
    return sizes[index]


def _synchronised(fn, device):
    def call(*args):
        fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return call


def _label(benchmark, device, provider, nbytes, info):
    benchmark.group = "|".join(str(info[k]) for k in ("op", "mode", "shape", "dtype"))
    benchmark.extra_info.update(provider=provider, device=device.type, bytes=nbytes, **info)


def peak_extra_bytes(fn, device):
    """Peak memory fn allocates above what was allocated before it (CUDA only; None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def saved_for_backward_bytes(fn):
    """Bytes of the tensors autograd keeps for backward while fn runs (inputs and weights
    included; counted once per tensor)."""
    seen = {}

    def pack(t):
        seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def run_timed(benchmark, fn, device, *, provider, nbytes=None, **info):
    """Time ``fn`` (synchronising inside the timed call on CUDA) and label the row."""
    call = _synchronised(fn, device)
    call()  # warm-up outside the timing (compilation, allocator)
    _label(benchmark, device, provider, nbytes, info)
    benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def run_modes(benchmark, mode, loss_of, inputs, device, *, provider, nbytes=None,
              count_saved=False, **info):
    """Time the forward (with grad enabled), the backward alone, or both, of ``loss_of(inputs)``
    (a scalar or a tensor reduced by sum); records peak extra memory of a full step on CUDA
    and, with count_saved, what the forward keeps for backward."""
    inputs = inputs.detach().requires_grad_(True)

    def forward():
        inputs.grad = None
        out = loss_of(inputs)
        return out if out.dim() == 0 else out.sum()

    def full():
        forward().backward()

    info.update(mode=mode)
    info["peak_bytes"] = peak_extra_bytes(full, device) if mode == "full" else None
    if mode == "forward" and count_saved:
        info["saved_bytes"] = saved_for_backward_bytes(forward)
    if mode == "backward":
        call = _synchronised(lambda loss: loss.backward(), device)
        call(forward())  # warm-up
        _label(benchmark, device, provider, nbytes, info)
        # The graph is built in the untimed setup of each round.
        benchmark.pedantic(call, setup=lambda: ((forward(),), {}), rounds=ROUNDS, iterations=1,
                           warmup_rounds=1)
    else:
        run_timed(benchmark, forward if mode == "forward" else full, device, provider=provider,
                  nbytes=nbytes, **info)


# A progress bar over the whole suite when run by `make bench` (benchmarks/run.py).
_progress = None


def pytest_collection_finish(session):
    global _progress
    if os.environ.get("KXOPS_BENCH_PROGRESS"):
        try:
            from tqdm import tqdm
        except ImportError:  # a machine without tqdm just has no bar
            return
        _progress = tqdm(total=len(session.items), desc="make bench", unit="case")


def pytest_runtest_logfinish(nodeid, location):
    if _progress is not None:
        _progress.update(1)

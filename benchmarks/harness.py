"""The benchmark harness every bench_<op>.py uses: problem sizes, timers that pair each round
with the op's peer and synchronise CUDA, and the memory measurements."""

import os
import time

import pytest
import torch

from kxops._info import cpu_gemm_engine, cpu_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# KXOPS_BENCH_QUICK=1 (`benchmarks/run.py --quick`, run by CI): every op and provider once at its
# first (smallest) size, in as few rounds as the renderer needs: a check that the whole pipeline
# works, not a measurement.
QUICK = os.environ.get("KXOPS_BENCH_QUICK", "0") not in ("", "0")
MODES = ["forward", "backward", "full"]
# Rounds per case: as many as fit in about ROUND_SECONDS (the shared CPU's timing noise needs
# many rounds of a fast case), within [MIN_ROUNDS, MAX_ROUNDS].
ROUND_SECONDS = 0.6
MIN_ROUNDS, MAX_ROUNDS = (1, 2) if QUICK else (5, 30)
# On CUDA a round makes k calls and synchronises once, k chosen so that the round lasts about
# CUDA_ROUND_SECONDS: one sync per call (~10 us with the launch) would swamp kernels of a few
# microseconds. Rows report the time per call. CPU rounds make one call.
CUDA_ROUND_SECONDS = 2e-3
MAX_CALLS_PER_ROUND = 50


def size_for(sizes, index):
    """The index-th problem size of this device's list; skip when the device has fewer."""
    if index >= len(sizes):
        pytest.skip("size not benchmarked on this device")
    if QUICK and index > 0:
        pytest.skip("quick run: the first size only")
    return sizes[index]


def _repeated(fn, device, calls):
    """fn called `calls` times (once per argument list when given lists), then a CUDA sync."""
    def call(*arg_lists):
        for args in zip(*arg_lists) if arg_lists else [()] * calls:
            fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return call


def _calls_per_round(fn, device):
    """The calls per round (see CUDA_ROUND_SECONDS); on CUDA, from one more synchronised call."""
    if device.type != "cuda":
        return 1
    seconds = max(_seconds(_repeated(fn, device, 1)), 1e-9)
    return int(min(MAX_CALLS_PER_ROUND, max(1, CUDA_ROUND_SECONDS / seconds)))


def _seconds(call, *args):
    start = time.perf_counter()
    call(*args)
    return time.perf_counter() - start


def _rounds_for(call):
    """Runs call once (a warm-up); returns the number of rounds to time it for."""
    seconds = max(_seconds(call), 1e-9)
    return int(min(MAX_ROUNDS, max(MIN_ROUNDS, ROUND_SECONDS / seconds)))


class Interleaved:
    """The untimed setup of every round: times one call of the op's peer (a noisy neighbour
    on this shared machine slows both alike, so speed-ups come from pairs of adjacent calls)
    and then prepares the provider's call (prepare() returns its arguments)."""

    def __init__(self, peer_call, prepare_peer=lambda: (), prepare=lambda: ()):
        self.peer_call, self.prepare_peer, self.prepare = peer_call, prepare_peer, prepare
        self.peer_ms = []

    def __call__(self):
        if self.peer_call is not None:
            self.peer_ms.append(_seconds(self.peer_call, *self.prepare_peer()) * 1e3)
        return self.prepare(), {}


def machine():
    """The CPU model and the fused ops' CPU GEMM engine (csrc/gemm.h) this process runs, which
    every result row carries."""
    return {"cpu": cpu_model(), "cpu_gemm": cpu_gemm_engine()["engine"] or "none"}


def _label(benchmark, device, provider, nbytes, calls, info):
    benchmark.group = "|".join(str(info[k]) for k in ("op", "mode", "shape", "dtype"))
    benchmark.extra_info.update(provider=provider, device=device.type, bytes=nbytes,
                                calls_per_round=calls, **machine(), **info)


def _pedantic(benchmark, call, setup, rounds):
    benchmark.pedantic(call, setup=setup, rounds=rounds, iterations=1)
    if setup.peer_ms:
        benchmark.extra_info["peer_ms"] = setup.peer_ms


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


_PEAK_RSS_SCRIPT = """
import gc, sys
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
exec(sys.argv[1])
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current resident size
before = status("VmRSS")
exec(sys.argv[2])
print(status("VmHWM") - before)
"""


def peak_rss_growth_bytes(setup, measured, timeout=900):
    """How far the peak resident memory of a fresh Python process rises while it runs the code
    ``measured``, after ``setup`` (imports, inputs) has run: the CPU counterpart of
    peak_extra_bytes, for tests and benchmarks of memory bounds (Linux /proc)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS_SCRIPT, setup, measured],
                          capture_output=True, text=True, timeout=timeout, cwd=root, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"peak_rss_growth_bytes: the measured process failed:\n{done.stderr}")
    return int(done.stdout.split()[-1])


def saved_for_backward_bytes(fn, persistent=()):
    """Bytes of memory that the tensors autograd saves while fn runs keep alive: whole
    storages, each counted once (a saved view keeps its base's storage), leaving out the
    storages of ``persistent`` tensors (parameters: alive whatever the graph holds)."""
    alive_anyway = {t.untyped_storage().data_ptr() for t in persistent}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in alive_anyway:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def run_timed(benchmark, fn, device, *, provider, peer_fn=None, nbytes=None, **info):
    """Time ``fn`` (see CUDA_ROUND_SECONDS for CUDA), each round paired with an untimed-by-
    pytest-benchmark round of ``peer_fn`` (the op's peer; None for the peer itself) whose
    times are recorded for the speed-ups, and label the row."""
    _repeated(fn, device, 1)()  # warm-up outside the timing (compilation, allocator)
    calls = _calls_per_round(fn, device)
    call = _repeated(fn, device, calls)
    peer_call = None
    if peer_fn is not None:
        peer_call = _repeated(peer_fn, device, calls)
        peer_call()
    rounds = _rounds_for(call)
    _label(benchmark, device, provider, nbytes, calls, info)
    _pedantic(benchmark, call, Interleaved(peer_call), rounds)


def run_modes(benchmark, mode, loss_of, inputs, device, *, provider, peer_loss_of=None,
              nbytes=None, count_saved=False, persistent=(), **info):
    """Time the forward (with grad enabled), the backward alone, or both, of ``loss_of(inputs)``
    (a scalar or a tensor reduced by sum), each round paired with the same for
    ``peer_loss_of`` (see run_timed); records peak extra memory of a full step on CUDA and,
    with count_saved, the memory the forward keeps alive for backward (see
    saved_for_backward_bytes)."""
    shared_leaf = inputs.detach().requires_grad_(True)

    def forward_of(fn):
        def forward(leaf=shared_leaf):
            leaf.grad = None
            out = fn(leaf)
            return out if out.dim() == 0 else out.sum()
        return forward

    def full_of(fn):
        forward = forward_of(fn)
        return lambda: forward().backward()

    forward, full = forward_of(loss_of), full_of(loss_of)
    has_peer = peer_loss_of is not None
    info.update(mode=mode)
    info["peak_bytes"] = peak_extra_bytes(full, device) if mode == "full" else None
    if mode == "forward" and count_saved:
        info["saved_bytes"] = saved_for_backward_bytes(forward, persistent)
    if mode == "backward":
        _repeated(full, device, 1)()  # warm-up
        calls = _calls_per_round(full, device)
        call = _repeated(lambda loss: loss.backward(), device, calls)

        def graphs(fn):
            """The untimed part of a round: `calls` graphs, each from its own leaf, so that no
            backward accumulates into another's gradient."""
            forward = forward_of(fn)
            return lambda: ([forward(inputs.detach().requires_grad_(True))
                             for _ in range(calls)],)

        rounds = _rounds_for(lambda: call(*graphs(loss_of)()))  # the forward runs in every round
        if has_peer:
            call(*graphs(peer_loss_of)())
        _label(benchmark, device, provider, nbytes, calls, info)
        setup = Interleaved(call if has_peer else None,
                            prepare_peer=graphs(peer_loss_of) if has_peer else tuple,
                            prepare=graphs(loss_of))
        _pedantic(benchmark, call, setup, rounds)
    else:
        peer = (forward_of if mode == "forward" else full_of)(peer_loss_of) if has_peer else None
        run_timed(benchmark, forward if mode == "forward" else full, device, provider=provider,
                  peer_fn=peer, nbytes=nbytes, **info)

"""GlobalPointer + sparse ZLPR, forward / backward / full: the fused kxops loss (no grid) vs the
materialised path a user writes (the [B, heads, L, L] grid, masked, then
kxops.sparse_zlpr_loss), as L grows. Two forward rows: "forward, no grad" (under torch.no_grad,
inputs not requiring grad: inference, where kxops runs only the logits GEMMs and the row kernel)
and "forward, grad enabled" (inputs requiring grad: kxops then computes the gradients too, in
the forward, and the materialised path records its graph). Peak memory of a full step: on CPU
the growth of the peak resident memory of a fresh process
(benchmarks.harness.peak_rss_growth_bytes), on CUDA the peak allocated. L 512 is the CPU
target shape (B 2, heads 8, D 64, 6 positives, one padded sequence).

Trained-like grid (test_global_pointer_zlpr_trained, B 2, heads 8, L 1024, D 64): the exact
fused loss against the same with the recommended grad_filter 2^-12 (the peer here is the exact
fused path). The grid (trained_problem): every span near -12 (a constant last dimension of q
and k: 4 x -3), small noise elsewhere (q 0.3, k 0.05 per dimension), and per (batch, head)
POSITIVES entity spans (start i, end j) scoring near +4 (q_i += 16 r, k_j += r for a random
unit r), the spans ending one step off near -2.4 (k_{j +- 1} += 0.6 r): those and the positives
survive the filter; the surviving fraction is printed. `python -m
benchmarks.bench_global_pointer_zlpr` prints the two full steps side by side."""

import pytest
import torch

import kxops
from benchmarks.harness import QUICK, peak_rss_growth_bytes, run_modes, run_timed, size_for
from kxops.reference.global_pointer_zlpr import global_pointer_logits

BATCH, HEADS, DIM, POSITIVES = 2, 8, 64, 6
LENGTHS = [128, 256, 512, 1024, 2048, 4096]
PEER = "materialised"
# The materialised path holds the grid, its masked copy and their gradients (about 6 grids of
# fp32 at the peak): skipped where that would pass this many bytes.
MATERIALISED_LIMIT = 4 * 2**30


def problem(length, device):
    """q and k stacked in one leaf [2, B, heads, L, D] (run_modes differentiates one tensor),
    positives, and a mask whose last sequence is padded after 60% of its steps."""
    torch.manual_seed(0)
    qk = torch.randn(2, BATCH, HEADS, length, DIM, device=device)
    qk[0] /= DIM ** 0.5
    positives = torch.randint(0, length * length, (BATCH, HEADS, POSITIVES), device=device)
    mask = torch.ones(BATCH, length, dtype=torch.bool, device=device)
    mask[-1, length * 3 // 5:] = False
    return qk, positives, mask


def q_and_k(qk):
    """q and k unbound from the stacked leaf (its backward stacks the two gradients, one copy,
    where indexing would give each a zero-filled copy of the whole leaf, then add them), or a
    (q, k) pair of separate leaves (the side-by-side comparisons below: a head's q and k are
    separate outputs of its projection)."""
    return qk.unbind(0) if isinstance(qk, torch.Tensor) else qk


def fused(qk, positives, mask):
    q, k = q_and_k(qk)
    return kxops.global_pointer_zlpr_loss(q, k, positives, mask)


def materialised(qk, positives, mask):
    q, k = q_and_k(qk)
    grid = global_pointer_logits(q, k, mask)
    return kxops.sparse_zlpr_loss(grid.flatten(-2), positives)


PROVIDERS = {"kxops": fused, PEER: materialised}

_RSS_SETUP = """
import torch
from benchmarks.bench_global_pointer_zlpr import PROVIDERS, problem
qk, positives, mask = problem({length}, torch.device("cpu"))
qk.requires_grad_(True)
"""


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("length_index", range(len(LENGTHS)))
def test_global_pointer_zlpr(benchmark, device, mode, provider, length_index):
    length = size_for(LENGTHS, length_index)
    fits = 6 * BATCH * HEADS * length * length * 4 <= MATERIALISED_LIMIT
    if provider == PEER and not fits:
        pytest.skip(f"materialised: the grid path would need more than "
                    f"{MATERIALISED_LIMIT / 2**30:.0f} GiB")
    qk, positives, mask = problem(length, device)
    loss_of = PROVIDERS[provider]
    peer_fn = PROVIDERS[PEER]
    shape = str([BATCH, HEADS, length, DIM])
    paired = provider != PEER and fits  # where the peer does not fit, no pairing (no ratio)
    if mode == "forward":
        return timed_forward(benchmark, device, lambda x: loss_of(x, positives, mask), qk,
                             (lambda x: peer_fn(x, positives, mask)) if paired else None,
                             grad=True, provider=provider, op="global_pointer_zlpr",
                             shape=shape, dtype="float32", peer=PEER)
    run_modes(benchmark, mode, lambda x: loss_of(x, positives, mask), qk, device,
              peer_loss_of=(lambda x: peer_fn(x, positives, mask)) if paired else None,
              provider=provider, op="global_pointer_zlpr", shape=shape, dtype="float32",
              peer=PEER)
    if mode == "full" and device.type == "cpu":
        benchmark.extra_info["peak_bytes"] = peak_rss_growth_bytes(
            _RSS_SETUP.format(length=length),
            f"PROVIDERS[{provider!r}](qk, positives, mask).backward()")


def timed_forward(benchmark, device, loss_of, qk, peer_loss_of, *, grad, **info):
    """The forward alone, inputs requiring grad and grad enabled (grad=True) or under
    torch.no_grad with inputs that do not (grad=False), paired with the peer's (see run_timed)."""
    leaf = qk.detach().requires_grad_(grad)

    def call_of(fn):
        def call():
            with torch.set_grad_enabled(grad):
                return fn(leaf)
        return call

    run_timed(benchmark, call_of(loss_of), device,
              peer_fn=call_of(peer_loss_of) if peer_loss_of is not None else None,
              mode="forward, grad enabled" if grad else "forward, no grad", **info)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("length_index", range(len(LENGTHS)))
def test_global_pointer_zlpr_no_grad(benchmark, device, provider, length_index):
    """Inference: the loss under torch.no_grad, at the full rows' lengths."""
    length = size_for(LENGTHS, length_index)
    fits = 6 * BATCH * HEADS * length * length * 4 <= MATERIALISED_LIMIT
    if provider == PEER and not fits:
        pytest.skip("materialised: the grid path does not fit at this length")
    qk, positives, mask = problem(length, device)
    paired = provider != PEER and fits
    timed_forward(benchmark, device, lambda x: PROVIDERS[provider](x, positives, mask), qk,
                  (lambda x: materialised(x, positives, mask)) if paired else None, grad=False,
                  provider=provider, op="global_pointer_zlpr", shape=str([BATCH, HEADS, length,
                                                                          DIM]),
                  dtype="float32", peer=PEER)


GRAD_FILTER = 2.0**-12
TRAINED_LENGTH = 1024


def trained_problem(length, device):
    """The trained-like grid of the module's docstring: qk [2, B, heads, L, D], positives,
    mask (the last sequence padded after 60% of its steps, the entities inside)."""
    gen = torch.Generator().manual_seed(0)
    qk = torch.randn(2, BATCH, HEADS, length, DIM, generator=gen)
    qk[0] *= 0.3
    qk[1] *= 0.05
    qk[0, ..., -1], qk[1, ..., -1] = 4.0, -3.0
    valid = length * 3 // 5
    start = torch.randint(0, valid - 12, (BATCH, HEADS, POSITIVES), generator=gen)
    end = start + torch.randint(1, 10, (BATCH, HEADS, POSITIVES), generator=gen)
    r = torch.nn.functional.normalize(torch.randn(BATCH, HEADS, POSITIVES, DIM - 1,
                                                  generator=gen), dim=-1)
    b, h = torch.meshgrid(torch.arange(BATCH), torch.arange(HEADS), indexing="ij")
    b, h = b[..., None].expand_as(start), h[..., None].expand_as(start)
    qk[0, ..., :-1].index_put_((b, h, start), 16 * r, accumulate=True)
    qk[1, ..., :-1].index_put_((b, h, end), r, accumulate=True)
    for off in (-1, 1):
        qk[1, ..., :-1].index_put_((b, h, end + off), 0.6 * r, accumulate=True)
    mask = torch.ones(BATCH, length, dtype=torch.bool)
    mask[-1, valid:] = False
    return qk.to(device), (start * length + end).to(device), mask.to(device)


def filtered(qk, positives, mask):
    q, k = q_and_k(qk)
    return kxops.global_pointer_zlpr_loss(q, k, positives, mask, grad_filter=GRAD_FILTER)


TRAINED_PROVIDERS = {"kxops": fused, "kxops f=2^-12": filtered, PEER: materialised}


def surviving_fraction(qk, positives, mask):
    """The fraction of the scored spans' gradient entries that survive GRAD_FILTER."""
    with torch.no_grad():
        grid = global_pointer_logits(qk[0], qk[1], mask).flatten(-2)
        grad = torch.ops.kxops.sparse_zlpr(grid, positives, -1, [True], "none", GRAD_FILTER)[1]
    return ((grad != 0).sum() / (grid > -float("inf")).sum()).item()


@pytest.mark.parametrize("provider", list(TRAINED_PROVIDERS))
def test_global_pointer_zlpr_trained(benchmark, device, mode, provider):
    if mode != "full":
        pytest.skip("the trained-like grid times full steps only")
    length = 128 if QUICK else TRAINED_LENGTH
    qk, positives, mask = trained_problem(length, device)
    fraction = surviving_fraction(qk, positives, mask)
    print(f"trained-like GlobalPointer L{length}: {100 * fraction:.4f}% of the scored spans' "
          f"gradient entries survive grad_filter={GRAD_FILTER}")
    benchmark.extra_info["surviving_fraction"] = fraction
    loss_of = TRAINED_PROVIDERS[provider]
    exact = TRAINED_PROVIDERS["kxops"]
    run_modes(benchmark, mode, lambda x: loss_of(x, positives, mask), qk, device,
              peer_loss_of=(lambda x: exact(x, positives, mask)) if provider != "kxops" else None,
              provider=provider, op="global_pointer_zlpr trained-like",
              shape=str([BATCH, HEADS, length, DIM]), dtype="float32", peer="kxops")


def compare_trained(length=TRAINED_LENGTH, rounds=7):
    """Full steps on the trained-like grid, interleaved, side by side (q and k separate
    leaves)."""
    from benchmarks.bench_linear_sparse_zlpr import _cpu_model, _median_step_ms

    qk, positives, mask = trained_problem(length, torch.device("cpu"))
    print(f"CPU: {_cpu_model()}, {torch.get_num_threads()} threads")
    print(f"trained-like GlobalPointer {[BATCH, HEADS, length, DIM]}: "
          f"{100 * surviving_fraction(qk, positives, mask):.4f}% of the gradient entries survive "
          f"grad_filter={GRAD_FILTER}")
    leaves = tuple(t.detach().requires_grad_() for t in qk.unbind(0))

    def step_of(fn):
        def step():
            for leaf in leaves:
                leaf.grad = None
            fn(leaves, positives, mask).backward()
        return step

    steps = {name: step_of(fn) for name, fn in TRAINED_PROVIDERS.items()}
    for step in steps.values():
        step()  # warm-up
    medians = _median_step_ms(steps, rounds)
    for name, ms in medians.items():
        print(f"  {name:20s} {ms:9.1f} ms   {medians['kxops'] / ms:5.2f}x kxops exact   "
              f"{medians[PEER] / ms:5.2f}x materialised")


def compare_lengths(lengths=(128, 256, 512, 1024), rounds=15):
    """The no-grad forward and the full step of kxops and the materialised path per L,
    interleaved, side by side (each timing the mean of enough calls to last a few ms; q and k
    separate leaves)."""
    from benchmarks.bench_linear_sparse_zlpr import _median_step_ms

    def no_grad_of(fn, qk, positives, mask, repeats):
        @torch.no_grad()
        def forward():
            for _ in range(repeats):
                fn(qk, positives, mask)
        return forward

    def full_of(fn, qk, positives, mask, repeats):
        leaves = tuple(t.detach().requires_grad_() for t in qk.unbind(0))

        def step():
            for _ in range(repeats):
                for leaf in leaves:
                    leaf.grad = None
                fn(leaves, positives, mask).backward()
        return step

    for length in lengths:
        problem_args = problem(length, torch.device("cpu"))
        repeats = max(1, 2**20 // (length * length))
        for what, make in (("forward, no grad", no_grad_of), ("full step", full_of)):
            calls = {name: make(fn, *problem_args, repeats) for name, fn in PROVIDERS.items()}
            for call in calls.values():
                call()  # warm-up
            ms = {n: m / repeats for n, m in _median_step_ms(calls, rounds).items()}
            print(f"L{length:5d} {what:17s} kxops {ms['kxops']:8.3f} ms   {PEER} "
                  f"{ms[PEER]:8.3f} ms   {ms[PEER] / ms['kxops']:5.2f}x")


if __name__ == "__main__":
    compare_trained()
    compare_lengths()

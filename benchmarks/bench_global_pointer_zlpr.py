"""GlobalPointer + sparse ZLPR, forward / backward / full: the fused kxops loss (no grid) vs the
materialised path a user writes (the [B, heads, L, L] grid, masked, then
kxops.sparse_zlpr_loss), as L grows. Peak memory of a full step: on CPU the growth of the peak
resident memory of a fresh process (benchmarks.harness.peak_rss_growth_bytes), on CUDA the
peak allocated. L 512 is the issue's CPU target shape (B 2, heads 8, D 64, 6 positives, one
padded sequence)."""

import pytest
import torch

import kxops
from benchmarks.harness import peak_rss_growth_bytes, run_modes, size_for
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


def fused(qk, positives, mask):
    return kxops.global_pointer_zlpr_loss(qk[0], qk[1], positives, mask)


def materialised(qk, positives, mask):
    grid = global_pointer_logits(qk[0], qk[1], mask)
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
    run_modes(benchmark, mode, lambda x: loss_of(x, positives, mask), qk, device,
              peer_loss_of=(lambda x: peer_fn(x, positives, mask)) if paired else None,
              provider=provider, op="global_pointer_zlpr", shape=shape, dtype="float32",
              peer=PEER)
    if mode == "full" and device.type == "cpu":
        benchmark.extra_info["peak_bytes"] = peak_rss_growth_bytes(
            _RSS_SETUP.format(length=length),
            f"PROVIDERS[{provider!r}](qk, positives, mask).backward()")


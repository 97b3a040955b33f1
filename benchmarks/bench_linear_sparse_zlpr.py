"""Fused linear + sparse ZLPR head: kxops.linear_sparse_zlpr_loss (logits one block of rows at a
time) vs the materialised path it replaces, kxops.sparse_zlpr_loss(F.linear(...)) (the peer).
Time of forward / backward / full step at the speed target (N 1024, d 256, C 65536), and time
and peak memory of a full step as the label count grows (N 512, d 64, C 16K -> 1M); the
materialised path is skipped where its step would pass ~4 GiB (the logits, their gradient and
the scaled gradient: 3 x N x C floats)."""

import pytest
import torch
import torch.nn.functional as F

import kxops
from benchmarks.harness import QUICK, peak_rss_growth_bytes, run_modes, size_for

PEER = "materialised"
POSITIVES_PER_ROW = 5
# (rows, features, classes). The first entry is the speed target; the rest the label sweep.
TARGET = (1024, 256, 65536)
SWEEP = [(512, 64, 2**14), (512, 64, 2**16), (512, 64, 2**18), (512, 64, 2**20)]
MATERIALISED_LIMIT = 4 * 2**30  # bytes


def fused(x, w, b, positives):
    return kxops.linear_sparse_zlpr_loss(x, w, positives, b)


def materialised(x, w, b, positives):
    return kxops.sparse_zlpr_loss(F.linear(x, w, b), positives)


PROVIDERS = {"kxops": fused, PEER: materialised}


def materialised_fits(shape):
    rows, _, classes = shape
    return 3 * rows * classes * 4 <= MATERIALISED_LIMIT


def inputs(shape, device):
    rows, features, classes = shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, features, generator=generator).to(device)
    w = (torch.randn(classes, features, generator=generator) * features**-0.5).to(device)
    b = torch.zeros(classes, device=device)
    positives = torch.randint(0, classes, (rows, POSITIVES_PER_ROW), generator=generator)
    return x, w.requires_grad_(), b.requires_grad_(), positives.to(device)


def loss_of(provider, w, b, positives):
    def loss(x):
        w.grad = b.grad = None  # a fresh step each call, not an accumulation
        return PROVIDERS[provider](x, w, b, positives)
    return loss


def cpu_peak_bytes(provider, shape):
    """Peak RSS growth of one full step in a fresh process (the CPU's peak memory)."""
    setup = (f"import torch, torch.nn.functional as F, kxops\n"
             f"from benchmarks.bench_linear_sparse_zlpr import inputs, loss_of\n"
             f"x, w, b, positives = inputs({shape!r}, torch.device('cpu'))\n"
             f"x.requires_grad_()\n"
             f"step = loss_of({provider!r}, w, b, positives)\n")
    return peak_rss_growth_bytes(setup, "step(x).backward()")


def run(benchmark, device, mode, provider, shape):
    if provider == PEER and not materialised_fits(shape):
        pytest.skip("materialised: the step would pass 4 GiB")
    x, w, b, positives = inputs(shape, device)
    peer = None if provider == PEER or not materialised_fits(shape) else loss_of(PEER, w, b,
                                                                                   positives)
    rows, features, classes = shape
    run_modes(benchmark, mode, loss_of(provider, w, b, positives), x, device,
              peer_loss_of=peer, provider=provider, op="linear_sparse_zlpr",
              shape=f"N{rows} d{features} C{classes}", dtype="float32", peer=PEER)
    if mode == "full" and device.type == "cpu":
        benchmark.extra_info["peak_bytes"] = cpu_peak_bytes(provider, shape)


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_linear_sparse_zlpr_target(benchmark, device, mode, provider):
    run(benchmark, device, mode, provider, TARGET if not QUICK else SWEEP[0])


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("size_index", range(len(SWEEP)))
def test_linear_sparse_zlpr_labels(benchmark, device, mode, provider, size_index):
    if mode != "full":
        pytest.skip("the label sweep times full steps only")
    run(benchmark, device, mode, provider, size_for(SWEEP, size_index))

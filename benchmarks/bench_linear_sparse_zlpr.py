"""Fused linear + sparse ZLPR head: kxops.linear_sparse_zlpr_loss (logits one block of rows at a
time) vs the materialised path it replaces, kxops.sparse_zlpr_loss(F.linear(...)) (the peer).
Time of forward / backward / full step at the speed target (N 1024, d 256, C 65536), and time
and peak memory of a full step as the label count grows (N 512, d 64, C 16K -> 1M); the
materialised path is skipped where its step would pass ~4 GiB (the logits, their gradient and
the scaled gradient: 3 x N x C floats).

Trained-like head (test_linear_sparse_zlpr_trained, the same target shape): kxops exact, kxops
with the recommended grad_filter 2^-12 and, where the installed torch has it, torch's own fused
F.linear_cross_entropy (single-label on each row's first positive: a bound on cost, not the same
loss) unchunked and chunked, against the materialised path. The head (trained_inputs): unit
class vectors in clusters of CLUSTER near-duplicates (cosine ~0.5 between mates), each row the
sum of TRAINED_SCALE times its positives' vectors, bias -TRAINED_BIAS: positives sit near +3,
their cluster mates (the hard negatives, scattered over all classes) near -7, the bulk near
-17 +- 2.8; the fraction of gradient entries that survive the filter is printed.

`python -m benchmarks.bench_linear_sparse_zlpr` prints the trained-like full steps side by side
(interleaved medians) and the surviving fraction; `--crossover` measures the density at which
a block's dense GEMMs overtake the sparse products (KXOPS_SPARSE_GRAD_MAX_DENSITY forced)."""

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

GRAD_FILTER = 2.0**-12
CLUSTER, TRAINED_SCALE, TRAINED_BIAS = 4, 20.0, 17.0


def fused_filtered(x, w, b, positives):
    return kxops.linear_sparse_zlpr_loss(x, w, positives, b, grad_filter=GRAD_FILTER)


def torch_linear_cross_entropy(chunked):
    def loss(x, w, b, positives):
        options = torch.nn.LinearCrossEntropyOptions() if chunked else None
        return F.linear_cross_entropy(x, w, positives[:, 0], linear_bias=b, options=options)
    return loss


TRAINED_PROVIDERS = {"kxops": fused, "kxops f=2^-12": fused_filtered, PEER: materialised}
if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
    TRAINED_PROVIDERS["F.linear_cross_entropy"] = torch_linear_cross_entropy(False)
    TRAINED_PROVIDERS["F.linear_cross_entropy chunked"] = torch_linear_cross_entropy(True)


def trained_inputs(shape, device):
    """A trained-like head (see the module's docstring): x, weight, bias, positives."""
    rows, features, classes = shape
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(classes // CLUSTER + 1, features, generator=generator)
    members = torch.arange(classes) // CLUSTER
    w = F.normalize(centers[members] + torch.randn(classes, features, generator=generator),
                    dim=1)
    positives = torch.randint(0, classes, (rows, POSITIVES_PER_ROW), generator=generator)
    x = TRAINED_SCALE * w[positives].sum(1)
    b = torch.full((classes,), -TRAINED_BIAS)
    return (x.to(device), w.to(device).requires_grad_(), b.to(device).requires_grad_(),
            positives.to(device))


def surviving_fraction(x, w, b, positives):
    """The fraction of the logits' gradient entries that survive GRAD_FILTER."""
    with torch.no_grad():
        grad = torch.ops.kxops.sparse_zlpr(F.linear(x, w, b), positives, -1, [True], "none",
                                           GRAD_FILTER)[1]
    return (grad != 0).float().mean().item()


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


def loss_of(provider, w, b, positives, providers=PROVIDERS):
    def loss(x):
        w.grad = b.grad = None  # a fresh step each call, not an accumulation
        return providers[provider](x, w, b, positives)
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


@pytest.mark.parametrize("provider", list(TRAINED_PROVIDERS))
def test_linear_sparse_zlpr_trained(benchmark, device, mode, provider):
    if mode != "full":
        pytest.skip("the trained-like head times full steps only")
    shape = TARGET if not QUICK else SWEEP[0]
    x, w, b, positives = trained_inputs(shape, device)
    peer = None if provider == PEER else loss_of(PEER, w, b, positives, TRAINED_PROVIDERS)
    rows, features, classes = shape
    fraction = surviving_fraction(x, w, b, positives)
    print(f"trained-like N{rows} d{features} C{classes}: {100 * fraction:.3f}% of the "
          f"gradient entries survive grad_filter={GRAD_FILTER}")
    benchmark.extra_info["surviving_fraction"] = fraction
    run_modes(benchmark, mode, loss_of(provider, w, b, positives, TRAINED_PROVIDERS), x, device,
              peer_loss_of=peer, provider=provider, op="linear_sparse_zlpr trained-like",
              shape=f"N{rows} d{features} C{classes}", dtype="float32", peer=PEER)


def _cpu_model():
    import platform

    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _median_step_ms(steps, rounds):
    """Interleaved rounds of every step; the median milliseconds of each."""
    import statistics
    import time

    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def compare_trained(shape=TARGET, rounds=7):
    """Full steps on the trained-like head, interleaved, side by side."""
    x, w, b, positives = trained_inputs(shape, torch.device("cpu"))
    print(f"CPU: {_cpu_model()}, {torch.get_num_threads()} threads")
    print(f"trained-like {shape}: {100 * surviving_fraction(x, w, b, positives):.3f}% of the "
          f"gradient entries survive grad_filter={GRAD_FILTER}")
    leaf = x.detach().requires_grad_()
    losses = {name: loss_of(name, w, b, positives, TRAINED_PROVIDERS)
              for name in TRAINED_PROVIDERS}
    steps = {name: (lambda loss=loss: loss(leaf).backward()) for name, loss in losses.items()}
    for step in steps.values():
        step()  # warm-up
    medians = _median_step_ms(steps, rounds)
    for name, ms in medians.items():
        print(f"  {name:32s} {ms:9.1f} ms   {medians[PEER] / ms:5.2f}x materialised   "
              f"{medians['kxops'] / ms:5.2f}x kxops exact")


def crossover(shape=(512, 256, 65536), densities=(0.001, 0.003, 0.01, 0.02, 0.03, 0.05),
              rounds=5):
    """Full steps with the sparse products forced vs the dense GEMMs forced, at block
    densities set by the bias: a fraction of the classes near 0 (their gradient survives a
    filter of 1e-9), the rest at -40 (dropped)."""
    import os

    rows, features, classes = shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, features, generator=generator).requires_grad_()
    w = (torch.randn(classes, features, generator=generator) * 1e-3).requires_grad_()
    positives = torch.randint(0, classes, (rows, POSITIVES_PER_ROW), generator=generator)
    for density in densities:
        b = torch.where(torch.rand(classes, generator=generator) < density, 0.0, -40.0)

        def step(forced, b=b):
            os.environ["KXOPS_SPARSE_GRAD_MAX_DENSITY"] = forced
            w.grad = x.grad = None
            kxops.linear_sparse_zlpr_loss(x, w, positives, b, grad_filter=1e-9).backward()

        try:
            step("1")
            medians = _median_step_ms({"sparse": lambda: step("1"), "dense": lambda: step("0")},
                                      rounds)
        finally:
            os.environ.pop("KXOPS_SPARSE_GRAD_MAX_DENSITY", None)
        sparse, dense = medians["sparse"], medians["dense"]
        print(f"density {density:6.3f}: sparse {sparse:8.1f} ms  dense {dense:8.1f} ms  "
              f"dense/sparse {dense / sparse:.2f}")


if __name__ == "__main__":
    import sys

    crossover() if "--crossover" in sys.argv else compare_trained()

"""Where the CUDA time of each kxops op goes (to say what bounds a kernel that misses its
target). One representative step per op at the benchmark sizes, as a torch.profiler table of
its kernels; run under Nsight Compute with --ncu for the same calls only:

    python tools/profile_cuda.py [zlpr|sparse_zlpr|adax|gated_conv ...]
    ncu --set full -k regex:'zlpr|adax|gate_' python tools/profile_cuda.py --ncu zlpr
(--ncu makes one call per op, no warm-up: ncu replays each kernel for its metrics anyway)
"""

import argparse

import torch

import kxops


def zlpr_step(sparse):
    logits = torch.randn(4096, 30000, device="cuda", requires_grad=True)
    if sparse:
        positives = torch.randint(0, 30000, (4096, 16), device="cuda")
        return lambda: kxops.sparse_zlpr_loss(logits, positives).backward()
    labels = torch.rand(4096, 30000, device="cuda") < 0.05
    return lambda: kxops.zlpr_loss(logits, labels).backward()


def adax_step():
    params = [torch.randn(100_000, device="cuda", requires_grad=True) for _ in range(200)]
    for p in params:
        p.grad = torch.randn_like(p)
    return kxops.optim.AdaXW(params, fused=True).step


def gated_conv_step():
    x = torch.randn(32, 512, 512, device="cuda", requires_grad=True)
    weight = torch.randn(1024, 512, 3, device="cuda", requires_grad=True)
    bias = torch.zeros(1024, device="cuda", requires_grad=True)
    mask = torch.ones(32, 512, dtype=torch.bool, device="cuda")
    mask[:, 384:] = False
    return lambda: kxops.dilated_gated_conv1d(x, weight, bias, mask, dilation=2).sum().backward()


STEPS = {"zlpr": lambda: zlpr_step(False), "sparse_zlpr": lambda: zlpr_step(True),
         "adax": adax_step, "gated_conv": gated_conv_step}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ops", nargs="*", default=list(STEPS), choices=list(STEPS))
    parser.add_argument("--ncu", action="store_true", help="only run the calls (under ncu)")
    args = parser.parse_args()
    for op in args.ops:
        step = STEPS[op]()
        if args.ncu:
            step()
            torch.cuda.synchronize()
            continue
        for _ in range(3):  # warm-up: allocator, cuBLAS handles, lazy state
            step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"## {op}: 5 steps")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()

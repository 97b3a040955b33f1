"""AdaX-W step: kxops (fused when compiled, foreach) vs torch's AdamW (same bytes per param:
the bandwidth yardstick) and the authors' per-parameter loop."""

import math

import pytest
import torch

import kxops
from benchmarks.harness import run_timed, size_for


class AuthorsAdaXW(torch.optim.Optimizer):
    """The authors' AdaX.py style: one parameter at a time, un-normalised second moment."""

    def __init__(self, params, lr=5e-3, betas=(0.9, 1e-4), eps=1e-12, weight_decay=5e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p),
                                 exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                p.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(1 + beta2).addcmul_(p.grad, p.grad, value=beta2)
                denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
                step_size = group["lr"] * math.sqrt((1 + beta2) ** state["step"] - 1)
                p.addcdiv_(state["exp_avg"], denom, value=-step_size)


class SameBytesCopy:
    """Not an optimizer: a copy moving the step's 28 bytes per fp32 param (14 read, 14
    written), so its GB/s is the device's copy bandwidth measured in the same run."""

    def __init__(self, params):
        numel = sum(p.numel() for p in params)
        self.src = torch.empty(numel * 14 // 4, device=params[0].device)
        self.dst = torch.empty_like(self.src)

    def step(self):
        self.dst.copy_(self.src)


def optimizer_for(provider, params):
    if provider == "kxops_fused" and not kxops.adax.fused_available(params):
        pytest.skip("no compiled AdaX kernel on this device yet")
    return {
        "kxops_fused": lambda: kxops.optim.AdaXW(params, fused=True),
        "kxops_foreach": lambda: kxops.optim.AdaXW(params, foreach=True),
        "adamw_fused": lambda: torch.optim.AdamW(params, fused=True),
        "adamw_foreach": lambda: torch.optim.AdamW(params, foreach=True),
        "authors_loop": lambda: AuthorsAdaXW(params),
        "copy_same_bytes": lambda: SameBytesCopy(params),
    }[provider]()


SIZES = {"cpu": [1_000_000, 4_000_000, 20_000_000], "cuda": [1_000_000, 10_000_000, 100_000_000]}
TENSORS = 200
# Each provider's yardstick, a table of its own (the renderer compares a table with one peer):
# the fused steps against torch's fused AdamW, the foreach step (what foreach=True and the
# fallback run) against torch's foreach AdamW.
PEERS = {"kxops_fused": "adamw_fused", "adamw_fused": "adamw_fused", "authors_loop": "adamw_fused",
         "copy_same_bytes": "adamw_fused", "kxops_foreach": "adamw_foreach",
         "adamw_foreach": "adamw_foreach"}
TABLES = {"adamw_fused": "adax", "adamw_foreach": "adax_foreach"}


def _params_with_grads(numel, device):
    """TENSORS params of numel elements in all, each with a random gradient."""
    params = [torch.nn.Parameter(torch.randn(numel // TENSORS, device=device))
              for _ in range(TENSORS)]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


@pytest.mark.parametrize("provider", list(PEERS))
@pytest.mark.parametrize("size_index", [0, 1, 2])
def test_adax_step(benchmark, device, provider, size_index):
    numel = size_for(SIZES[device.type], size_index)
    params = _params_with_grads(numel, device)
    optimizer = optimizer_for(provider, params)
    peer = PEERS[provider]  # steps the same parameters with its own state
    peer_step = optimizer_for(peer, params).step if provider != peer else None
    # fp32: read p, g, m, v and write p, m, v = 28 bytes per param.
    run_timed(benchmark, optimizer.step, device, provider=provider, peer_fn=peer_step,
              nbytes=28 * numel, op=TABLES[peer], mode="step",
              shape=f"{numel} params / {TENSORS} tensors", dtype="float32", peer=peer)


# --- adax_state: the step and the bytes of optimizer state per param, by state format ---------

def _state_bytes_per_param(optimizer, params):
    """Bytes of optimizer state per param (moments, scales; not the step counts)."""
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                total += value.numel() * value.element_size()
    return total / sum(p.numel() for p in params)


def _eight_bit_peer(provider, params):
    """torchao's or bitsandbytes' 8-bit AdamW, skipped with a note when not installed."""
    if provider == "torchao_adamw8bit":
        optim = pytest.importorskip("torchao.optim", reason="torchao not installed: "
                                    "its AdamW8bit is an optional peer")
        return optim.AdamW8bit(params)
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: its "
                              "AdamW8bit is an optional peer")
    return bnb.optim.AdamW8bit(params)


STATE_PROVIDERS = {
    "kxops_fp32": dict(state_dtype=torch.float32),
    "kxops_bf16": dict(state_dtype=torch.bfloat16),
    "kxops_uint8": dict(state_dtype=torch.uint8),
    "adamw_fused": None,
    "torchao_adamw8bit": None,
    "bitsandbytes_adamw8bit": None,
}
# fp32 params: read p, g; read and write m, v; write p. Bytes per param of each format.
STATE_STEP_BYTES = {"kxops_fp32": 28, "kxops_bf16": 20, "kxops_uint8": 16}
STATE_SIZES = {"cpu": [1_000_000, 20_000_000], "cuda": [1_000_000, 100_000_000]}


@pytest.mark.parametrize("provider", list(STATE_PROVIDERS))
@pytest.mark.parametrize("size_index", [0, 1])
def test_adax_state(benchmark, device, provider, size_index):
    numel = size_for(STATE_SIZES[device.type], size_index)
    params = _params_with_grads(numel, device)
    if provider.startswith("kxops"):
        if not kxops.adax.fused_available(params):
            pytest.skip("no compiled AdaX kernel on this device yet")
        optimizer = kxops.optim.AdaXW(params, fused=True, **STATE_PROVIDERS[provider])
    elif provider == "adamw_fused":
        optimizer = torch.optim.AdamW(params, fused=True)
    else:
        optimizer = _eight_bit_peer(provider, params)
    peer_step = torch.optim.AdamW(params, fused=True).step if provider != "adamw_fused" else None
    optimizer.step()  # the state exists from the first step on
    per_param = _state_bytes_per_param(optimizer, params)
    # The state's size (and on CPU the copy of the kernel that ran, csrc/adax_cpu.h) is part of
    # the row's name: the renderer's tables have no column for it.
    kernel = (f", {torch.ops.kxops._adax_cpu_kernel()}"
              if provider.startswith("kxops") and device.type == "cpu" else "")
    run_timed(benchmark, optimizer.step, device,
              provider=f"{provider} ({per_param:.2f} B/param{kernel})",
              peer_fn=peer_step, nbytes=STATE_STEP_BYTES.get(provider, 28) * numel,
              op="adax_state", mode="step", shape=f"{numel} params / {TENSORS} tensors",
              dtype="float32", peer="adamw_fused (8.00 B/param)")

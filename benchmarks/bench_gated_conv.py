"""Dilated gated conv block, forward+backward: kxops vs the reference, the nn.Conv1d version
users write (with transposes) and its torch.compile."""

import pytest
import torch
from torch import nn

import kxops
from benchmarks.harness import QUICK, run_modes, size_for


class EagerGatedConv(nn.Module):
    """The block as users write it: transpose, nn.Conv1d, split, sigmoid, blend, mask."""

    def __init__(self, dim, dilation):
        super().__init__()
        self.conv = nn.Conv1d(dim, 2 * dim, 3, dilation=dilation, padding=dilation)

    def forward(self, x, mask):
        m = mask[..., None].to(x.dtype)
        h, g = self.conv((x * m).transpose(1, 2)).transpose(1, 2).chunk(2, dim=-1)
        s = torch.sigmoid(g)
        return (x * (1 - s) + h * s) * m


SIZES = {"cpu": dict(batch=16, time=256, channels=(128, 512)),
         "cuda": dict(batch=32, time=512, channels=(128, 512))}


@pytest.mark.parametrize("provider", ["kxops", "reference", "conv1d_eager", "conv1d_compiled"])
@pytest.mark.parametrize("dilation", [1, 2, 5])
@pytest.mark.parametrize("channel_index", [0, 1])
def test_gated_conv(benchmark, device, mode, provider, dilation, channel_index):
    size = SIZES[device.type]
    dim = size_for(size["channels"], channel_index)
    if device.type == "cpu" and dim > 128 and dilation != 2:
        pytest.skip("CPU: C=512 only at dilation 2, to keep make bench short")
    if QUICK and dilation != 1:
        pytest.skip("quick run: dilation 1 only")
    eager = EagerGatedConv(dim, dilation).to(device)
    x = torch.randn(size["batch"], size["time"], dim, device=device)
    mask = torch.ones(size["batch"], size["time"], dtype=torch.bool, device=device)
    mask[:, size["time"] * 3 // 4:] = False
    w, b = eager.conv.weight, eager.conv.bias
    compiled = torch.compile(eager) if provider == "conv1d_compiled" else None
    blocks = {
        "kxops": lambda x: kxops.dilated_gated_conv1d(x, w, b, mask, dilation=dilation),
        "reference": lambda x: kxops.reference.dilated_gated_conv1d(x, w, b, mask,
                                                                    dilation=dilation),
        "conv1d_eager": lambda x: eager(x, mask),
        "conv1d_compiled": lambda x: compiled(x, mask),
    }

    def loss_of(name):
        def loss(x):
            eager.zero_grad(set_to_none=True)
            return blocks[name](x)
        return loss

    peer = "conv1d_eager"
    shape = [size["batch"], size["time"], dim]
    run_modes(benchmark, mode, loss_of(provider), x, device, provider=provider,
              peer_loss_of=loss_of(peer) if provider != peer else None,
              count_saved=provider != "conv1d_compiled", persistent=list(eager.parameters()),
              op="gated_conv",
              shape=f"{shape} d={dilation}", dtype="float32", peer=peer)

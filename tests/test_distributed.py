"""AdaX-W under torch.distributed on CPU (gloo, 2 processes): DDP and FSDP2 fully_shard."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kxops

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")

WORLD = 2
STEPS = 4


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _batches():
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(WORLD * 4, 6, generator=generator) for _ in range(STEPS)]


def _single_process_params():
    model = _model()
    optimizer = kxops.optim.AdaXW(model.parameters(), lr=1e-2)
    for x in _batches():
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    return [p.detach() for p in model.parameters()]


def _worker(rank, port, mode, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = _model()
        if mode == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in (model[0], model[2]):
                fully_shard(layer)
            fully_shard(model)
        optimizer = kxops.optim.AdaXW(model.parameters(), lr=1e-2)
        for x in _batches():
            optimizer.zero_grad()
            # Each rank takes its half of the batch; the mean over ranks is the full batch's.
            model(x.chunk(WORLD)[rank]).square().mean().backward()
            optimizer.step()
        params = [p.full_tensor() if hasattr(p, "full_tensor") else p
                  for p in model.parameters()]
        torch.save([p.detach() for p in params], os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_adaxw_distributed_matches_single_process(mode, tmp_path):
    if mode == "fsdp2":
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.6")
        from torch.distributed import fsdp

        if not hasattr(fsdp, "fully_shard"):
            pytest.skip("this torch has no torch.distributed.fsdp.fully_shard")
    mp.spawn(_worker, args=(_free_port(), mode, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    expected = _single_process_params()
    for got0, got1, want in zip(*ranks, expected):
        assert torch.equal(got0, got1)
        torch.testing.assert_close(got0, want, rtol=1e-5, atol=1e-6)

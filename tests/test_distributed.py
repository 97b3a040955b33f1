"""AdaX-W under torch.distributed on CPU (gloo, 2 processes): DDP (an MLP and the DGCNN tagger),
FSDP2 fully_shard, and torch.distributed.checkpoint resume."""

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


class _Tagger(torch.nn.Module):
    """A DGCNN encoder with a linear head, as in examples/train_multilabel_dgcnn.py."""

    def __init__(self):
        super().__init__()
        self.encoder = kxops.nn.DGCNN(6, dilations=(1, 2), drop_gate=0.0)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.encoder(x).amax(1))


def _model(kind="mlp"):
    torch.manual_seed(0)
    if kind == "dgcnn":
        return _Tagger()
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _inputs(kind, x):
    return x.view(x.shape[0], 1, 6).expand(-1, 5, -1) if kind == "dgcnn" else x


def _batches():
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(WORLD * 4, 6, generator=generator) for _ in range(STEPS)]


def _single_process_params(kind):
    model = _model(kind)
    optimizer = kxops.optim.AdaXW(model.parameters(), lr=1e-2)
    for x in _batches():
        optimizer.zero_grad()
        model(_inputs(kind, x)).square().mean().backward()
        optimizer.step()
    return [p.detach() for p in model.parameters()]


def _worker(rank, port, mode, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    kind = "dgcnn" if mode == "ddp_dgcnn" else "mlp"
    try:
        model = _model(kind)
        if mode.startswith("ddp"):
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
            model(_inputs(kind, x.chunk(WORLD)[rank])).square().mean().backward()
            optimizer.step()
        params = [p.full_tensor() if hasattr(p, "full_tensor") else p
                  for p in model.parameters()]
        torch.save([p.detach() for p in params], os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "ddp_dgcnn", "fsdp2"])
def test_adaxw_distributed_matches_single_process(mode, tmp_path):
    if mode == "fsdp2":
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.6")
        from torch.distributed import fsdp

        if not hasattr(fsdp, "fully_shard"):
            pytest.skip("this torch has no torch.distributed.fsdp.fully_shard")
    mp.spawn(_worker, args=(_free_port(), mode, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    expected = _single_process_params("dgcnn" if mode == "ddp_dgcnn" else "mlp")
    for got0, got1, want in zip(*ranks, expected):
        assert torch.equal(got0, got1)
        torch.testing.assert_close(got0, want, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_distributed_checkpoint_resumes_to_the_same_parameters(tmp_path):
    """torch.distributed.checkpoint save/load of model and AdaX-W state (one process)."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def train(model, optimizer, batches):
        for x in batches:
            optimizer.zero_grad()
            model(_inputs("dgcnn", x)).square().mean().backward()
            optimizer.step()

    batches = _batches()
    model = _model("dgcnn")
    optimizer = kxops.optim.AdaXW(model.parameters(), lr=1e-2)
    train(model, optimizer, batches[:2])
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp_path))
    train(model, optimizer, batches[2:])

    resumed = _model("dgcnn")
    resumed_optimizer = kxops.optim.AdaXW(resumed.parameters(), lr=1e-2)
    train(resumed, resumed_optimizer, batches[:1])  # state to load into, then overwritten
    model_state, optim_state = get_state_dict(resumed, resumed_optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(tmp_path))
    set_state_dict(resumed, resumed_optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    train(resumed, resumed_optimizer, batches[2:])
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)

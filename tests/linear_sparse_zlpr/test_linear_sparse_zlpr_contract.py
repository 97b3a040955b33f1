"""kxops.linear_sparse_zlpr_loss / LinearZLPR probed against their written contract by a tester
who did not read test_linear_sparse_zlpr.py: bad arguments, exactness, layouts, predict under
autocast, and label parallel with one bad rank (raises everywhere, never hangs)."""

import datetime
import os
import queue
import tempfile
import time

import pytest
import torch
import torch.multiprocessing as mp

import kxops
from kxops.nn import LinearZLPR
from tests.utils import needs_kernel

OPS = torch.ops.kxops


def _data(n=6, d=4, classes=5, p=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=dtype),
            torch.randn(classes, d, generator=g, dtype=dtype),
            torch.randn(classes, generator=g, dtype=dtype),
            torch.randint(-1, classes, (n, p), generator=g))


# ---- argument errors ----

def test_public_block_rows_beyond_int64_works_or_is_value_error():
    # Contract: block_rows is any int >= 1 and the results do not depend on it.
    x, w, b, pos = _data()
    expected = kxops.linear_sparse_zlpr_loss(x, w, pos, b)
    try:
        got = kxops.linear_sparse_zlpr_loss(x, w, pos, b, block_rows=2**64)
    except ValueError:
        return
    torch.testing.assert_close(got, expected)


def test_predict_under_autocast_matches_logits_topk():
    head = LinearZLPR(16, 10)
    inp = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        scores, indices = head.predict(inp, k=3)
        expected_scores, expected_indices = head.logits(inp).topk(3)
    assert scores.dtype == expected_scores.dtype
    assert torch.equal(scores, expected_scores) and torch.equal(indices, expected_indices)


# ---- label parallel on gloo ----

_CALL_BUDGET_S = 4.0   # a good rank must have raised within this long of its call
_BAD_RANK_STAYS_S = 7.0  # the bad rank keeps its process group this long after raising


def _sizes_bounds(sizes, rank):
    offset = sum(sizes[:rank])
    return offset, offset + sizes[rank]


def _lp_equality(rank, world):
    sizes = [0, 3, 4][:world]
    x, w, b, pos = _data(n=6, d=4, classes=sum(sizes), seed=2)
    x, pos = x.view(2, 3, 4), pos.view(2, 3, 3)
    lo, hi = _sizes_bounds(sizes, rank)
    leaves = [x.clone().requires_grad_(), w[lo:hi].clone().requires_grad_(),
              b[lo:hi].clone().requires_grad_()]
    loss = kxops.linear_sparse_zlpr_loss(leaves[0], leaves[1], pos, leaves[2], reduction="none",
                                         process_group=torch.distributed.group.WORLD,
                                         block_rows=1)
    upstream = torch.linspace(-1, 2, loss.numel(), dtype=loss.dtype).view(loss.shape)
    loss.backward(upstream)
    full = [x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
    expected = kxops.linear_sparse_zlpr_loss(full[0], full[1], pos, full[2], reduction="none")
    expected.backward(upstream)
    for got, want in ((loss, expected), (leaves[0].grad, full[0].grad),
                      (leaves[1].grad, full[1].grad[lo:hi]), (leaves[2].grad, full[2].grad[lo:hi])):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    return "ok"


def _lp_bad_on_last_rank(rank, world, bad):
    x, w, b, pos = _data(n=6, d=4, classes=6, seed=3)
    sizes = [2, 4]
    lo, hi = _sizes_bounds(sizes, rank)
    x = x.clone().requires_grad_()
    w = w[lo:hi].clone().requires_grad_()
    b = b[lo:hi].clone().requires_grad_()
    if rank == world - 1 and bad == "sparse weight":
        w = w.detach().to_sparse()
    if rank == world - 1 and bad == "input without grad":
        x = x.detach()
    loss = kxops.linear_sparse_zlpr_loss(x, w, pos, b,
                                         process_group=torch.distributed.group.WORLD)
    loss.backward()
    return "no error"


def _lp_worker(rank, world, path, task, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    start = time.monotonic()
    try:
        outcome = (_lp_equality(rank, world) if task == "equality"
                   else _lp_bad_on_last_rank(rank, world, task))
    except Exception as exc:  # reported to the parent
        outcome = f"{type(exc).__name__}: {exc}"[:300]
    results.put((rank, outcome, time.monotonic() - start))
    results.close()
    results.join_thread()  # flushed before os._exit
    if task != "equality" and rank == world - 1:
        time.sleep(_BAD_RANK_STAYS_S)  # a live peer, as in a training loop
    os._exit(0)  # no destroy_process_group: it would wait for a hung peer


def _launch(task, world, deadline_s=25):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    path = tempfile.mktemp(prefix="kxops_lp_attack_")
    procs = [ctx.Process(target=_lp_worker, args=(r, world, path, task, results))
             for r in range(world)]
    for p in procs:
        p.start()
    out, end = {}, time.monotonic() + deadline_s
    try:
        while len(out) < world and time.monotonic() < end:
            try:
                rank, outcome, elapsed = results.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                break
            out[rank] = (outcome, elapsed)
    finally:
        for p in procs:
            p.join(timeout=1)
            if p.is_alive():
                p.kill()
        if os.path.exists(path):
            os.remove(path)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_label_parallel_uneven_slices_with_an_empty_one_equal_one_process(world):
    needs_kernel("linear_sparse_zlpr_partials", "cpu")
    out = _launch("equality", world)
    assert sorted(out) == list(range(world)), out
    assert all(outcome == "ok" for outcome, _ in out.values()), out


@pytest.mark.parametrize("bad", ["sparse weight", "input without grad"])
def test_label_parallel_bad_argument_on_one_rank_raises_on_every_rank_without_hang(bad):
    # Contract: "a bad argument on any rank raises on every rank (never a hang)". Rank 1's bad
    # argument passes the pre-collective check, then rank 1 raises (sparse weight: in the
    # partials op) or skips the all-reduce of input's gradient (no grad): rank 0 waits in a
    # collective until rank 1's process goes away.
    needs_kernel("linear_sparse_zlpr_partials", "cpu")
    out = _launch(bad, 2)
    assert set(out) == {0, 1}, out
    for rank, (outcome, elapsed) in out.items():
        assert outcome != "no error", (rank, out)
        assert elapsed < _CALL_BUDGET_S, (rank, out)

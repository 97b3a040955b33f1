"""The ops together: the example's training run, a whole training step under
torch.compile(fullgraph=True), autocast, and what every op refuses alike."""

import importlib.util
import pathlib
import re

import pytest
import torch

import kxops

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "train_multilabel_dgcnn.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_multilabel_dgcnn", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_learns_the_planted_events():
    class_f1, span_f1, _ = load_example().train(steps=200, quiet=True)
    assert class_f1 >= 0.9 and span_f1 >= 0.9, (class_f1, span_f1)


class Tagger(torch.nn.Module):
    def __init__(self, dim=16, classes=7):
        super().__init__()
        self.encoder = kxops.nn.DGCNN(dim, dilations=(1, 2), drop_gate=0.0)
        self.head = torch.nn.Linear(dim, classes)

    def forward(self, x, mask):
        return self.head(self.encoder(x, mask).amax(1))


def batch(dim=16, classes=7):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 9, dim, generator=generator)
    mask = torch.arange(9)[None] < torch.tensor([[9], [5], [7], [2]])
    labels = torch.rand(4, classes, generator=generator) < 0.3
    return x, mask, labels


def test_compile_whole_training_step_fullgraph():
    x, mask, labels = batch()
    torch.manual_seed(0)
    model = Tagger()
    compiled_model = Tagger()
    compiled_model.load_state_dict(model.state_dict())

    def loss_of(m, x):
        return kxops.zlpr_loss(m(x, mask), labels)

    compiled_loss = torch.compile(loss_of, fullgraph=True)
    eager = loss_of(model, x)
    eager.backward()
    got = compiled_loss(compiled_model, x)
    got.backward()
    torch.testing.assert_close(got, eager)
    for a, b in zip(compiled_model.parameters(), model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device, dtype", [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
])
def test_autocast_through_all_ops(device, dtype):
    x, mask, labels = (t.to(device) for t in batch())
    torch.manual_seed(0)
    model = Tagger().to(device)
    optimizer = kxops.optim.AdaXW(model.parameters(), lr=1e-2)
    with torch.autocast(device, dtype=dtype):
        logits = model(x, mask)
        assert logits.dtype == dtype
        loss = kxops.zlpr_loss(logits, labels)
    loss.backward()
    optimizer.step()
    torch.manual_seed(0)
    reference = Tagger().to(device)
    full_precision = kxops.zlpr_loss(reference(x, mask), labels)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.float(), full_precision, rtol=5e-2, atol=5e-2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# One bad layout per op family, called directly (the public wrappers check layouts first):
# (op, its arguments with one non-strided tensor, that argument's name).
def _non_strided_calls(layout):
    def bad(t):
        return {"sparse": t.to_sparse, "csr": t.to_sparse_csr,
                "nested": lambda: torch.nested.nested_tensor(list(t)),
                "quantized": lambda: torch.quantize_per_tensor(t.float(), 1.0, 0, torch.qint32),
                }[layout]()

    x, w = torch.randn(2, 5, 4), torch.randn(8, 4, 3)
    logits, ids = torch.randn(3, 5), torch.tensor([[0], [1], [2]])
    q, pos = torch.randn(1, 2, 3, 4), torch.zeros(1, 2, 1, dtype=torch.long)
    p = torch.zeros(2, 3)
    ops = torch.ops.kxops
    return [
        (ops.zlpr, (bad(logits), torch.ones(3, 5), [False]), "logits"),
        (ops.sparse_zlpr, (logits, bad(ids), -1, [False]), "positives"),
        (ops.zlpr_backward, (torch.ones(3), bad(logits)), "grad"),
        (ops.gated_conv, (bad(x), w, None, None, None, None, None, 1, 0.0, False), "x"),
        (ops.linear_sparse_zlpr, (torch.randn(3, 4), bad(torch.randn(5, 4)), None, ids, -1,
                                  "mean", [False] * 3, 0), "weight"),
        (ops.global_pointer_zlpr, (bad(q), q, pos, None, None, None, True, -1, "mean",
                                   [False] * 4), "q"),
        (ops.adax_, ([p], [bad(torch.ones(2, 3))], [p.clone()], [p.clone()], [torch.zeros(())]),
         "grads[0]"),
    ]


@pytest.mark.parametrize("layout", ["sparse", "csr", "nested", "quantized"])
def test_every_op_refuses_a_non_strided_tensor_by_name(layout):
    """A sparse, compressed-sparse, nested or quantized tensor reaches no kernel: each op refuses
    it as a TypeError in its own words (not the dispatcher's "Could not run ..." error)."""
    hyper = dict(lr=1e-3, beta1=0.9, beta2=1e-4, weight_decay=0.0, eps=1e-8, decoupled=True,
                 maximize=False)
    for op, args, name in _non_strided_calls(layout):
        kwargs = hyper if op is torch.ops.kxops.adax_ else {}
        op_name = op._qualified_op_name.split("::")[1]
        with pytest.raises(TypeError, match=rf"^kxops\.{op_name}: {re.escape(name)} must be a "
                                            r"dense \(strided\) tensor, got "):
            op(*args, **kwargs)

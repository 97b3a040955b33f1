"""The same model and data trained with AdaX-W's fp32, bf16 and 8-bit state: loss curves in one
PNG (benchmarks/results/adax_state_convergence.png) and the final losses.

A small two-layer MLP learns a fixed random teacher MLP's 10-way labels from 64-dimensional
inputs (new batches each step, one data stream for every run)::

    python examples/adax_state_convergence.py [--steps 1500]
"""

import argparse
from pathlib import Path

import torch

import kxops

STATES = {"fp32 state": None, "bf16 state": torch.bfloat16, "8-bit state": torch.uint8}


def batches(steps, batch=256, dim=64, classes=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.nn.Sequential(torch.nn.Linear(dim, 128), torch.nn.Tanh(),
                                  torch.nn.Linear(128, classes))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    for _ in range(steps):
        x = torch.randn(batch, dim, generator=gen)
        with torch.no_grad():  # not around the yield: grad mode is global
            labels = teacher(x).argmax(-1)
        yield x, labels


def train(state_dtype, steps):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 10))
    optimizer = kxops.optim.AdaXW(model.parameters(), lr=3e-3, state_dtype=state_dtype)
    losses = []
    for x, y in batches(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def smoothed(values, window=50):
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent
                        / "benchmarks" / "results" / "adax_state_convergence.png")
    args = parser.parse_args()
    curves = {name: smoothed(train(dtype, args.steps)) for name, dtype in STATES.items()}
    final = {name: sum(c[-100:]) / 100 for name, c in curves.items()}
    for name, value in final.items():
        print(f"{name}: final loss {value:.4f} ({value / final['fp32 state'] - 1:+.2%} vs fp32)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.plot(curve, label=f"{name} (final {final[name]:.4f})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (50-step mean)")
    ax.set_yscale("log")
    ax.set_title("AdaX-W state formats: MLP on a teacher's labels")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

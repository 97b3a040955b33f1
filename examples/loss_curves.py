"""The loss curves of an exact and a filtered run in one PNG (both examples' --plot)."""


def plot_loss_curves(runs, path, title):
    """runs: {name: (losses per step, anything)}; writes the curves to path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (losses, _) in runs.items():
        ax.plot(losses, label=name, linewidth=1)
    ax.set(xlabel="step", ylabel="training loss (batch)", yscale="log", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"loss curves: {path}")

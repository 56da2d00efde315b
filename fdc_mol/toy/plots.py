"""PNG plots of the illustrative settings: samples over the reward landscape before and after fine-tuning."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from flowmol_ext.io_utils import atomic_write

from .settings import Landscape

TITLES = {"pre": "pre-trained", "am": "AM baseline", "fdc": "FDC"}


def plot_setting(setting: str, land: Landscape, samples: dict[str, Tensor], path: Path, title: str = "") -> None:
    """One panel per entry of ``samples`` (label -> (n, 2), in order; "pre"/"am"/"fdc" get long titles):
    reward (or log p_pre for entropy) as background, the first 1500 samples in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x0, x1, y0, y1 = land.extent
    gx, gy = torch.meshgrid(torch.linspace(x0, x1, 200), torch.linspace(y0, y1, 200), indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)
    if setting == "entropy":
        from .flows import GMMVelocity

        bg = GMMVelocity(land.means, land.stds, land.weights).log_prob(grid).clamp_min(-12)
        label = "log p_pre"
    else:
        bg = land.reward_fn(grid).detach()
        label = "cost" if setting == "cvar" else "reward"
        if setting == "cvar":
            bg = -bg
    names = list(samples)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        im = ax.imshow(bg.reshape(200, 200).numpy(), origin="lower", extent=land.extent, cmap="viridis", aspect="auto")
        x = samples[name][:1500]
        ax.scatter(x[:, 0], x[:, 1], s=2, c="red", alpha=0.5)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_title(TITLES.get(name, name))
    fig.colorbar(im, ax=axes[0].tolist(), label=label, shrink=0.8)
    fig.suptitle(title or setting)
    atomic_write(path, lambda p: fig.savefig(p, dpi=90, format="png"))
    plt.close(fig)

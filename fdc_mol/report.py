"""Plots and summary tables of fine-tuning runs (PNG via matplotlib's Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from flowmol_ext.io_utils import atomic_write


def plot_run(run_dir: Path, rows: list[dict[str, Any]], beta: float) -> Path:
    """Reward histograms per iteration, E[r] and SQ_β against the iteration, validity. -> plots.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    cmap = plt.get_cmap("viridis")
    its = [int(r["iteration"]) for r in rows]
    for i, it in enumerate(its):
        path = run_dir / "samples" / f"rewards_{it:03d}.npy"
        if not path.is_file():
            continue
        r = np.load(path)
        r = r[np.isfinite(r)]
        if r.size:
            axes[0].hist(r, bins=40, histtype="step", color=cmap(i / max(1, len(its) - 1)), label=f"iter {it}")
    axes[0].set_xlabel("reward r = −E (Hartree)")
    axes[0].set_ylabel("molecules")
    axes[0].legend(fontsize=7)
    axes[0].set_title("reward histograms")
    axes[1].plot(its, [r["mean_reward"] for r in rows], "o-", label="E[r]")
    axes[1].plot(its, [r["sq_beta"] for r in rows], "s-", label=f"SQ_β (β={beta})")
    axes[1].set_xlabel("outer iteration")
    axes[1].set_ylabel("Hartree")
    axes[1].legend(fontsize=8)
    axes[1].set_title("mean and tail mean of the reward")
    for key in ("validity", "molecule_stability"):
        axes[2].plot(its, [r[key] for r in rows], "o-", label=key)
    axes[2].set_ylim(0, 1.02)
    axes[2].set_xlabel("outer iteration")
    axes[2].legend(fontsize=8)
    axes[2].set_title("validity")
    fig.tight_layout()
    out = run_dir / "plots.png"
    atomic_write(out, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return out


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table; floats with 4 significant digits, NaN as 'n/a'."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([line, sep, *body])

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
        npz = sorted((run_dir / "samples").glob(f"iteration_{it:03d}_*.npz"), key=lambda p: not p.stem.endswith("ode"))
        if path.is_file():
            r = np.load(path)
        elif npz:
            with np.load(npz[0]) as z:
                r = np.asarray(z["rewards"]) if "rewards" in z.files else np.zeros(0)
        else:
            continue
        r = r[np.isfinite(r)]
        if r.size:
            axes[0].hist(r, bins=40, histtype="step", color=cmap(i / max(1, len(its) - 1)), label=f"iter {it}")
    axes[0].set_xlabel("reward r (Hartree for energy rewards)")
    axes[0].set_ylabel("molecules")
    axes[0].legend(fontsize=7)
    axes[0].set_title("reward histograms")
    axes[1].plot(its, [r["mean_reward"] for r in rows], "o-", label="E[r]")
    axes[1].plot(its, [r["sq_beta"] for r in rows], "s-", label=f"SQ_β (β={beta})")
    axes[1].set_xlabel("outer iteration")
    axes[1].set_ylabel("reward (Hartree for energy rewards)")
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


# -- molecules, component distributions and the HTML page -------------------------------------------------------
_SDF_RE = r"iteration_(\d{3})\.sdf$"
_SKIP_FIELDS = {"iteration", "reward_method", "energy_method", "reward_failure", "energy_failure", "cached"}


def read_iteration_sdfs(run_dir: Path) -> dict[int, tuple[list[Any], dict[str, np.ndarray]]]:
    """The molecules of ``samples/iteration_KKK.sdf`` by iteration: (RDKit molecules, unsanitised, None for a
    record RDKit cannot read; {numeric SD field: (B,) float64}). Non-numeric fields are skipped."""
    import re

    from rdkit import Chem, rdBase

    out: dict[int, tuple[list[Any], dict[str, np.ndarray]]] = {}
    for path in sorted((Path(run_dir) / "samples").glob("iteration_*.sdf")):
        m = re.search(_SDF_RE, path.name)
        if not m:
            continue
        with rdBase.BlockLogs():
            mols = list(Chem.SDMolSupplier(str(path), sanitize=False, removeHs=False))
        fields: dict[str, list[float]] = {}
        for i, mol in enumerate(mols):
            if mol is None:
                continue
            for name in mol.GetPropNames():
                if name in _SKIP_FIELDS:
                    continue
                try:
                    v = float(mol.GetProp(name))
                except ValueError:
                    continue
                fields.setdefault(name, [math.nan] * len(mols))[i] = v
        out[int(m.group(1))] = (mols, {k: np.asarray(v, np.float64) for k, v in fields.items()})
    return out


def _reward_field(fields: dict[str, np.ndarray]) -> str | None:
    for key in ("reward", "reward_Eh"):
        if key in fields:
            return key
    return None


def _depict(mol: Any) -> Any:
    """A 2-D depiction copy of an RDKit molecule (hydrogens removed where possible)."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    m = Chem.Mol(mol)
    try:
        m.UpdatePropertyCache(strict=False)
        m = Chem.RemoveHs(m, sanitize=False)
    except Exception:  # noqa: BLE001 - keep the hydrogens of a molecule RDKit cannot simplify
        m = Chem.Mol(mol)
    m.RemoveAllConformers()
    Chem.RemoveStereochemistry(m)  # tags perceived from the 3-D record would be drawn as wedges
    for b in m.GetBonds():
        b.SetBondDir(Chem.BondDir.NONE)
        if b.HasProp("_MolFileBondCfg"):
            b.ClearProp("_MolFileBondCfg")
    AllChem.Compute2DCoords(m)
    return m


def top_molecule_grid(run_dir: Path, n_top: int = 6, extra_field: str | None = None,
                      sub_size: tuple[int, int] = (210, 180)) -> Path | None:
    """``top_molecules.png``: one row per iteration with its ``n_top`` molecules of highest reward (2-D RDKit
    depictions, legend: iteration, rank, reward and ``extra_field`` (e.g. ``gap_eV``) when present). Returns None
    when the run wrote no SDF."""
    from rdkit import Chem
    from rdkit.Chem import Draw

    data = read_iteration_sdfs(run_dir)
    if not data:
        return None
    cells, legends = [], []
    for k, (mols, fields) in sorted(data.items()):
        key = _reward_field(fields)
        r = fields.get(key, np.full(len(mols), np.nan)) if key else np.full(len(mols), np.nan)
        order = [i for i in np.argsort(-np.nan_to_num(r, nan=-np.inf)) if np.isfinite(r[i]) and mols[i] is not None]
        row = order[:n_top]
        for rank in range(n_top):
            if rank < len(row):
                i = row[rank]
                try:
                    cells.append(_depict(mols[i]))
                except Exception:  # noqa: BLE001 - a molecule RDKit cannot lay out stays an empty cell
                    cells.append(Chem.Mol())
                text = f"it {k} #{rank + 1}  r={r[i]:.4g}"
                if extra_field and extra_field in fields and extra_field != key:
                    text += f"  {extra_field}={fields[extra_field][i]:.3g}"
                legends.append(text)
            else:
                cells.append(Chem.Mol())
                legends.append(f"it {k}: no scored molecule" if rank == 0 and not row else "")
    img = Draw.MolsToGridImage(cells, molsPerRow=n_top, subImgSize=sub_size, legends=legends)
    out = Path(run_dir) / "top_molecules.png"
    atomic_write(out, lambda p: img.save(p, format="PNG"))
    return out


def plot_distributions(run_dir: Path, max_columns: int = 4) -> tuple[Path | None, list[dict[str, Any]]]:
    """``distributions.png``: histograms per iteration of the reward and of every numeric per-molecule column
    of the SDFs (component values with their units in the name, e.g. ``gap_eV``, ``xtb_energy_Eh``), and a
    summary per (iteration, column): n finite, mean, median, 90th percentile. When the job recorded them
    (``fixed_graph_rewards`` in ``samples/iteration_KKK_ode.npz``), one more panel shows the reward of iteration
    0's molecules with each iteration's geometry (the same molecules, so graph changes do not blur the shift)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = read_iteration_sdfs(run_dir)
    if not data:
        return None, []
    first = next(iter(data.values()))[1]
    key = _reward_field(first)
    cols = ([key] if key else []) + sorted(
        c for c in first if c not in {key, "reward_Eh", "reward", "energy_Eh"}
        and not (key and np.array_equal(first[c], first[key], equal_nan=True)))  # a component that is the reward
    cols = cols[:max_columns]
    fixed = _fixed_graph_rewards(Path(run_dir))
    if fixed:  # the reward of iteration 0's molecules with each iteration's geometry: the same molecules
        for k, v in fixed.items():
            if k in data:
                data[k][1][FIXED_GRAPH_COLUMN] = v
        cols.append(FIXED_GRAPH_COLUMN)
    base = data[min(data)][1].get(FIXED_GRAPH_COLUMN) if fixed and min(data) == 0 else None
    summary: list[dict[str, Any]] = []
    n_ax = max(1, len(cols)) + (base is not None)
    fig, axes = plt.subplots(1, n_ax, figsize=(4.4 * n_ax, 3.6), squeeze=False)
    cmap = plt.get_cmap("viridis")
    its = sorted(data)
    for j, col in enumerate(cols):
        ax = axes[0, j]
        finite_all = np.concatenate([d[1].get(col, np.zeros(0)) for d in data.values()])
        finite_all = finite_all[np.isfinite(finite_all)]
        bins = np.linspace(finite_all.min(), finite_all.max(), 31) if finite_all.size and np.ptp(finite_all) > 0 \
            else 30
        for n, k in enumerate(its):
            v = data[k][1].get(col, np.zeros(0))
            v = v[np.isfinite(v)]
            summary.append({"iteration": k, "column": col, "n": int(v.size),
                            "mean": float(v.mean()) if v.size else math.nan,
                            "median": float(np.median(v)) if v.size else math.nan,
                            "p90": float(np.quantile(v, 0.9)) if v.size else math.nan})
            if v.size:
                ax.hist(v, bins=bins, histtype="step", density=True, color=cmap(n / max(1, len(its) - 1)),
                        label=f"iter {k} (mean {v.mean():.4g})")
        ax.set_title(col, fontsize=9 if len(col) > 30 else 11)
        ax.set_xlabel("reward" if col == FIXED_GRAPH_COLUMN else col)
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    if base is not None:  # per-molecule change on the same molecules: r_k − r_0
        ax = axes[0, -1]
        ax.axvline(0.0, color="0.6", lw=0.8)
        deltas = {k: data[k][1][FIXED_GRAPH_COLUMN] - base for k in its if k > 0 and FIXED_GRAPH_COLUMN in data[k][1]}
        both = np.concatenate([v[np.isfinite(v)] for v in deltas.values()]) if deltas else np.zeros(0)
        bins = np.linspace(both.min(), both.max(), 31) if both.size and np.ptp(both) > 0 else 30
        for n, (k, dv) in enumerate(deltas.items()):
            dv = dv[np.isfinite(dv)]
            if dv.size:
                ax.hist(dv, bins=bins, histtype="step", color=cmap((n + 1) / max(1, len(its) - 1)),
                        label=f"iter {k}: mean {dv.mean():+.3g}, {int((dv > 0).sum())} up / {int((dv < 0).sum())} down")
        ax.set_title("change on iteration 0's molecules, r_k − r_0", fontsize=10)
        ax.set_xlabel("Δ reward (same molecule)")
        ax.set_ylabel("molecules")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(run_dir) / "distributions.png"
    atomic_write(out, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
    return out, summary


FIXED_GRAPH_COLUMN = "reward, iteration 0's molecules (fixed graph)"


def _fixed_graph_rewards(run_dir: Path) -> dict[int, np.ndarray]:
    """``fixed_graph_rewards`` (B,) by iteration from ``samples/iteration_KKK_ode.npz``: the reward of iteration
    0's molecules (same graphs, same start) with iteration k's positions network; empty when not recorded."""
    import re

    out: dict[int, np.ndarray] = {}
    for path in sorted((run_dir / "samples").glob("iteration_*_ode.npz")):
        m = re.search(r"iteration_(\d{3})_ode\.npz$", path.name)
        if not m:
            continue
        with np.load(path) as z:
            if "fixed_graph_rewards" in z.files:
                out[int(m.group(1))] = np.asarray(z["fixed_graph_rewards"], np.float64)
    return out


def _b64_png(path: Path | None) -> str:
    import base64

    if path is None or not Path(path).is_file():
        return ""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _html_table(header: list[str], rows: list[list[Any]]) -> str:
    import html

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.5g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html_report(run_dir: Path, rows: list[dict[str, Any]], title: str = "fdc-mol run", n_top: int = 6,
                      extra_field: str | None = None) -> Path:
    """``report.html``: a self-contained page (no external files; images embedded as base64 PNG) with the
    metrics table, ``plots.png``, the per-iteration distributions of the reward and its components
    (``distributions.png``), the grid of the top molecules per iteration (``top_molecules.png``) and the
    resolved ``config.yaml``. The PNGs are also written into the run directory. Returns the page's path."""
    import html

    run_dir = Path(run_dir)
    dist_png, summary = plot_distributions(run_dir)
    if extra_field is None and summary:
        cols = [s["column"] for s in summary]
        extra_field = next((c for c in cols if c not in ("reward", "reward_Eh")), None)
    grid_png = top_molecule_grid(run_dir, n_top=n_top, extra_field=extra_field)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys and not k.startswith("sde_")]
    metrics = _html_table(keys, [[r.get(k, "") for k in keys] for r in rows])
    comp = _html_table(["iteration", "column", "n", "mean", "median", "90th percentile"],
                       [[s["iteration"], s["column"], s["n"], s["mean"], s["median"], s["p90"]] for s in summary])
    cfg_path = run_dir / "config.yaml"
    cfg = html.escape(cfg_path.read_text()) if cfg_path.is_file() else "(no config.yaml)"
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>",
        "body{font-family:sans-serif;margin:16px;background:#fff;color:#111}",
        "table{border-collapse:collapse;font-size:12px;margin:8px 0}",
        "td,th{border:1px solid #bbb;padding:2px 6px;text-align:right}th{background:#e8eef6}",
        "img{max-width:100%;border:1px solid #ddd;margin:6px 0}h2{margin-top:22px}",
        ".scroll{overflow-x:auto}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Run directory: <code>{html.escape(str(run_dir))}</code>; {len(rows)} evaluated iteration(s).</p>",
        "<h2>Metrics per iteration</h2>", f"<div class='scroll'>{metrics}</div>",
    ]
    for name, path, caption in [
        ("Reward and validity", run_dir / "plots.png", "E[r], SQ_β and validity against the outer iteration"),
        ("Distributions of the reward and its components", dist_png,
         "histograms per iteration (evaluation sample, primary sampler)"),
        ("Top molecules per iteration", grid_png, f"the {n_top} highest-reward molecules of each iteration"),
    ]:
        src = _b64_png(path)
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(f"<img alt='{html.escape(name)}' src='{src}'><p>{html.escape(caption)}</p>" if src
                     else "<p>(not available: the run wrote no samples)</p>")
        if name.startswith("Distributions") and summary:
            parts.append(f"<div class='scroll'>{comp}</div>")
    parts += ["<h2>Resolved config</h2>", f"<pre>{cfg}</pre>", "</body></html>"]
    out = run_dir / "report.html"
    atomic_write(out, lambda p: Path(p).write_text("\n".join(parts), encoding="utf-8"))
    return out

"""``fdc-mol model-card``: a generator's sample quality under both samplers, side by side.

Samples N molecules with the Euler ODE and N with the memoryless SDE (the sampler adjoint matching fine-tunes
through), with the same seed (same sizes and initial noise), and reports per sampler: atom and molecule
stability, validity, connectivity, uniqueness, novelty, the fraction passing the reward gate (GFN2-xTB
single point: sanitisable, connected, closed shell, no atom pair under 0.9 Å), atom pairs under 0.9 Å, and
the median GFN2-xTB energy per atom (Eh). Binomial 95 % intervals (Wilson) for the fractions.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

HELP = "Sample quality of a model with the ODE and the memoryless SDE side by side (model-card table)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default="qm9_small", help="registry name or model directory")
    p.add_argument("-n", "--n-molecules", type=int, default=1000)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samplers", nargs="+", default=["ode", "sde"], choices=["ode", "sde"])
    p.add_argument("--data-dir", default="data/qm9", help="processed QM9 (for novelty; skipped when absent)")
    p.add_argument("--energy", default="gfn2", choices=["gfn1", "gfn2", "none"])
    p.add_argument("--executor", default="local:2")
    p.add_argument("--out", type=Path, help="also write the table as JSON here")
    p.add_argument("--sdf-dir", type=Path, help="also write each sampler's molecules to DIR/<sampler>.sdf (with "
                   "their energies), e.g. for `fdc-mol evaluate --geometry`")
    p.add_argument("--compile", action="store_true", help="run the network under torch.compile (~1.9x faster "
                   "sampling on CPU after a one-off compilation of minutes, cached on disk)")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95 % interval of a binomial fraction k/n."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return mid - half, mid + half


def model_card_metrics(model_name: str, n: int, steps: int, seed: int, sampler: str, data_dir: str | None,
                       energy: str, executor: str, sdf: Path | None = None,
                       compile_network: bool = False) -> dict[str, float]:
    """The table's column for one sampler (fractions in [0, 1], energies in Eh); the molecules also go to
    ``sdf`` when given (energy and the reward gate's reason per record)."""
    import numpy as np
    import torch

    from flowmol_ext import load_pretrained
    from flowmol_ext.metrics import evaluate_molecules
    from flowmol_ext.model.sampler import SamplerConfig, sample_molecules

    model = load_pretrained(model_name)
    if compile_network:
        model.set_compile(True)
    cfg = SamplerConfig(steps=steps, position_sampler=sampler)
    mols = sample_molecules(model, n, cfg, seed=seed, progress=False)
    train = None
    if data_dir and Path(data_dir).is_dir():
        from flowmol_ext.data.store import load_train_smiles

        train = load_train_smiles(data_dir)
    met = evaluate_molecules(mols, train_smiles=train, train_smiles_canonical=True)
    close = 0
    for m in mols:
        if m.n_atoms > 1:
            d = torch.cdist(m.x.double(), m.x.double())
            d.fill_diagonal_(math.inf)
            close += int(float(d.min()) < 0.9)
    out = {k: float(v) for k, v in met.items()}
    out["n_min_distance_below_0.9A"] = float(close)
    if energy != "none":
        from fdc_mol.rewards import make_reward

        with make_reward(energy, executor=executor) as reward:
            res = reward(mols, with_grad=False)
        ok = np.asarray(res.ok, bool)
        e_atom = np.asarray(res.energy)[ok] / np.array([m.n_atoms for m in mols])[ok]
        out["reward_gate_pass"] = float(ok.mean())
        out[f"median_{energy}_energy_per_atom_hartree"] = float(np.median(e_atom)) if ok.any() else math.nan
    if sdf is not None:
        from fdc_mol.io import write_sdf

        props = [{"sample_index": i, "model": model_name, "sampler": sampler, "steps": steps, "seed": seed}
                 for i in range(len(mols))]
        if energy != "none":
            for i, p in enumerate(props):
                p.update(res.sdf_props(i))
        write_sdf(sdf, mols, props)
    return out


def run(args: argparse.Namespace) -> int:
    from fdc_mol.report import format_table

    if args.n_molecules < 1 or args.steps < 1:
        raise ValueError("--n-molecules and --steps must be >= 1")
    if args.sdf_dir is not None:
        from flowmol_ext.io_utils import check_writable_dir

        try:
            args.sdf_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"--sdf-dir {args.sdf_dir}: cannot create the folder ({err.strerror})") from None
        check_writable_dir(args.sdf_dir, "--sdf-dir")  # before sampling, not after
    cols = {s: model_card_metrics(args.model, args.n_molecules, args.steps, args.seed, s, args.data_dir,
                                  args.energy, args.executor,
                                  None if args.sdf_dir is None else args.sdf_dir / f"{s}.sdf",
                                  compile_network=args.compile)
            for s in args.samplers}
    keys = ["atom_stability", "molecule_stability", "validity", "connectivity", "uniqueness", "novelty",
            "reward_gate_pass", "n_min_distance_below_0.9A", f"median_{args.energy}_energy_per_atom_hartree"]
    n = args.n_molecules
    rows = []
    for k in keys:
        if not any(k in c for c in cols.values()):
            continue
        cells = []
        for c in cols.values():
            v = c.get(k, math.nan)
            if k in ("molecule_stability", "validity", "reward_gate_pass") and not math.isnan(v):
                lo, hi = wilson(round(v * n), n)
                cells.append(f"{v:.3f} [{lo:.3f}, {hi:.3f}]")
            else:
                cells.append(f"{v:.4g}")
        rows.append([k, *cells])
    print(f"{args.model}: {n} molecules per sampler, {args.steps} steps, seed {args.seed} (same sizes and noise)")
    print(format_table(["metric", *args.samplers], rows))
    if args.out:
        from flowmol_ext.io_utils import atomic_write_text

        atomic_write_text(args.out, json.dumps({"model": args.model, "n": n, "steps": args.steps, "seed": args.seed,
                                                "samplers": cols}, indent=1))
    return 0

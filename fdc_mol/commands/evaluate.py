"""``fdc-mol evaluate``: stability, validity, connectivity, uniqueness, novelty (and energies) of an SDF."""

from __future__ import annotations

import argparse
import inspect
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

HELP = (
    "Evaluate the molecules of any SDF (explicit H): atom/molecule stability, validity, connectivity, "
    "uniqueness, novelty against training SMILES, and optionally xTB/MMFF energies."
)

_ENERGY_METHODS = {"gfn1": ("gfn1", None), "gfn2": ("gfn2", None), "mmff": ("mmff94", "rdkit")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="SDF file (.sdf or .sdf.gz) with explicit hydrogens")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--train-smiles", type=Path, help="text file of training SMILES, one per line (novelty)")
    src.add_argument("--data-dir", type=Path, help="processed data directory (e.g. data/qm9) for training SMILES")
    p.add_argument("--energy", choices=["none", *_ENERGY_METHODS], default="none",
                   help="also compute single-point energies (Hartree) with GFN1/GFN2-xTB or MMFF94")
    p.add_argument("--engine", choices=["tblite", "xtb"], default="tblite", help="xTB engine for gfn1/gfn2")
    p.add_argument("--workers", type=int, default=1, help="worker processes for energies")
    p.add_argument("--out", type=Path, help="write the metrics as JSON here")
    p.add_argument("--geometry", action="store_true",
                   help="also relax each valid molecule with GFN2-xTB (tblite, L-BFGS): median relaxation energy "
                        "(kcal/mol) and heavy-atom RMSD (A); PoseBusters molecule checks; internal diversity")
    p.add_argument("--relax-max-steps", type=int, default=500, help="L-BFGS iterations per relaxation (--geometry)")
    p.add_argument("--relax-gtol", type=float, default=5e-4,
                   help="relaxation converged when the largest gradient component is below this, Eh/A")


def _train_smiles(args: argparse.Namespace) -> tuple[list[str] | None, bool, str]:
    """(smiles, already_canonical, note) from --train-smiles or --data-dir."""
    if args.train_smiles is not None:
        path = args.train_smiles
        if not path.is_file():
            raise FileNotFoundError(f"{path}: training SMILES file not found")
        smiles = [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]
        return smiles, False, f"novelty against {len(smiles)} SMILES from {path}"
    if args.data_dir is not None:
        try:
            from flowmol_ext.data.store import load_train_smiles
        except ImportError as err:
            return None, False, f"novelty skipped: cannot load training SMILES ({err})"
        try:
            smiles = sorted(load_train_smiles(args.data_dir))
        except (FileNotFoundError, ValueError) as err:
            return None, False, f"novelty skipped: {err}"
        return smiles, True, f"novelty against {len(smiles)} training SMILES of {args.data_dir}"
    return None, False, "novelty skipped: pass --train-smiles FILE or --data-dir DIR"


def _energies(args: argparse.Namespace, mols: list[Any]) -> dict[str, Any]:
    """Single-point energies (Hartree) of the parsed molecules via :func:`fdc_mol.rewards.make_reward`.

    Molecules the reward layer refuses (its validity gate, SCF failures) or that cannot be converted
    count as failures, with their reasons; means are over the successful ones.
    """
    import numpy as np

    from fdc_mol.rewards import make_reward
    from flowmol_ext.chem import from_rdkit

    method, engine = _ENERGY_METHODS[args.energy]
    engine = engine or args.engine
    kwargs: dict[str, Any] = {}
    if "executor" in inspect.signature(make_reward).parameters:
        kwargs["executor"] = "serial" if args.workers == 1 else f"local:{args.workers}"
    reward = make_reward(method, engine=engine, **kwargs)

    n = len(mols)
    energy = np.full(n, np.nan)
    n_atoms = np.zeros(n)
    reasons: list[str] = [""] * n
    converted, where = [], []
    for i, m in enumerate(mols):
        if m is None:
            reasons[i] = "unparsable record"
            continue
        try:
            converted.append(from_rdkit(m))
            where.append(i)
            n_atoms[i] = m.GetNumAtoms()
        except ValueError as err:
            reasons[i] = f"conversion: {err}"
    try:
        res = reward(converted, with_grad=False) if converted else None
    finally:
        close = getattr(reward, "close", None)
        if close is not None:
            close()
    if res is not None:
        for k, i in enumerate(where):
            if bool(res.ok[k]):
                energy[i] = float(res.energy[k])
            else:
                reasons[i] = res.reason[k] or "failed"
    ok = ~np.isnan(energy)
    counts = Counter(r for r in reasons if r)
    return {
        "energy_method": f"{method}/{engine}",
        "energy_mean_hartree": float(energy[ok].mean()) if ok.any() else math.nan,
        "energy_per_atom_mean_hartree": float((energy[ok] / n_atoms[ok]).mean()) if ok.any() else math.nan,
        "energy_n_ok": int(ok.sum()),
        "energy_n_failed": int((~ok).sum()),
        "energy_failure_reasons": dict(counts.most_common()),
    }


def _table(metrics: dict[str, Any]) -> str:
    rows = []
    order = [k for k in _FRACTIONS if k in metrics] + [k for k in metrics if k not in _FRACTIONS]
    for key in order:
        value = metrics[key]
        if isinstance(value, (dict, list)):
            continue
        if isinstance(value, float) and key in _FRACTIONS:
            text = "n/a" if math.isnan(value) else f"{100 * value:.2f} %"
        elif isinstance(value, float):
            text = "n/a" if math.isnan(value) else f"{value:.6g}"
        else:
            text = str(value)
        rows.append((key, text))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:>14}" for k, v in rows)


_FRACTIONS = (
    "atom_stability", "molecule_stability", "validity", "validity_whole", "connectivity",
    "valid_and_connected", "uniqueness", "novelty",
)


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def run(args: argparse.Namespace) -> int:
    from fdc_mol.io import read_sdf
    from fdc_mol.runlog import start_run
    from flowmol_ext.metrics import evaluate_molecules

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")}
    start_run("evaluate", seed=None, config=config)
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.relax_max_steps < 1 or args.relax_gtol <= 0:
        raise ValueError(f"--relax-max-steps must be >= 1 and --relax-gtol > 0, got {args.relax_max_steps} and "
                         f"{args.relax_gtol}")
    if args.out is not None:
        from flowmol_ext.io_utils import check_writable_dir

        check_writable_dir(args.out.parent, "--out")  # before the (possibly long) evaluation
    records = read_sdf(args.file)
    mols = [m for m, _ in records]
    bad = [why for m, why in records if m is None]
    train, canonical, note = _train_smiles(args)
    metrics: dict[str, Any] = {"file": str(args.file)}
    metrics.update(evaluate_molecules(mols, train_smiles=train, train_smiles_canonical=canonical))
    if train is None:
        metrics["novelty"] = math.nan  # skipped (see the note); null in the JSON
    if args.energy != "none":
        try:
            metrics.update(_energies(args, mols))
        except ImportError as err:
            raise ValueError(f"--energy {args.energy}: the reward layer is unavailable ({err})") from err
    if args.geometry:
        from fdc_mol.geometry import geometry_metrics

        metrics.update(geometry_metrics(mols, workers=args.workers, max_steps=args.relax_max_steps,
                                        gtol=args.relax_gtol))
    print(f"{args.file}: {len(records)} records")
    print(_table(metrics))
    if isinstance(metrics.get("posebusters"), dict):
        pb = metrics["posebusters"]
        print(f"PoseBusters pass rates (of {int(pb.get('n_checked', 0))} valid molecules): "
              + ", ".join(f"{k} {100 * v:.1f} %" for k, v in pb.items() if k not in ("n_checked", "n_failed")))
    elif "posebusters" in metrics:
        print(f"PoseBusters: {metrics['posebusters']}")
    for why, count in list(metrics.get("relax_failure_reasons", {}).items())[:10]:
        print(f"relaxation failed ({count}x): {why}")
    print(note)
    if metrics["n_missing_h"]:
        print(f"warning: {metrics['n_missing_h']} molecules have no explicit hydrogens; hydrogens are not "
              "invented, so they count as unstable (write the SDF with explicit H)")
    for why in bad[:10]:
        print(f"unparsable: {why}")
    if len(bad) > 10:
        print(f"... and {len(bad) - 10} more unparsable records")
    if "energy_failure_reasons" in metrics:
        for why, count in list(metrics["energy_failure_reasons"].items())[:10]:
            print(f"energy failed ({count}x): {why}")
    metrics["novelty_note"] = note
    metrics["unparsable_reasons"] = bad
    if args.out is not None:
        from flowmol_ext.io_utils import atomic_write_text

        atomic_write_text(args.out, json.dumps(_json_safe(metrics), indent=2, allow_nan=False) + "\n")
        print(f"wrote {args.out}")
    return 0

"""Benchmark the energy-reward layer: overhead vs plain tblite, 2 workers vs 1, cache hits.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_rewards.py [--n 200] [--method gfn1] [--repeat 3]

Molecules: the QM9 sample (tests/data/qm9/qm9_sample.csv), cycled to ``--n``, each copy jittered by
0.01 Å so that no two are identical. Prints molecules/s for every variant and the ratios. Timings are
the best of ``--repeat`` runs (the machine is shared).
"""

from __future__ import annotations

import argparse
import ast
import csv
import os
import sys
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fdc_mol.rewards import make_reward  # noqa: E402
from fdc_mol.rewards.base import ANGSTROM_PER_BOHR, HARTREE_PER_KELVIN  # noqa: E402
from flowmol_ext import ATOM_TYPES, CHARGE_OFFSET  # noqa: E402
from flowmol_ext.batch import Molecule  # noqa: E402


def load_molecules(n: int, seed: int = 0) -> list[Molecule]:
    """``n`` QM9-sample molecules (bonds from RDKit), jittered copies when cycling."""
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds

    base = []
    with open(ROOT / "tests" / "data" / "qm9" / "qm9_sample.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            els = ast.literal_eval(row["Elements"])
            xyz = np.array(ast.literal_eval(row["XYZ_Ang"]), dtype=np.float64)
            block = f"{len(els)}\n\n" + "\n".join(f"{e} {x:.10f} {y:.10f} {z:.10f}" for e, (x, y, z) in zip(els, xyz))
            mol = Chem.MolFromXYZBlock(block)
            try:
                rdDetermineBonds.DetermineBonds(mol, charge=0)
                Chem.Kekulize(mol, clearAromaticFlags=True)
                if any(a.GetFormalCharge() for a in mol.GetAtoms()):
                    continue  # keep neutral, charge-free molecules (the Molecule gets charge index 2)
            except Exception:  # noqa: BLE001 - skip the rare molecule RDKit cannot perceive
                continue
            bonds = [[min(b.GetBeginAtomIdx(), b.GetEndAtomIdx()), max(b.GetBeginAtomIdx(), b.GetEndAtomIdx()),
                      int(b.GetBondTypeAsDouble())] for b in mol.GetBonds()]
            base.append((els, xyz, bonds))
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        els, xyz, bonds = base[k % len(base)]
        x = xyz + (0.01 * rng.normal(size=xyz.shape) if k >= len(base) else 0.0)
        out.append(Molecule(
            x=torch.tensor(x, dtype=torch.float32), a=torch.tensor([ATOM_TYPES.index(e) for e in els]),
            c=torch.full((len(els),), CHARGE_OFFSET), bonds=torch.tensor(bonds, dtype=torch.long).reshape(-1, 3),
        ))
    return out


def direct_tblite(mols: list[Molecule], method: str) -> np.ndarray:
    """Plain loop: tblite singlepoint + gradient per molecule (the baseline), energies in Eh."""
    from tblite.interface import Calculator

    zmap = np.array([6, 1, 7, 8, 9])
    out = np.empty(len(mols))
    for k, m in enumerate(mols):
        z = zmap[m.a.numpy()]
        calc = Calculator({"gfn1": "GFN1-xTB", "gfn2": "GFN2-xTB"}[method], z,
                          m.x.numpy().astype(np.float64) / ANGSTROM_PER_BOHR, logger=lambda _s: None)
        calc.set("verbosity", 0)
        calc.set("temperature", 300.0 * HARTREE_PER_KELVIN)
        res = calc.singlepoint()
        out[k] = res.get("energy")
        _ = res.get("gradient")
    return out


def best_of(repeat: int, fn) -> tuple[float, object]:  # noqa: ANN001
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="number of molecules")
    ap.add_argument("--method", default="gfn1", choices=["gfn1", "gfn2"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    mols = load_molecules(args.n)
    n = len(mols)
    print(f"{n} QM9 molecules (mean {np.mean([m.n_atoms for m in mols]):.1f} atoms), {args.method}, "
          f"OMP_NUM_THREADS=1, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")

    t_direct, e_direct = best_of(args.repeat, lambda: direct_tblite(mols, args.method))
    rows = [("tblite direct loop (baseline)", t_direct)]

    def layer(spec: str, **kw):  # noqa: ANN202
        reward = make_reward(args.method, executor=spec, **kw)
        reward(mols[:4])  # start the pool (spawn + imports) outside the timing
        t, res = best_of(args.repeat, lambda: reward(mols))
        reward.close()
        assert res.ok.all(), [r for r in res.reason if r][:3]
        assert np.abs(res.energy - e_direct).max() < 1e-9
        return t

    t_nogate = layer("serial", watchdog=False, sanitize=False)
    t_serial_nowd = layer("serial", watchdog=False)
    t_serial = layer("serial")
    t_l1 = layer("local:1")
    t_l2 = layer("local:2")
    rows += [("layer, serial, no watchdog, no RDKit sanitise", t_nogate),
             ("layer, serial, no watchdog", t_serial_nowd), ("layer, serial, watchdog (default)", t_serial),
             ("layer, local:1 pool", t_l1), ("layer, local:2 pool", t_l2)]

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        reward = make_reward(args.method, executor="serial", cache_dir=tmp)
        t_fill, _ = best_of(1, lambda: reward(mols))
        t_hit, res = best_of(args.repeat, lambda: reward(mols))
        assert (res.extras["cached"] == 1).all()
        reward.close()
    rows += [("layer, serial + cache (cold, fills cache)", t_fill), ("layer, cache hits", t_hit)]

    print(f"{'variant':48s} {'time (s)':>9s} {'mol/s':>9s} {'ms/mol':>8s}")
    for name, t in rows:
        print(f"{name:48s} {t:9.3f} {n / t:9.1f} {1e3 * t / n:8.3f}")
    print("ratios:")
    print(f"  overhead serial, no sanitise/watchdog vs direct: {100 * (t_nogate / t_direct - 1):+.1f} %")
    print(f"  overhead serial, no watchdog vs direct: {100 * (t_serial_nowd / t_direct - 1):+.1f} %")
    print(f"  overhead serial, watchdog vs direct:    {100 * (t_serial / t_direct - 1):+.1f} %")
    print(f"  overhead local:1 pool vs direct:        {100 * (t_l1 / t_direct - 1):+.1f} %")
    print(f"  speed-up local:2 vs local:1:            {t_l1 / t_l2:.2f}x")
    print(f"  cache hit vs direct:                    {t_direct / t_hit:.1f}x faster "
          f"({1e6 * t_hit / n:.1f} us/mol)")


if __name__ == "__main__":
    main()

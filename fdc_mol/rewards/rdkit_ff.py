"""RDKit MMFF94 adapter: energy in Hartree (from kcal/mol), gradient dE/dx in Hartree/Å, relaxation.

MMFF needs a sanitised molecule with bonds (atom typing uses aromaticity and valences).
"""

from __future__ import annotations

import numpy as np

from fdc_mol.rewards.base import HARTREE_PER_KCAL_MOL, MolSpec
from fdc_mol.rewards.xtb import EnergyFn, EngineError

__all__ = ["make_mmff_function", "mmff_relax_positions"]


def _force_field(spec: MolSpec):  # noqa: ANN202 - returns (mol, ForceField)
    from rdkit import rdBase
    from rdkit.Chem import rdForceFieldHelpers as ffh

    from fdc_mol.rewards.gate import spec_to_rdkit

    try:
        with rdBase.BlockLogs():
            mol = spec_to_rdkit(spec, sanitize=True)
    except Exception as err:  # noqa: BLE001
        raise EngineError(f"MMFF94 needs a sanitisable molecule: {str(err).strip() or type(err).__name__}") from None
    props = ffh.MMFFGetMoleculeProperties(mol, mmffVariant="MMFF94")
    if props is None:
        raise EngineError("MMFF94 has no atom types/parameters for this molecule")
    ff = ffh.MMFFGetMoleculeForceField(mol, props, ignoreInterfragInteractions=False)
    if ff is None:
        raise EngineError("MMFF94 force field setup failed")
    return mol, ff


def make_mmff_function(spec: MolSpec) -> EnergyFn:
    """Return ``f(x_A) -> (energy Eh, gradient (n,3) Eh/Å)`` with the MMFF94 force field of ``spec``."""
    _, ff = _force_field(spec)
    n = spec.n_atoms

    def energy_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        flat = np.asarray(x, np.float64).reshape(-1).tolist()
        e = ff.CalcEnergy(flat)
        g = np.asarray(ff.CalcGrad(flat), np.float64).reshape(n, 3)
        if not np.isfinite(e) or not np.isfinite(g).all():
            raise EngineError("MMFF94 returned a non-finite energy or gradient")
        return float(e) * HARTREE_PER_KCAL_MOL, g * HARTREE_PER_KCAL_MOL

    return energy_grad


def mmff_relax_positions(spec: MolSpec, max_steps: int) -> np.ndarray:
    """MMFF94-minimised positions (n, 3) Å, starting from ``spec.x``."""
    _, ff = _force_field(spec)
    ff.Initialize()
    ff.Minimize(maxIts=int(max_steps))
    x = np.asarray(ff.Positions(), np.float64).reshape(spec.n_atoms, 3)
    if not np.isfinite(x).all():
        raise EngineError("MMFF94 relaxation produced non-finite positions")
    return x

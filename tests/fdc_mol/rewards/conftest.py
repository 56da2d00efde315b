"""Fixtures for the reward tests: QM9 sample molecules as :class:`Molecule` objects (bonds from RDKit)."""

from __future__ import annotations

import ast
import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmol_ext import ATOM_TYPES, CHARGE_OFFSET
from flowmol_ext.batch import Molecule

os.environ.setdefault("OMP_NUM_THREADS", "1")

QM9_CSV = Path(__file__).resolve().parents[2] / "data" / "qm9" / "qm9_sample.csv"


def qm9_rows(n: int) -> list[tuple[list[str], np.ndarray, str]]:
    """First ``n`` rows of the QM9 sample: (elements, positions (n_atoms,3) Å, SMILES)."""
    out = []
    with open(QM9_CSV, newline="") as fh:
        for row in csv.DictReader(fh):
            els = ast.literal_eval(row["Elements"])
            xyz = np.array(ast.literal_eval(row["XYZ_Ang"]), dtype=np.float64)
            out.append((els, xyz, row["SMILES"]))
            if len(out) == n:
                break
    return out


def molecule_from_xyz(elements: list[str], xyz: np.ndarray, with_bonds: bool = True) -> Molecule:
    """Molecule (float32 Å) with bonds from RDKit ``DetermineBonds`` (neutral) if ``with_bonds``."""
    a = torch.tensor([ATOM_TYPES.index(e) for e in elements], dtype=torch.long)
    bonds = torch.zeros((0, 3), dtype=torch.long)
    if with_bonds:
        from rdkit import Chem
        from rdkit.Chem import rdDetermineBonds

        lines = [f"{e} {x:.10f} {y:.10f} {z:.10f}" for e, (x, y, z) in zip(elements, xyz)]
        block = f"{len(elements)}\n\n" + "\n".join(lines)
        mol = Chem.MolFromXYZBlock(block)
        rdDetermineBonds.DetermineBonds(mol, charge=0)
        Chem.Kekulize(mol, clearAromaticFlags=True)
        rows = [[b.GetBeginAtomIdx(), b.GetEndAtomIdx(), int(b.GetBondTypeAsDouble())] for b in mol.GetBonds()]
        rows = [[min(i, j), max(i, j), o] for i, j, o in rows]
        bonds = torch.tensor(rows, dtype=torch.long).reshape(-1, 3)
    return Molecule(
        x=torch.tensor(xyz, dtype=torch.float32),
        a=a,
        c=torch.full((len(elements),), CHARGE_OFFSET, dtype=torch.long),
        bonds=bonds,
    )


@pytest.fixture(scope="session")
def qm9_molecules() -> list[Molecule]:
    """50 QM9 molecules (neutral, closed shell) with RDKit-perceived bonds."""
    return [molecule_from_xyz(e, x) for e, x, _ in qm9_rows(50)]

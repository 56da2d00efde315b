"""Molecules as tensors <-> RDKit molecules.

``to_rdkit`` builds an RDKit molecule with explicit hydrogens, formal charges, kekulized bonds and
a 3D conformer (Å) from a :class:`~flowmol_ext.batch.Molecule`. No sanitisation happens here:
callers decide (validity checks sanitise a copy).
"""

from __future__ import annotations

import torch
from rdkit import Chem
from rdkit.Geometry import Point3D

from flowmol_ext import ATOM_TYPES, CHARGE_OFFSET
from flowmol_ext.batch import Molecule

_BOND_TYPE = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}


def to_rdkit(mol: Molecule, sanitize: bool = False) -> Chem.Mol:
    """Build an RDKit molecule (explicit H, charges, Kekulé bonds, one 3D conformer in Å).

    Atom-type indices outside [0, 5) (e.g. a CTMC mask token left at the end of sampling) raise
    ``ValueError`` naming the atom; bond classes 0 are skipped.
    """
    rw = Chem.RWMol()
    a = mol.a.tolist()
    c = mol.c.tolist()
    for i, (ai, ci) in enumerate(zip(a, c)):
        if not 0 <= ai < len(ATOM_TYPES):
            raise ValueError(f"atom {i}: atom-type index {ai} is not one of {list(ATOM_TYPES)} (mask token?)")
        atom = Chem.Atom(ATOM_TYPES[ai])
        atom.SetFormalCharge(int(ci) - CHARGE_OFFSET)
        atom.SetNoImplicit(True)
        rw.AddAtom(atom)
    for i, j, order in mol.bonds.tolist():
        if order in _BOND_TYPE:
            rw.AddBond(int(i), int(j), _BOND_TYPE[order])
        elif order != 0:
            raise ValueError(f"bond ({i}, {j}): unknown bond class {order}")
    conf = Chem.Conformer(len(a))
    for i, (x, y, z) in enumerate(mol.x.detach().to(torch.float64).tolist()):
        conf.SetAtomPosition(i, Point3D(x, y, z))
    conf.Set3D(True)
    out = rw.GetMol()
    out.AddConformer(conf, assignId=True)
    if sanitize:
        Chem.SanitizeMol(out)
    return out

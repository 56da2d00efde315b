"""THE construction of an RDKit molecule from plain arrays (torch-free, so reward workers can import it).

Explicit hydrogens (no implicit H), formal charges, Kekulé bond orders 1–3 (0 = no bond, skipped), one 3D
conformer in Å. Every check raises ``ValueError`` naming the atom or bond; sanitisation (optional) raises
RDKit's errors. :func:`flowmol_ext.chem.to_rdkit` (tensors) and the reward gate (numpy specs) are thin
adapters around :func:`build_rdkit`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rdkit import Chem

__all__ = ["build_rdkit"]

_BOND_TYPE = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}


def build_rdkit(atoms: Sequence[int | str], charges: Sequence[int], bonds: np.ndarray | Sequence[Sequence[int]],
                positions: np.ndarray, sanitize: bool = False) -> Chem.Mol:
    """RDKit molecule from atoms (atomic numbers or element symbols, (n,)), formal charges (n,), bonds
    (k, 3) rows [i, j, order] and positions (n, 3) Å."""
    rw = Chem.RWMol()
    for a, q in zip(atoms, charges):
        atom = Chem.Atom(a if isinstance(a, str) else int(a))
        atom.SetFormalCharge(int(q))
        atom.SetNoImplicit(True)
        rw.AddAtom(atom)
    n = rw.GetNumAtoms()
    for i, j, order in np.asarray(bonds, dtype=np.int64).reshape(-1, 3).tolist():
        if not (0 <= i < n and 0 <= j < n) or i == j:
            raise ValueError(f"bond ({i}, {j}) refers to atoms outside 0..{n - 1} or is a self-bond")
        if order == 0:
            continue
        if order not in _BOND_TYPE:
            raise ValueError(f"bond ({i}, {j}): unknown bond order {order}")
        if rw.GetBondBetweenAtoms(i, j) is not None:
            raise ValueError(f"bond ({i}, {j}) is listed twice")
        rw.AddBond(i, j, _BOND_TYPE[order])
    x = np.ascontiguousarray(np.asarray(positions, dtype=np.float64).reshape(n, 3))
    conf = Chem.Conformer(n)
    conf.SetPositions(x)
    conf.Set3D(True)
    mol = rw.GetMol()
    mol.AddConformer(conf, assignId=True)
    if sanitize:
        Chem.SanitizeMol(mol)
    return mol

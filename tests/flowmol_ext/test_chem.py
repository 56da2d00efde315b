"""Tensors <-> RDKit conversion and the valence table, on real molecules.

Also holds the molecule builders the metric / IO / CLI tests import: RDKit-embedded molecules from
SMILES, and the committed QM9 sample with bonds perceived from its xyz coordinates.
"""

from __future__ import annotations

import ast
import csv
from functools import lru_cache

import pytest
import torch
from rdkit import Chem
from rdkit.Chem import AllChem, rdDetermineBonds

from flowmol_ext.batch import MolBatch, Molecule
from flowmol_ext.chem import (
    ALLOWED_VALENCES,
    atom_is_stable,
    atom_valences,
    batch_to_rdkit,
    from_rdkit,
    hydrogens_missing,
    to_rdkit,
)
from tests.conftest import QM9_SAMPLE_DIR

# ---------------------------------------------------------------------------------------------------
# Builders shared with the other test modules
# ---------------------------------------------------------------------------------------------------


def embed(smiles: str, seed: int = 0, kekulize: bool = True) -> Chem.Mol:
    """RDKit molecule with explicit H and one ETKDG conformer (fixed seed)."""
    m = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    if AllChem.EmbedMolecule(m, params) != 0:
        raise RuntimeError(f"embedding failed for {smiles}")
    if kekulize:
        Chem.Kekulize(m, clearAromaticFlags=True)
    return m


def molecule(smiles: str, seed: int = 0) -> Molecule:
    return from_rdkit(embed(smiles, seed))


def ref_smiles(smiles: str) -> str:
    return Chem.MolToSmiles(Chem.MolFromSmiles(smiles), isomericSmiles=False)


@lru_cache(maxsize=2)
def qm9_sample(kekulize: bool = True) -> tuple[tuple[Chem.Mol, str], ...]:
    """QM9 sample molecules whose perceived bonds (DetermineBonds, charge 0) reproduce the reference
    SMILES, as (unsanitized explicit-H mol, canonical reference SMILES). DetermineBonds marks
    aromatic rings; ``kekulize`` turns them into Kekulé single/double bonds."""
    out = []
    with open(QM9_SAMPLE_DIR / "qm9_sample.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            els = ast.literal_eval(row["Elements"])
            xyz = ast.literal_eval(row["XYZ_Ang"])
            block = f"{len(els)}\n\n" + "".join(f"{e} {x:.10f} {y:.10f} {z:.10f}\n" for e, (x, y, z) in zip(els, xyz))
            m = Chem.MolFromXYZBlock(block)
            try:
                rdDetermineBonds.DetermineBonds(m, charge=0)
                s = Chem.Mol(m)
                Chem.SanitizeMol(s)
            except Exception:  # noqa: BLE001 - perception failures are dropped, as the issue says
                continue
            ref = ref_smiles(row["SMILES"])
            if Chem.MolToSmiles(Chem.RemoveHs(s), isomericSmiles=False) == ref:
                if kekulize:
                    Chem.Kekulize(m, clearAromaticFlags=True)
                m.SetProp("_Name", f"qm9_{row['Index']}")
                out.append((m, ref))
    return tuple(out)


def handmade(a: list[int], bonds: list[list[int]], charges: list[int] | None = None) -> Molecule:
    """Molecule from atom types, bonds [i, j, order] and formal charges; atoms on a line 1.1 Å apart."""
    n = len(a)
    x = torch.zeros(n, 3)
    x[:, 0] = torch.arange(n, dtype=torch.float32) * 1.1
    c = torch.tensor([q + 2 for q in (charges or [0] * n)])
    return Molecule(x=x, a=torch.tensor(a), c=c, bonds=torch.tensor(bonds, dtype=torch.long).reshape(-1, 3))


# C=0 H=1 N=2 O=3 F=4
def ch5() -> Molecule:  # carbon with five bonds
    return handmade([0, 1, 1, 1, 1, 1], [[0, k, 1] for k in range(1, 6)])


def methyl_radical() -> Molecule:  # neutral carbon with valence 3
    return handmade([0, 1, 1, 1], [[0, k, 1] for k in range(1, 4)])


def ammonium() -> Molecule:  # N+ with four bonds: stable
    return handmade([2, 1, 1, 1, 1], [[0, k, 1] for k in range(1, 5)], [1, 0, 0, 0, 0])


def methane_and_water() -> Molecule:  # two fragments, both fine
    return handmade([0, 1, 1, 1, 1, 3, 1, 1], [[0, 1, 1], [0, 2, 1], [0, 3, 1], [0, 4, 1], [5, 6, 1], [5, 7, 1]])


def methane_and_bad_oxygen() -> Molecule:  # largest fragment fine, small fragment O with 3 bonds, neutral
    return handmade(
        [0, 1, 1, 1, 1, 3, 1, 1, 1], [[0, 1, 1], [0, 2, 1], [0, 3, 1], [0, 4, 1], [5, 6, 1], [5, 7, 1], [5, 8, 1]]
    )


# ---------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------

SMILES = ["CCO", "c1ccccc1O", "C[N+](C)(C)C", "O=[N+]([O-])c1ccncc1", "FC(F)(F)C#N", "[O-]C(=O)C[NH3+]"]


@pytest.mark.parametrize("smiles", SMILES)
def test_round_trip_keeps_atoms_charges_bonds_positions(smiles: str) -> None:
    src = embed(smiles)
    mol = from_rdkit(src)
    assert mol.n_atoms == src.GetNumAtoms()
    assert mol.bonds.shape[1] == 3 and bool((mol.bonds[:, 0] < mol.bonds[:, 1]).all())
    assert set(mol.bonds[:, 2].tolist()) <= {1, 2, 3}
    assert int((mol.c - 2).sum()) == Chem.GetFormalCharge(src)
    torch.testing.assert_close(mol.x, torch.tensor(src.GetConformer().GetPositions(), dtype=torch.float32))
    back = to_rdkit(mol, sanitize=True)
    assert Chem.MolToSmiles(Chem.RemoveHs(back), isomericSmiles=False) == ref_smiles(smiles)
    again = from_rdkit(back)
    assert torch.equal(again.bonds, mol.bonds) and torch.equal(again.a, mol.a) and torch.equal(again.c, mol.c)


def test_from_rdkit_kekulizes_aromatic_input() -> None:
    benzene = embed("c1ccccc1", kekulize=False)
    assert any(b.GetIsAromatic() for b in benzene.GetBonds())
    mol = from_rdkit(benzene)
    orders = sorted(o for i, j, o in mol.bonds.tolist() if mol.a[i] == 0 and mol.a[j] == 0)
    assert orders == [1, 1, 1, 2, 2, 2]
    assert benzene.GetBondWithIdx(0).GetIsAromatic()  # the input is not modified


def test_from_rdkit_rejects_bad_input_with_precise_messages() -> None:
    with pytest.raises(ValueError, match=r"atom 1 \(Cl\): element not in"):
        from_rdkit(embed("CCl"))
    heavy_only = Chem.MolFromSmiles("CCO")
    AllChem.Compute2DCoords(heavy_only)
    assert hydrogens_missing(heavy_only)
    with pytest.raises(ValueError, match="no explicit hydrogen atoms"):
        from_rdkit(heavy_only)
    with pytest.raises(ValueError, match="no conformer"):
        from_rdkit(Chem.AddHs(Chem.MolFromSmiles("C")))
    with pytest.raises(ValueError, match="mask token"):
        to_rdkit(handmade([0, 5], [[0, 1, 1]]))


def test_hydrogens_missing_is_false_for_explicit_h_radicals() -> None:
    assert not hydrogens_missing(to_rdkit(methyl_radical()))
    assert not hydrogens_missing(embed("CCO"))


def test_valence_table_known_entries() -> None:
    # The MiDi pitfall: neutral carbon with valence 3 must be unstable.
    assert not atom_is_stable("C", 0, 3) and atom_is_stable("C", 0, 4)
    assert atom_is_stable("C", -1, 3) and atom_is_stable("C", 1, 3)
    assert atom_is_stable("N", 0, 3) and atom_is_stable("N", 1, 4) and atom_is_stable("N", -1, 2)
    assert not atom_is_stable("N", 0, 4) and not atom_is_stable("N", 0, 5) and not atom_is_stable("N", 0, 2)
    assert atom_is_stable("O", 0, 2) and atom_is_stable("O", 1, 3) and atom_is_stable("O", -1, 1)
    assert atom_is_stable("H", 0, 1) and atom_is_stable("F", 0, 1)
    assert not atom_is_stable("H", 1, 0) and not atom_is_stable("F", -1, 0) and not atom_is_stable("C", 2, 2)
    # Aromatic 1.5 orders are never cast to int: 1.5 + 1.5 + 1 = 4.0 is fine, 1.5 + 1 + 1 = 3.5 is not.
    assert not atom_is_stable("C", 0, 3.5) and atom_is_stable("C", 0, 4.0)
    assert len(ALLOWED_VALENCES) == 11


def test_qm9_sample_kekule_valences_all_in_table() -> None:
    mols = qm9_sample()
    assert len(mols) >= 270  # 283 of 312 with rdDetermineBonds + SMILES match
    n_atoms = n_charged = 0
    for m, _ in mols:
        for atom, v in zip(m.GetAtoms(), atom_valences(m)):
            assert atom_is_stable(atom.GetSymbol(), atom.GetFormalCharge(), v), (m.GetProp("_Name"), atom.GetIdx())
            n_atoms += 1
            n_charged += atom.GetFormalCharge() != 0
    assert n_atoms == 4407 and n_charged == 4  # two zwitterions in the sample


def _all_stable(m: Chem.Mol) -> bool:
    return all(atom_is_stable(a.GetSymbol(), a.GetFormalCharge(), v) for a, v in zip(m.GetAtoms(), atom_valences(m)))


def test_qm9_sample_aromatic_orders_without_kekulizing_break_stability() -> None:
    """The pitfall the table avoids: summing RDKit's 1.5 aromatic orders marks ring atoms unstable."""
    aromatic = [m for m, _ in qm9_sample(kekulize=False) if any(b.GetIsAromatic() for b in m.GetBonds())]
    assert len(aromatic) == 37
    n_unstable_mols = sum(not _all_stable(m) for m in aromatic)
    assert n_unstable_mols == 31  # measured: 31 of 37 aromatic molecules (pyrrole-type N, furan O, ...)
    # from_rdkit kekulizes: every one of them is stable again
    for m in aromatic:
        assert _all_stable(to_rdkit(from_rdkit(m)))


def test_batch_to_rdkit_matches_each_molecule() -> None:
    smiles = ["CCO", "c1ccccc1O", "C[N+](C)(C)C"]
    batch = MolBatch.from_molecules([molecule(s) for s in smiles])
    out = batch_to_rdkit(batch)
    assert len(out) == 3
    for m, s in zip(out, smiles):
        Chem.SanitizeMol(m)
        assert Chem.MolToSmiles(Chem.RemoveHs(m), isomericSmiles=False) == ref_smiles(s)
        assert m.GetConformer().Is3D()


def test_one_rdkit_builder_for_tensors_and_reward_specs() -> None:
    """to_rdkit (tensors) and the reward gate's spec_to_rdkit (numpy, torch-free) give the same molecule and
    the same errors: both are adapters of flowmol_ext.rdkit_build.build_rdkit."""
    import numpy as np
    import pytest
    import torch
    from rdkit import Chem

    from fdc_mol.rewards.base import spec_from_molecule
    from fdc_mol.rewards.gate import spec_to_rdkit
    from flowmol_ext.batch import Molecule
    from flowmol_ext.chem import to_rdkit

    # methanol with explicit hydrogens
    x = torch.tensor([[0.0, 0.0, 0.0], [1.43, 0.0, 0.0], [-0.36, 1.03, 0.0], [-0.36, -0.51, 0.89],
                      [-0.36, -0.51, -0.89], [1.75, 0.9, 0.0]])
    a = torch.tensor([0, 3, 1, 1, 1, 1])
    bonds = torch.tensor([[0, 1, 1], [0, 2, 1], [0, 3, 1], [0, 4, 1], [1, 5, 1]])
    m = Molecule(x=x, a=a, c=torch.full((6,), 2), bonds=bonds)
    r1, r2 = to_rdkit(m, sanitize=True), spec_to_rdkit(spec_from_molecule(m), sanitize=True)
    assert Chem.MolToSmiles(r1) == Chem.MolToSmiles(r2) and Chem.MolToSmiles(Chem.RemoveHs(r1)) == "CO"
    np.testing.assert_allclose(r1.GetConformer().GetPositions(), r2.GetConformer().GetPositions())
    dup = Molecule(x=x, a=a, c=torch.full((6,), 2), bonds=torch.cat([bonds, bonds[:1]]))
    for build in (lambda: to_rdkit(dup), lambda: spec_to_rdkit(spec_from_molecule(dup), sanitize=False)):
        with pytest.raises(ValueError, match=r"bond \(0, 1\) is listed twice"):
            build()

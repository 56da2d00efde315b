"""Metrics against known answers: real QM9 / RDKit molecules, hand-made broken ones, known lists."""

from __future__ import annotations

import math

import pytest
import torch
from rdkit import Chem
from rdkit.Chem import AllChem

from flowmol_ext.batch import MolBatch
from flowmol_ext.chem import from_rdkit, to_rdkit
from flowmol_ext.metrics import (
    AtomStability,
    Connectivity,
    MoleculeStability,
    Novelty,
    Uniqueness,
    Validity,
    assess,
    atom_stability,
    canonical_smiles,
    evaluate_molecules,
    is_connected,
    is_valid,
    molecule_stable,
    smiles_hash,
)
from tests.flowmol_ext.test_chem import (
    ammonium,
    ch5,
    embed,
    handmade,
    methane_and_bad_oxygen,
    methane_and_water,
    methyl_radical,
    molecule,
    qm9_sample,
    ref_smiles,
)


def test_qm9_sample_scores_100_percent() -> None:
    pairs = qm9_sample()
    mols = [from_rdkit(m) for m, _ in pairs]
    res = evaluate_molecules(mols)
    for key in ("atom_stability", "molecule_stability", "validity", "validity_whole", "connectivity", "uniqueness"):
        assert res[key] == 1.0, key
    assert res["n_molecules"] == len(pairs) == 283
    assert res["n_atoms"] == 4407
    assert res["mean_n_atoms"] == pytest.approx(4407 / 283)
    # canonical SMILES of the generated graph equal the reference SMILES
    assert all(canonical_smiles(m) == ref for m, (_, ref) in zip(mols, pairs))
    # the same answer straight from the RDKit molecules (aromatic, as DetermineBonds leaves them)
    res_rd = evaluate_molecules([m for m, _ in qm9_sample(kekulize=False)])
    assert res_rd["molecule_stability"] == 1.0 and res_rd["validity"] == 1.0


@pytest.mark.parametrize("smiles", ["CCO", "c1ccccc1O", "C[N+](C)(C)C", "O=[N+]([O-])c1ccncc1", "[O-]C(=O)C[NH3+]"])
def test_rdkit_molecules_are_stable_and_valid(smiles: str) -> None:
    for mol in (molecule(smiles), embed(smiles), embed(smiles, kekulize=False)):
        assert molecule_stable(mol) and is_valid(mol) and is_valid(mol, largest_fragment=False)
        assert is_connected(mol)
        assert canonical_smiles(mol) == ref_smiles(smiles)


def test_carbon_with_five_bonds() -> None:
    m = ch5()
    assert atom_stability(m) == [False, True, True, True, True, True]
    assert not molecule_stable(m)
    assert not is_valid(m) and not is_valid(m, largest_fragment=False)
    assert is_connected(m) and canonical_smiles(m) is None
    assert "valence" in assess(m).reason.lower()


def test_neutral_carbon_radical_is_unstable_but_valid() -> None:
    m = methyl_radical()
    assert atom_stability(m) == [False, True, True, True]
    assert not molecule_stable(m)
    assert is_valid(m)  # RDKit sanitises radicals (EDM/MiDi convention)
    assert canonical_smiles(m) == "[CH3]"  # never turned into methane


def test_charged_ammonium_is_stable() -> None:
    m = ammonium()
    assert molecule_stable(m) and is_valid(m) and canonical_smiles(m) == "[NH4+]"
    neutral = handmade([2, 1, 1, 1, 1], [[0, k, 1] for k in range(1, 5)])
    assert not molecule_stable(neutral) and not is_valid(neutral)


def test_fragments() -> None:
    two = methane_and_water()
    assert molecule_stable(two)  # stability is per atom
    assert not is_connected(two)
    assert is_valid(two) and is_valid(two, largest_fragment=False)
    assert canonical_smiles(two) == "C" and canonical_smiles(two, largest_fragment=False) == "C.O"
    bad_small = methane_and_bad_oxygen()
    assert is_valid(bad_small) and not is_valid(bad_small, largest_fragment=False)
    assert not molecule_stable(bad_small)


def test_aromatic_bond_that_cannot_be_kekulized_is_unstable() -> None:
    m = Chem.RWMol(embed("CCC"))
    b = m.GetBondBetweenAtoms(0, 1)
    b.SetBondType(Chem.BondType.AROMATIC)
    b.SetIsAromatic(True)
    # 1.5 is not cast to 1: carbon 0 has 1.5 + 3 = 4.5, carbon 1 has 1.5 + 1 + 2 = 4.5
    flags = atom_stability(m.GetMol())
    assert flags[:3] == [False, False, True]


def test_heavy_atom_only_molecule_is_flagged_not_fixed() -> None:
    m = Chem.MolFromSmiles("CCO")
    AllChem.Compute2DCoords(m)
    rec = assess(m)
    assert rec.missing_h and not rec.stable
    res = evaluate_molecules([m, embed("CCO")])
    assert res["n_missing_h"] == 1 and res["molecule_stability"] == 0.5


def test_known_answers_on_a_mixed_list() -> None:
    mols = [molecule("CCO", 0), molecule("CCO", 1), molecule("C"), ch5(), methyl_radical(), methane_and_water(), None]
    res = evaluate_molecules(mols, train_smiles=["OCC", "not a smiles"])
    assert res["n_molecules"] == 7 and res["n_unparsable"] == 1
    assert res["molecule_stability"] == pytest.approx(4 / 7)  # ethanol x2, methane, methane+water
    assert res["atom_stability"] == pytest.approx((9 + 9 + 5 + 5 + 3 + 8) / (9 + 9 + 5 + 6 + 4 + 8))
    assert res["validity"] == pytest.approx(5 / 7)  # all but CH5 and the unparsable record
    assert res["validity_whole"] == pytest.approx(5 / 7)
    assert res["connectivity"] == pytest.approx(5 / 7)  # methane+water and None are not connected
    assert res["valid_and_connected"] == pytest.approx(4 / 7)
    # valid SMILES: CCO, CCO, C, [CH3], C -> unique {CCO, C, [CH3]}
    assert res["n_valid"] == 5 and res["n_unique"] == 3
    assert res["uniqueness"] == pytest.approx(3 / 5)
    assert res["n_novel"] == 2 and res["novelty"] == pytest.approx(2 / 3)  # CCO is in train (as "OCC")
    assert res["mean_n_atoms"] == pytest.approx((9 + 9 + 5 + 6 + 4 + 8) / 6)
    assert "novelty" not in evaluate_molecules(mols)


def test_empty_input_gives_nan_not_zero() -> None:
    res = evaluate_molecules([])
    assert math.isnan(res["validity"]) and math.isnan(res["uniqueness"]) and res["n_molecules"] == 0


def test_metric_classes_accept_molbatch() -> None:
    batch = MolBatch.from_molecules([molecule("CCO"), ch5(), molecule("CCO", 3)])
    m = MoleculeStability()
    m.update(batch)
    assert float(m.compute()) == pytest.approx(2 / 3)
    u = Uniqueness()
    u.update(batch)
    assert float(u.compute()) == pytest.approx(1 / 2)


def _all_metrics() -> list:
    return [
        AtomStability(), MoleculeStability(), Validity(), Validity(largest_fragment=False), Connectivity(),
        Uniqueness(), Novelty(["CCO", "C"]),
    ]


def test_merged_states_equal_the_union() -> None:
    """DDP safety without processes: states of two 'ranks' merged == one metric on all data."""
    part_a = [molecule("CCO"), ch5(), methane_and_water(), molecule("c1ccccc1O")]
    part_b = [molecule("CCO", 2), methyl_radical(), methane_and_bad_oxygen(), molecule("CC#N")]
    for whole, rank0, rank1, empty in zip(_all_metrics(), _all_metrics(), _all_metrics(), _all_metrics()):
        whole.update(part_a + part_b)
        rank0.update(part_a)
        rank1.update(part_b)
        rank0.merge_state(rank1)
        rank0.merge_state(empty)  # a rank that saw no data
        assert float(rank0.compute()) == pytest.approx(float(whole.compute())), type(whole).__name__
    u = Uniqueness()
    u.update(part_a)
    u.merge_state(Uniqueness())
    assert u.hashes.dtype == torch.long  # hashes are never cast to float


def test_metric_values_on_the_merged_example() -> None:
    part = [molecule("CCO"), molecule("CCO", 2), ch5(), methane_and_water(), methyl_radical(), molecule("CC#N")]
    names = ["atom", "mol", "valid", "valid_whole", "conn", "uniq", "novel"]
    got = {}
    for name, metric in zip(names, _all_metrics()):
        metric.update(part)
        got[name] = float(metric.compute())
    assert got["mol"] == pytest.approx(4 / 6)
    assert got["valid"] == pytest.approx(5 / 6) and got["valid_whole"] == pytest.approx(5 / 6)
    assert got["conn"] == pytest.approx(5 / 6)
    # valid: CCO, CCO, C (largest of methane+water), [CH3], CC#N -> 4 unique of 5
    assert got["uniq"] == pytest.approx(4 / 5)
    assert got["novel"] == pytest.approx(2 / 4)  # [CH3] and CC#N are new; CCO and C are in train
    assert got["atom"] == pytest.approx((9 + 9 + 5 + 8 + 3 + 6) / (9 + 9 + 6 + 8 + 4 + 6))


def test_smiles_hash_is_deterministic_int64() -> None:
    h = smiles_hash("CCO")
    assert h == smiles_hash("CCO") and h != smiles_hash("OCC")
    assert -(2**63) <= h < 2**63
    assert torch.tensor([h]).dtype == torch.long


def test_to_rdkit_input_not_modified_by_metrics() -> None:
    m = to_rdkit(methyl_radical())
    before = Chem.MolToMolBlock(m)
    assess(m)
    assert Chem.MolToMolBlock(m) == before

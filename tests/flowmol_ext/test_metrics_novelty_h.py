"""Novelty of molecules written by other tools: explicit H that define double-bond stereo (imines)
must not make a known molecule look novel."""

from __future__ import annotations

from pathlib import Path

from rdkit import Chem
from rdkit.Chem import AllChem

from fdc_mol.cli import main
from fdc_mol.io import read_sdf, write_sdf
from flowmol_ext.metrics import canonical_smiles, canonicalize_smiles


def _imine_sdf(path: Path) -> Path:
    m = Chem.AddHs(Chem.MolFromSmiles("CC=N"))
    AllChem.EmbedMolecule(m, randomSeed=1)
    Chem.AssignStereochemistryFrom3D(m)  # as a reader of another tool's 3D SDF does: the C=N gets E/Z
    write_sdf(path, [m])
    return path


def test_stereo_defining_h_is_removed_for_canonical_smiles(tmp_path: Path) -> None:
    ((mol, why),) = read_sdf(_imine_sdf(tmp_path / "imine.sdf"))
    assert why is None
    assert canonical_smiles(mol) == "CC=N" == canonicalize_smiles("CC=N") == canonicalize_smiles("[H]/N=C/C")


def test_evaluate_imine_against_its_training_smiles_is_not_novel(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    sdf = _imine_sdf(tmp_path / "imine.sdf")
    (tmp_path / "train.txt").write_text("CC=N\n")
    assert main(["evaluate", str(sdf), "--train-smiles", str(tmp_path / "train.txt"), "--out",
                 str(tmp_path / "m.json")]) == 0
    import json

    assert json.loads((tmp_path / "m.json").read_text())["novelty"] == 0.0

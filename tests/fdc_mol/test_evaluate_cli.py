"""``fdc-mol evaluate`` on SDFs written by RDKit directly and by our writer, plus the QM9 acceptance check."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from rdkit import Chem

from fdc_mol.cli import main
from fdc_mol.io import write_sdf
from tests.conftest import QM9_SAMPLE_DIR
from tests.flowmol_ext.test_chem import ch5, embed, methyl_radical, molecule

SMILES = ["CCO", "c1ccccc1O", "C[N+](C)(C)C", "O=[N+]([O-])c1ccncc1", "CC#N"]


def _evaluate(tmp_path: Path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "metrics.json"
    rc = main(["evaluate", *args, "--out", str(out)])
    return rc, (json.loads(out.read_text()) if out.exists() else {})


def test_sdf_written_by_rdkit_directly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Another tool's file: RDKit's own SDWriter, aromatic bonds left as bond type 4."""
    path = tmp_path / "rdkit.sdf"
    writer = Chem.SDWriter(str(path))
    writer.SetKekulize(False)
    for i, s in enumerate(SMILES):
        m = embed(s, kekulize=False)
        m.SetProp("_Name", f"mol{i}")
        writer.write(m)
    writer.write(embed("CCO", seed=5))  # a duplicate
    writer.close()
    assert "  1  2  4  0" in path.read_text() or "  2  4  0" in path.read_text()  # aromatic bonds present
    train = tmp_path / "train.txt"
    train.write_text("OCC\nC1=CC=CC=C1O\n")  # non-canonical spellings of two of them
    rc, res = _evaluate(tmp_path, str(path), "--train-smiles", str(train))
    assert rc == 0
    assert res["n_molecules"] == 6
    for key in ("atom_stability", "molecule_stability", "validity", "validity_whole", "connectivity"):
        assert res[key] == 1.0, key
    assert res["uniqueness"] == pytest.approx(5 / 6)
    assert res["novelty"] == pytest.approx(3 / 5)
    text = capsys.readouterr().out
    assert "molecule_stability" in text and "100.00 %" in text and "novelty against 2 SMILES" in text


def test_sdf_written_by_our_writer_with_broken_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_sdf(
        tmp_path / "ours.sdf",
        [molecule("CCO"), ch5(), methyl_radical(), molecule("CC#N")],
        [{"energy_Eh": float("nan")}, {}, {}, {"reason": "none"}],
    )
    with open(path, "a") as fh:
        fh.write("junk\n\n\n  2  1  0  0  0  0  0  0  0  0999 V2000\nnot an atom\nM  END\n$$$$\n")
    rc, res = _evaluate(tmp_path, str(path))
    assert rc == 0
    assert res["n_molecules"] == 5 and res["n_unparsable"] == 1
    assert res["molecule_stability"] == pytest.approx(2 / 5)
    assert res["validity"] == pytest.approx(3 / 5)  # CCO, the radical, CC#N
    assert res["uniqueness"] == 1.0 and res["novelty"] is None
    assert "record 5" in res["unparsable_reasons"][0]
    out = capsys.readouterr().out
    assert "novelty skipped" in out and "unparsable:" in out


def test_heavy_atom_only_sdf_is_flagged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "noh.sdf"
    writer = Chem.SDWriter(str(path))
    writer.write(Chem.RemoveHs(embed("CCO")))
    writer.close()
    rc, res = _evaluate(tmp_path, str(path))
    assert rc == 0 and res["n_missing_h"] == 1 and res["molecule_stability"] == 0.0
    assert "no explicit hydrogens" in capsys.readouterr().out


def test_missing_inputs_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(tmp_path / "nope.sdf")]) == 2
    assert "no such SDF file" in capsys.readouterr().err
    path = write_sdf(tmp_path / "a.sdf", [molecule("C")])
    rc, res = _evaluate(tmp_path, str(path), "--data-dir", str(tmp_path / "no_data"))
    assert rc == 0 and res["novelty"] is None and "novelty skipped" in res["novelty_note"]


def test_energy_mmff_matches_rdkit(tmp_path: Path) -> None:
    rewards = pytest.importorskip("fdc_mol.rewards")
    if not hasattr(rewards, "make_reward"):
        pytest.skip("reward layer has no make_reward")
    from rdkit.Chem import AllChem

    from fdc_mol.rewards.base import HARTREE_PER_KCAL_MOL

    mols = [embed("CCO"), embed("CC#N")]
    path = tmp_path / "e.sdf"
    write_sdf(path, mols, v3000=True)
    expected = []
    for m in mols:
        s = Chem.Mol(m)
        Chem.SanitizeMol(s)
        ff = AllChem.MMFFGetMoleculeForceField(s, AllChem.MMFFGetMoleculeProperties(s))
        expected.append(ff.CalcEnergy() * HARTREE_PER_KCAL_MOL)
    rc, res = _evaluate(tmp_path, str(path), "--energy", "mmff")
    assert rc == 0 and res["energy_n_ok"] == 2 and res["energy_n_failed"] == 0
    # Molecule positions are float32 (~1e-7 Å), so agreement is to ~1e-7 Eh, not machine precision
    assert res["energy_mean_hartree"] == pytest.approx(sum(expected) / 2, abs=1e-6)
    per_atom = (expected[0] / 9 + expected[1] / 6) / 2
    assert res["energy_per_atom_mean_hartree"] == pytest.approx(per_atom, abs=1e-7)


@pytest.fixture(scope="module")
def processed_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed QM9 sample run through the real data pipeline (bond perception + SMILES repair)."""
    qm9 = pytest.importorskip("flowmol_ext.data.qm9")
    d = tmp_path_factory.mktemp("qm9_processed")
    qm9.process_qm9(
        source="csv",
        path=QM9_SAMPLE_DIR / "qm9_sample.csv",
        data_dir=d,
        cache_dir=d / "cache",
        workers=1,
        progress=False,
    )
    return d


def _split_sdf(data_dir: Path, split: str, path: Path, limit: int | None = None) -> Path:
    from flowmol_ext.data.store import load_split

    store = load_split(data_dir, split)
    n = len(store) if limit is None else min(limit, len(store))
    return write_sdf(path, [store[i] for i in range(n)])


@pytest.mark.slow
def test_acceptance_processed_qm9_test_split(processed_sample: Path, tmp_path: Path) -> None:
    """Issue acceptance: real QM9 test molecules score >= 99 % validity and molecule stability."""
    sdf = _split_sdf(processed_sample, "test", tmp_path / "test.sdf")
    rc, res = _evaluate(tmp_path, str(sdf), "--data-dir", str(processed_sample))
    assert rc == 0 and res["n_molecules"] == 32
    assert res["validity"] >= 0.99 and res["molecule_stability"] >= 0.99
    assert res["molecule_stability"] == 1.0 and res["validity"] == 1.0 and res["atom_stability"] == 1.0
    assert res["novelty"] == 1.0  # test molecules are not in the training split
    sdf_train = _split_sdf(processed_sample, "train", tmp_path / "train.sdf")
    rc, res = _evaluate(tmp_path, str(sdf_train), "--data-dir", str(processed_sample))
    assert rc == 0 and res["n_molecules"] == 226 and res["molecule_stability"] == 1.0
    assert res["novelty"] == 0.0  # our canonical SMILES agree with the pipeline's train_smiles.txt


@pytest.mark.full_data
def test_acceptance_full_qm9_test_split(tmp_path: Path) -> None:
    """Same check on the full processed test split (opt-in: FDC_MOL_FULL_DATA=1, FDC_MOL_DATA_DIR)."""
    data_dir = Path(os.environ.get("FDC_MOL_DATA_DIR", "data/qm9"))
    sdf = _split_sdf(data_dir, "test", tmp_path / "test.sdf")
    rc, res = _evaluate(tmp_path, str(sdf), "--data-dir", str(data_dir))
    assert rc == 0 and res["n_molecules"] > 13000
    assert res["validity"] >= 0.99 and res["molecule_stability"] >= 0.99

"""SDF writing (atomic, SD properties, V2000/V3000 precision) and tolerant reading."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import pytest
import torch
from rdkit import Chem

from fdc_mol.io import format_sd_value, read_sdf, write_sdf
from flowmol_ext.chem import from_rdkit
from tests.flowmol_ext.test_chem import ch5, embed, methyl_radical, molecule, qm9_sample

BAD_RECORD = "broken\n  tool\n\n  3  2  0  0  0  0  0  0  0  0999 V2000\nthis is not an atom line\nM  END\n$$$$\n"


def test_round_trip_molecules_and_properties(tmp_path: Path) -> None:
    nitro = molecule("O=[N+]([O-])c1ccncc1")
    nitro.props["qm9_index"] = 7
    mols = [nitro, embed("CCO"), ch5()]
    props = [
        {"energy_Eh": float("nan"), "reason": "scf not converged\nafter 250 iterations", "name": "first"},
        {"energy_Eh": -154.123456789012, "ok": True, "forces": [1.0, 2.5]},
        {"energy_Eh": torch.tensor(-1.5, dtype=torch.float64)},
    ]
    path = write_sdf(tmp_path / "out.sdf", mols, props, v3000=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out.sdf"]  # no temporary files left
    records = read_sdf(path)
    assert [why for _, why in records] == [None, None, None]
    first, second, third = (m for m, _ in records)
    p = first.GetPropsAsDict()
    assert math.isnan(p["energy_Eh"]) and p["reason"] == "scf not converged after 250 iterations"
    assert p["qm9_index"] == 7 and first.GetProp("_Name") == "first"
    assert second.GetPropsAsDict()["energy_Eh"] == -154.123456789012  # repr precision
    assert second.GetProp("ok") == "1" and second.GetProp("forces") == "[1.0, 2.5]"
    assert third.GetPropsAsDict()["energy_Eh"] == -1.5
    back = from_rdkit(first)
    assert torch.equal(back.bonds, nitro.bonds) and torch.equal(back.c, nitro.c) and torch.equal(back.a, nitro.a)
    assert (back.x - nitro.x).abs().max() <= 5.1e-5  # V2000: 4 decimals
    # the invalid CH5 survives the round trip unchanged (no sanitisation on either side)
    assert torch.equal(from_rdkit(third).bonds, ch5().bonds)
    assert "M  CHG" in path.read_text()


def test_v3000_keeps_more_precision(tmp_path: Path) -> None:
    mols = [from_rdkit(m) for m, _ in qm9_sample()[:20]]
    write_sdf(tmp_path / "v3.sdf", mols, v3000=True)
    text = (tmp_path / "v3.sdf").read_text()
    assert "V3000" in text
    for mol, (rd, why) in zip(mols, read_sdf(tmp_path / "v3.sdf")):
        assert why is None
        assert (from_rdkit(rd).x - mol.x).abs().max() < 1e-6


def test_radical_stays_a_radical(tmp_path: Path) -> None:
    write_sdf(tmp_path / "r.sdf", [methyl_radical()])
    ((mol, _),) = read_sdf(tmp_path / "r.sdf")
    assert from_rdkit(mol).bonds.shape[0] == 3


def test_read_keeps_going_past_bad_records(tmp_path: Path) -> None:
    good = Chem.MolToMolBlock(embed("CCO")) + "$$$$\n"
    path = tmp_path / "mixed.sdf"
    path.write_text(good + BAD_RECORD + good)
    records = read_sdf(path)
    assert len(records) == 3
    assert records[0][1] is None and records[2][1] is None
    assert records[1][0] is None
    assert str(path) in records[1][1] and "record 2" in records[1][1] and "Atom line too short" in records[1][1]
    # gzipped
    gz = tmp_path / "mixed.sdf.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert [why is None for _, why in read_sdf(gz)] == [True, False, True]


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 property dicts for 1 molecules"):
        write_sdf(tmp_path / "x.sdf", [molecule("C")], [{}, {}])
    with pytest.raises(ValueError, match="molecule 0: no conformer"):
        write_sdf(tmp_path / "x.sdf", [Chem.AddHs(Chem.MolFromSmiles("C"))])
    with pytest.raises(FileNotFoundError, match="no such SDF"):
        read_sdf(tmp_path / "missing.sdf")
    (tmp_path / "empty.sdf").write_text("")
    with pytest.raises(ValueError, match="no SDF records"):
        read_sdf(tmp_path / "empty.sdf")
    assert not (tmp_path / "x.sdf").exists()


def test_format_sd_value() -> None:
    assert format_sd_value(float("nan")) == "nan"
    assert format_sd_value(0.1) == "0.1"
    assert format_sd_value(None) == ""
    assert format_sd_value(False) == "0"
    assert format_sd_value(torch.tensor(3)) == "3"
    assert format_sd_value("a\nb") == "a b"

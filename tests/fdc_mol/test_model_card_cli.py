"""``fdc-mol model-card``: the table, its JSON, and the sampled molecules written per sampler."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from rdkit import Chem

from fdc_mol.cli import main
from fdc_mol.commands.model_card import wilson


def test_wilson_interval_closed_form() -> None:
    lo, hi = wilson(50, 100)  # p = 0.5: centre 0.5, half-width z·sqrt(p(1−p)/n + z²/4n²)/(1 + z²/n)
    half = 1.96 * math.sqrt(0.25 / 100 + 1.96**2 / 40000) / (1 + 1.96**2 / 100)
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half))
    assert wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-12) and wilson(10, 10)[1] == pytest.approx(1.0)


def test_model_card_writes_the_table_and_each_samplers_molecules(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["model-card", "-n", "4", "--steps", "4", "--energy", "gfn1", "--executor", "serial",
               "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "card.json"),
               "--sdf-dir", str(tmp_path / "sdf")])
    assert rc == 0
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["n"] == 4 and set(card["samplers"]) == {"ode", "sde"}
    for sampler, col in card["samplers"].items():
        mols = [m for m in Chem.SDMolSupplier(str(tmp_path / "sdf" / f"{sampler}.sdf"), sanitize=False,
                                             removeHs=False)]
        assert len(mols) == 4 and all(m is not None for m in mols)
        assert all(m.GetProp("sampler") == sampler for m in mols)
        passed = sum(not m.HasProp("energy_failure") for m in mols)
        assert passed / 4 == pytest.approx(col["reward_gate_pass"])  # the file carries the gate's verdicts
    assert "molecule_stability" in capsys.readouterr().out


def test_model_card_checks_the_sdf_dir_before_sampling(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["model-card", "-n", "4", "--steps", "4", "--energy", "none", "--out", str(tmp_path / "card.json"),
               "--sdf-dir", str(blocker / "sub")])
    err = capsys.readouterr().err
    assert rc != 0 and "--sdf-dir" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "card.json").exists()  # failed before any sampling

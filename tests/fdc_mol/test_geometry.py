"""``fdc-mol evaluate --geometry``: GFN2 relaxation energy and heavy-atom RMSD, PoseBusters pass rates,
internal diversity; failures are NaN with a reason. A few QM9 molecules only (seconds on one core)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rdkit import Chem

from fdc_mol.cli import main
from fdc_mol.geometry import HARTREE_TO_KCAL, heavy_atom_rmsd, internal_diversity, relax_molecules
from fdc_mol.io import write_sdf
from flowmol_ext.chem import from_rdkit
from tests.flowmol_ext.test_chem import embed, qm9_sample


def _qm9(n: int, noise_A: float = 0.0) -> list:
    """``n`` QM9 molecules with 3-5 heavy atoms, positions plus Gaussian noise of ``noise_A`` Å."""
    gen = torch.Generator().manual_seed(1)
    mols = [from_rdkit(m) for m, _ in qm9_sample()[20:20 + n]]
    for m in mols:
        m.x = m.x + noise_A * torch.randn(m.x.shape, generator=gen)
    return mols


def test_heavy_atom_rmsd_ignores_rigid_motion_and_hydrogens() -> None:
    rng = np.random.default_rng(0)
    z = np.array([6, 6, 8, 1, 1])
    x = rng.normal(size=(5, 3))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))  # a proper rotation
    moved = x @ q.T + np.array([1.0, -2.0, 3.0])
    moved[3:] += 5.0  # hydrogens do not count
    assert heavy_atom_rmsd(z, x, moved) < 1e-12
    shifted = x.copy()
    shifted[0] += np.array([0.3, 0.0, 0.0])  # one heavy atom displaced: RMSD > 0 but below 0.3/sqrt(3)
    assert 0.0 < heavy_atom_rmsd(z, x, shifted) <= 0.3 / math.sqrt(3) + 1e-12


def test_relaxation_lowers_the_energy_of_perturbed_qm9_molecules() -> None:
    exact = relax_molecules(_qm9(2), max_steps=300)
    noisy = relax_molecules(_qm9(2, noise_A=0.05), max_steps=300)
    for a, b in zip(exact, noisy):
        assert a.reason == "" and b.reason == "" and a.converged and b.converged
        e_exact = (a.energy_start - a.energy_relaxed) * HARTREE_TO_KCAL
        e_noisy = (b.energy_start - b.energy_relaxed) * HARTREE_TO_KCAL
        assert 0.0 <= e_exact < 5.0  # DFT minima are close to GFN2 minima
        assert e_noisy > e_exact  # 0.05 A noise costs energy that relaxation recovers
        assert abs(a.energy_relaxed - b.energy_relaxed) * HARTREE_TO_KCAL < 0.5  # the same minimum


def test_failed_relaxation_is_nan_with_a_reason() -> None:
    (res,) = relax_molecules(_qm9(1), timeout_s=1e-6)
    assert math.isnan(res.energy_start) and math.isnan(res.energy_relaxed) and "timeout" in res.reason


def test_internal_diversity() -> None:
    same = [embed("CCO")] * 3
    assert internal_diversity(same) == pytest.approx(0.0)
    assert 0.5 < internal_diversity([embed("CCO"), embed("c1ccccc1"), embed("C#N")]) <= 1.0
    assert math.isnan(internal_diversity(same[:1]))


def test_evaluate_geometry_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sdf = tmp_path / "m.sdf"
    write_sdf(sdf, _qm9(3, noise_A=0.03))
    out = tmp_path / "m.json"
    assert main(["evaluate", str(sdf), "--geometry", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["geometry_n_valid"] == 3 and metrics["geometry_n_relaxed"] == 3
    assert 0.0 < metrics["relax_energy_median_kcal_mol"] < 20.0
    assert 0.0 < metrics["heavy_atom_rmsd_median_A"] < 0.3
    assert 0.0 < metrics["internal_diversity"] <= 1.0
    printed = capsys.readouterr().out
    assert "relax_energy_median_kcal_mol" in printed
    pytest.importorskip("posebusters")
    assert metrics["posebusters"]["sanitization"] == 1.0 and "all_checks" in metrics["posebusters"]
    assert "PoseBusters pass rates" in printed


def test_process_pool_gives_the_serial_results() -> None:
    mols = _qm9(3, noise_A=0.03)
    serial = relax_molecules(mols, workers=1, chunk_size=1)
    pooled = relax_molecules(mols, workers=2, chunk_size=1)
    for a, b in zip(serial, pooled):
        assert a.reason == b.reason == ""
        assert abs(a.energy_relaxed - b.energy_relaxed) < 1e-9 and np.allclose(a.x_relaxed, b.x_relaxed, atol=1e-8)


def test_posebusters_on_the_pool_gives_the_serial_rates() -> None:
    """Chunks on two worker processes give the serial table's rates; one molecule with a clash fails the
    steric-clash check, so the rates are not all 1 and the chunk order matters."""
    pytest.importorskip("posebusters")
    from fdc_mol.geometry import posebusters_pass_rates

    good = [embed(s) for s in ("CCO", "c1ccccc1", "CC(=O)N", "C#N", "OCCO")]
    bad = Chem.Mol(embed("CCCC"))
    conf = bad.GetConformer()
    p = conf.GetAtomPosition(0)
    conf.SetAtomPosition(3, (p.x + 0.3, p.y, p.z))  # two carbons 0.3 Å apart
    mols = good + [bad]
    serial = posebusters_pass_rates(mols, workers=1)
    pooled = posebusters_pass_rates(mols, workers=2, chunk_size=2)
    assert serial == pooled
    assert serial["internal_steric_clash"] == pytest.approx(5 / 6) and serial["all_checks"] < 1.0

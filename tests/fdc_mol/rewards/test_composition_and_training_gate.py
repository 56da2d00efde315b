"""Composition-corrected reward (closed form on known counts) and the bond-aware training clash gate."""

from __future__ import annotations

import numpy as np
import pytest

from fdc_mol.config import RewardConfig
from fdc_mol.rewards import make_molecular_reward, make_reward
from fdc_mol.rewards.composition import (
    CompositionCorrectedReward,
    fit_element_references,
    load_element_references,
)

from .conftest import molecule_from_xyz, qm9_rows


def test_fit_recovers_known_references_and_r2() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 9, size=(200, 5)).astype(float)
    eps = np.array([-2.1, -0.55, -3.2, -4.7, -5.2])
    noise = 0.01 * rng.standard_normal(200)
    fitted, stats = fit_element_references(counts @ eps + noise, counts)
    np.testing.assert_allclose(fitted, eps, atol=3e-3)
    assert stats["r2"] > 0.999 and stats["residual_std_hartree"] == pytest.approx(0.01, rel=0.2)
    counts[:, 4] = 0  # an element that never occurs gets 0
    fitted, _ = fit_element_references(counts @ eps, counts)
    assert fitted[4] == 0.0


def test_shipped_references_explain_qm9_energies() -> None:
    eps = load_element_references("gfn1")
    assert eps.shape == (5,) and (eps < 0).all()  # C, H, N, O, F: binding lowers the energy
    with pytest.raises(ValueError, match="no element reference energies for level 'nope'"):
        load_element_references("nope")


def test_corrected_reward_is_raw_plus_references_with_the_same_gradient() -> None:
    mols = [molecule_from_xyz(e, x) for e, x, _ in qm9_rows(4)]
    base = make_reward("gfn1", executor="serial")
    eps = load_element_references("gfn1")
    raw = base(mols, with_grad=True)
    corr = CompositionCorrectedReward(base, eps)(mols, with_grad=True)
    counts = np.array([np.bincount(m.a.numpy(), minlength=5) for m in mols], dtype=float)
    np.testing.assert_allclose(corr.value, raw.value + counts @ eps, rtol=0, atol=1e-12)
    np.testing.assert_allclose(corr.energy, raw.energy)
    for g1, g2 in zip(raw.grad, corr.grad):
        np.testing.assert_array_equal(g1, g2)
    # at DFT geometries the corrected reward is the small, composition-free part (|r| << |−E|)
    assert np.abs(corr.value).max() < 0.3 < np.abs(raw.value).min()


def test_training_gate_is_bond_aware_and_evaluation_stays_strict() -> None:
    """An O–H bond squeezed to 0.85 Å fails the strict 0.9 Å gate but passes 0.75 x (r_O + r_H) = 0.73 Å;
    two carbons at 1.0 Å fail both (0.75 x 1.52 = 1.14 Å)."""
    def has_oh(els: list[str], xyz: np.ndarray) -> bool:
        return any(e == "O" and any(f == "H" and np.linalg.norm(xyz[i] - xyz[j]) < 1.1 for j, f in enumerate(els))
                   for i, e in enumerate(els))

    rows = [r for r in qm9_rows(60) if has_oh(r[0], r[1]) and r[0].count("C") >= 2]
    els, xyz, _ = rows[0]
    m = molecule_from_xyz(els, xyz)
    o, h = min(((i, j) for i, e in enumerate(els) if e == "O" for j, f in enumerate(els) if f == "H"),
               key=lambda p: np.linalg.norm(xyz[p[0]] - xyz[p[1]]))
    x = xyz.copy()
    u = (x[h] - x[o]) / np.linalg.norm(x[h] - x[o])
    x[h] = x[o] + 0.85 * u
    squeezed = molecule_from_xyz(els, x, with_bonds=False)
    squeezed.bonds = m.bonds
    cfg = RewardConfig(executor="serial", train_min_distance_scale=0.75)
    reward = make_molecular_reward(cfg)
    strict = reward([squeezed], with_grad=False)
    train = reward.for_training()([squeezed], with_grad=False)
    assert not strict.ok[0] and "min_distance_A = 0.9" in strict.reason[0]
    assert train.ok[0] and np.isfinite(train.value[0])
    c = [i for i, e in enumerate(els) if e == "C"]
    x2 = xyz.copy()
    v = (x2[c[1]] - x2[c[0]]) / np.linalg.norm(x2[c[1]] - x2[c[0]])
    x2[c[1]] = x2[c[0]] + 1.0 * v
    clash = molecule_from_xyz(els, x2, with_bonds=False)
    clash.bonds = m.bonds
    res = reward.for_training()([clash], with_grad=False)
    assert not res.ok[0] and "covalent radii" in res.reason[0]
    reward.close()

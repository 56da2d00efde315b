"""The gradient-alignment diagnostic: per-sample AM gradients add up to the batch gradient of any per-sample
weighting (fine ≡ base), and the Gram-matrix statistics match their closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fdc_mol.fdc.adjoint_matching import am_loss_for_trajectory, lean_adjoint, timestep_subset
from fdc_mol.fdc.gradient_alignment import (
    expected_step_cosine,
    gram_cosine,
    mean_weights,
    per_sample_am_gradients,
    signal_to_noise,
)
from fdc_mol.molecular.flowmol_flow import FlowMolFlow
from fdc_mol.toy.flows import make_gmm_flow
from flowmol_ext.model.config import ModelConfig
from flowmol_ext.model.flow import FlowMol


def _batch_gradient(fine, traj, g, idx) -> np.ndarray:  # noqa: ANN001
    base = fine.copy_frozen()
    adj, v_base = lean_adjoint(base, traj, g, v_base_steps=idx)
    params = [p for p in fine.parameters() if p.requires_grad]
    loss = am_loss_for_trajectory(fine, traj, adj, v_base, idx)
    grads = torch.autograd.grad(loss, params)
    return torch.cat([x.reshape(-1) for x in grads]).double().numpy()


def _per_row(traj, w: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """(n,) per-sample values -> (N, 1) per row (atoms for molecules)."""
    return (w[traj.group] if traj.group is not None else w).unsqueeze(-1)


def _check_linearity(fine, traj, g, weights: torch.Tensor) -> None:  # noqa: ANN001
    """Per-sample gradients of the unit-weight terminal gradient g, combined with ``weights``, equal the batch
    gradient of the terminal gradient weights·g; a sample whose g is zero gets no row."""
    idx = timestep_subset(traj.steps, 0.25, 0.25, torch.Generator().manual_seed(1))
    has_g = torch.ones(traj.n, dtype=torch.bool)
    has_g[1] = False  # no reward on sample 1 (failed the gate): no row, and nothing in any combination
    g = g * _per_row(traj, has_g.to(g.dtype))
    adj, v_base = lean_adjoint(fine.copy_frozen(), traj, g, v_base_steps=idx)
    G, rows = per_sample_am_gradients(fine, traj, adj, v_base, idx)
    assert rows.tolist() == torch.nonzero(has_g).flatten().tolist()
    expected = _batch_gradient(fine, traj, g * _per_row(traj, weights), idx)
    combined = (weights.double().numpy()[rows] @ G) / traj.n
    assert np.linalg.norm(expected) > 0
    np.testing.assert_allclose(combined, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_per_sample_gradients_sum_to_any_weighted_batch_gradient_on_a_toy_flow() -> None:
    fine = make_gmm_flow([[0.5, 0.0]], [0.8], [1.0], hidden=32)
    traj = fine.sample(6, 10, memoryless=True, record=True, generator=torch.Generator().manual_seed(0))
    g = torch.randn(traj.x1.shape, generator=torch.Generator().manual_seed(2))
    _check_linearity(fine, traj, g, torch.tensor([2.0, 0.0, 0.5, 1.0, -1.0, 0.0]))


def test_per_sample_gradients_sum_to_any_weighted_batch_gradient_on_flowmol() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(n_hidden_scalars=32, n_vec_channels=4, n_hidden_edge_feats=16, n_molecule_updates=2,
                      rbf_dim=8, n_cp_feats=2)
    fine = FlowMolFlow(FlowMol(cfg), n_atoms=6, trainable="positions")
    sizes = torch.tensor([5, 8, 4, 6])
    traj = fine.sample(4, 8, memoryless=True, record=True, generator=torch.Generator().manual_seed(1), sizes=sizes)
    g = fine.project(0.05 * torch.randn(traj.x1.shape, generator=torch.Generator().manual_seed(2)), traj)
    # the SQ-like weighting: two samples in the "tail", one of weight 0 (outside), one with a larger weight
    _check_linearity(fine, traj, g, torch.tensor([4.0, 0.0, 1.0, 4.0]))


def test_gram_cosine_equals_the_cosine_of_the_weighted_sums() -> None:
    rng = np.random.default_rng(0)
    G = rng.normal(size=(7, 50))
    a, b = rng.normal(size=7), mean_weights(7, np.array([0, 0, 3, 6]))
    u, v = a @ G, b @ G
    assert gram_cosine(G @ G.T, a, b) == pytest.approx(float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)), rel=1e-12)
    np.testing.assert_allclose(b @ G, (2 * G[0] + G[3] + G[6]) / 4)
    assert math.isnan(gram_cosine(G @ G.T, np.zeros(7), b))


def test_signal_to_noise_is_exact_for_orthogonal_noise() -> None:
    # rows mu + e_i with e_i orthogonal to each other and to mu: every off-diagonal product is exactly |mu|^2
    P, m = 12, 5
    mu = np.zeros(P)
    mu[0] = 3.0
    E = np.zeros((m, P))
    for i in range(m):
        E[i, 1 + i] = float(i + 1)
    K = (mu + E) @ (mu + E).T
    mu2, noise = signal_to_noise(K)
    assert mu2 == pytest.approx(9.0, rel=1e-12)
    assert noise == pytest.approx(np.mean(np.arange(1, m + 1) ** 2), rel=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        signal_to_noise(K[:1, :1])


def test_expected_step_cosine_matches_monte_carlo_in_high_dimension() -> None:
    # mean of m isotropic draws around mu in P dims: cos(mean, mu) concentrates at sqrt(m rho / (1 + m rho))
    rng = np.random.default_rng(3)
    P, m, rho = 20_000, 5, 0.25
    mu = np.zeros(P)
    mu[0] = 1.0
    s = math.sqrt(1.0 / rho / P)  # E|e|^2 = P s^2 = |mu|^2 / rho
    draws = mu + s * rng.normal(size=(40, m, P))
    means = draws.mean(1)
    cos = means[:, 0] / np.linalg.norm(means, axis=1)
    assert float(cos.mean()) == pytest.approx(expected_step_cosine(rho, m), abs=0.01)
    assert expected_step_cosine(1.0, 1) == pytest.approx(1 / math.sqrt(2))
    assert expected_step_cosine(-0.1, 5) == 0.0
    flat = draws.reshape(-1, P)[:200]  # and the estimator recovers rho from 200 draws
    mu2, noise = signal_to_noise(flat @ flat.T)
    assert mu2 / noise == pytest.approx(rho, rel=0.15)

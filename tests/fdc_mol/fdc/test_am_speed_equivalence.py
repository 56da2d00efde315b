"""Issue 16: the restructured adjoint-matching loss (one timestep's graph at a time) equals the
all-graphs-at-once loss of commit aac49eb (kept below as the reference) on a fixed seed, in value and in
the parameter gradient, up to float rounding; on a toy flow and on FlowMol (tiny config)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from fdc_mol.fdc.adjoint_matching import am_loss, am_loss_for_trajectory, lean_adjoint, timestep_subset
from fdc_mol.fdc.flow import Trajectory
from fdc_mol.toy.flows import make_gmm_flow
from flowmol_ext.model.config import ModelConfig
from flowmol_ext.model.flow import FlowMol

try:  # the adapter moves from fdc_mol.fdc to fdc_mol.molecular
    from fdc_mol.molecular.flowmol_flow import FlowMolFlow
except ImportError:  # pragma: no cover - older layout
    from fdc_mol.fdc.flowmol_flow import FlowMolFlow  # type: ignore[no-redef]

RTOL, ATOL = 1e-5, 1e-6


def reference_loss(fine, traj: Trajectory, adj: Tensor, v_base: Tensor, indices: Tensor,  # noqa: ANN001
                   clip: float | None) -> Tensor:
    """am_loss_for_trajectory as of commit aac49eb: every timestep's graph kept, one backward."""
    h = 1.0 / traj.steps
    total = torch.zeros(traj.n, dtype=traj.xs.dtype, device=traj.xs.device)
    for k in indices.tolist():
        t = float(traj.times[k])
        sigma = fine.schedule.sigma(torch.tensor(t), h)
        v = fine.velocity(traj.xs[k].detach(), t, k, traj)
        total = total + am_loss(v, v_base[k], adj[k], sigma, traj, clip)
    return total.mean()


def _grads(flow, loss: Tensor) -> list[Tensor]:  # noqa: ANN001
    params = [p for p in flow.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss.backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def _compare(fine, base, n: int, steps: int, clip: float | None, seed: int = 0) -> None:  # noqa: ANN001
    gen = torch.Generator().manual_seed(seed)
    traj = fine.sample(n, steps, memoryless=True, record=True, generator=gen)
    noise = torch.randn(traj.x1.shape, generator=torch.Generator().manual_seed(seed + 1)).to(traj.x1.device)
    g = fine.project(0.05 * noise, traj)
    adj, v_base = lean_adjoint(base, traj, g)
    idx = timestep_subset(steps, 0.25, 0.25, gen)
    ref = reference_loss(fine, traj, adj, v_base, idx, clip)
    ref_g = _grads(fine, ref)
    new = am_loss_for_trajectory(fine, traj, adj, v_base, idx, clip=clip)
    new_g = _grads(fine, new)
    torch.testing.assert_close(new.detach(), ref.detach(), rtol=RTOL, atol=ATOL)
    assert any(float(g.abs().max()) > 0 for g in ref_g)
    for a, b in zip(new_g, ref_g):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL * max(1.0, float(b.abs().max())))


def _perturb(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))


def test_stepwise_loss_equals_reference_on_toy_flow() -> None:
    fine = make_gmm_flow([[0.5, 0.0]], [0.8], [1.0], hidden=32)
    base = fine.copy_frozen()
    _perturb(fine, 3)
    for clip in (None, 0.5):
        _compare(fine, base, n=64, steps=20, clip=clip)


def test_stepwise_loss_equals_reference_on_flowmol() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(n_hidden_scalars=32, n_vec_channels=4, n_hidden_edge_feats=16, n_molecule_updates=2,
                      rbf_dim=8, n_cp_feats=2)
    fine = FlowMolFlow(FlowMol(cfg), n_atoms=7)
    base = fine.copy_frozen()
    _perturb(fine.model, 5)
    _compare(fine, base, n=4, steps=12, clip=None)


def test_stepwise_loss_without_grad_and_frozen_model() -> None:
    fine = make_gmm_flow([[0.5, 0.0]], [0.8], [1.0], hidden=32)
    traj = fine.sample(16, 10, memoryless=True, record=True, generator=torch.Generator().manual_seed(0))
    adj, v_base = lean_adjoint(fine.copy_frozen(), traj, torch.randn(traj.x1.shape))
    idx = torch.tensor([5, 8, 9])
    with torch.no_grad():
        value = am_loss_for_trajectory(fine, traj, adj, v_base, idx)
    torch.testing.assert_close(value, reference_loss(fine, traj, adj, v_base, idx, None).detach())
    frozen = fine.copy_frozen()
    out = am_loss_for_trajectory(frozen, traj, adj, v_base, idx)
    assert not out.requires_grad
    with pytest.raises(ValueError):
        am_loss_for_trajectory(fine, traj, adj, v_base, torch.tensor([0]))


def test_stepwise_loss_scales_with_incoming_gradient() -> None:
    fine = make_gmm_flow([[0.5, 0.0]], [0.8], [1.0], hidden=32)
    base = fine.copy_frozen()
    _perturb(fine, 4)
    traj = fine.sample(16, 10, memoryless=True, record=True, generator=torch.Generator().manual_seed(1))
    adj, v_base = lean_adjoint(base, traj, 0.1 * torch.randn(traj.x1.shape))
    idx = torch.tensor([3, 7, 9])
    g1 = _grads(fine, am_loss_for_trajectory(fine, traj, adj, v_base, idx))
    g3 = _grads(fine, 3.0 * am_loss_for_trajectory(fine, traj, adj, v_base, idx))
    for a, b in zip(g1, g3):
        torch.testing.assert_close(3.0 * a, b)


@pytest.mark.needs_gpu
def test_stepwise_loss_equals_reference_on_cuda() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(n_hidden_scalars=32, n_vec_channels=4, n_hidden_edge_feats=16, n_molecule_updates=2,
                      rbf_dim=8, n_cp_feats=2)
    fine = FlowMolFlow(FlowMol(cfg).to("cuda"), n_atoms=7)
    base = fine.copy_frozen()
    _perturb(fine.model, 5)
    _compare(fine, base, n=4, steps=12, clip=None)

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


# -- the signal-only adjoint: samples with zero terminal gradient skip the vector–Jacobian products -------------

def _tiny_flowmol(seed: int = 0) -> FlowMolFlow:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_hidden_scalars=32, n_vec_channels=4, n_hidden_edge_feats=16, n_molecule_updates=2,
                      rbf_dim=8, n_cp_feats=2)
    return FlowMolFlow(FlowMol(cfg), n_atoms=7)


def _check_signal_only(base, traj: Trajectory, g: Tensor, keep: Tensor) -> None:  # noqa: ANN001
    from fdc_mol.fdc.adjoint_matching import _lean_adjoint_full, _sample_rows

    g = g * _sample_rows(traj, keep).to(g.dtype).reshape(-1, *([1] * (g.dim() - 1)))
    idx = timestep_subset(traj.steps, 0.25, 0.25, torch.Generator().manual_seed(3))
    adj, v_base = lean_adjoint(base, traj, g, v_base_steps=idx)
    ref_adj, ref_v = _lean_adjoint_full(base, traj, g, None)
    rows = _sample_rows(traj, keep)
    assert float(ref_adj[:, rows].abs().max()) > 0
    assert torch.equal(adj[:, ~rows], torch.zeros_like(adj[:, ~rows]))  # exactly zero, as in the recursion
    assert torch.equal(ref_adj[:, ~rows], torch.zeros_like(ref_adj[:, ~rows]))
    torch.testing.assert_close(adj, ref_adj, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(v_base[idx], ref_v[idx], rtol=RTOL, atol=ATOL)  # what the loss reads
    torch.testing.assert_close(v_base[:, rows], ref_v[:, rows], rtol=RTOL, atol=ATOL)
    skipped = [k for k in range(1, traj.steps) if k not in set(idx.tolist())]
    if not bool(keep.all()):  # the signal-only path ran: no base pass for the rest off the loss timesteps
        assert torch.equal(v_base[skipped][:, ~rows], torch.zeros_like(v_base[skipped][:, ~rows]))


def test_signal_only_adjoint_equals_full_batch_on_toy_flow() -> None:
    base = make_gmm_flow([[0.5, 0.0]], [0.8], [1.0], hidden=32).copy_frozen()
    traj = base.sample(12, 10, memoryless=True, record=True, generator=torch.Generator().manual_seed(0))
    keep = torch.zeros(12, dtype=torch.bool)
    keep[[1, 4, 5, 10]] = True
    _check_signal_only(base, traj, torch.randn(traj.x1.shape), keep)


def test_signal_only_adjoint_equals_full_batch_on_flowmol_with_mixed_sizes() -> None:
    fine = _tiny_flowmol()
    base = fine.copy_frozen()
    sizes = torch.tensor([5, 9, 3, 7, 6, 8])
    traj = fine.sample(6, 10, memoryless=True, record=True, generator=torch.Generator().manual_seed(1), sizes=sizes)
    g = fine.project(0.05 * torch.randn(traj.x1.shape, generator=torch.Generator().manual_seed(2)), traj)
    _check_signal_only(base, traj, g, torch.tensor([False, True, False, False, True, True]))
    _check_signal_only(base, traj, g, torch.tensor([True, False, False, False, False, False]))


def test_signal_only_adjoint_without_any_signal_and_with_nan_rows() -> None:
    base = make_gmm_flow([[0.5, 0.0]], [0.8], [1.0], hidden=32).copy_frozen()
    traj = base.sample(6, 8, memoryless=True, record=True, generator=torch.Generator().manual_seed(0))
    adj, v_base = lean_adjoint(base, traj, torch.zeros(traj.x1.shape))
    assert torch.equal(adj, torch.zeros_like(adj))
    k = 5
    torch.testing.assert_close(v_base[k], base.velocity(traj.xs[k], float(traj.times[k])))
    g = torch.zeros(traj.x1.shape)
    g[2, 0] = float("nan")  # NaN is not "no signal": it propagates as in the full recursion
    adj, _ = lean_adjoint(base, traj, g)
    assert bool(torch.isnan(adj[1:, 2]).any())


def test_flowmol_select_gives_the_rows_of_the_full_batch_velocity() -> None:
    fine = _tiny_flowmol(1)
    sizes = torch.tensor([4, 8, 6, 5])
    traj = fine.sample(4, 6, memoryless=True, record=True, generator=torch.Generator().manual_seed(4), sizes=sizes)
    keep = torch.tensor([False, True, False, True])
    sub = fine.select(traj, keep)
    rows = keep[traj.group]
    assert sub.n == 2 and sub.xs.shape == (7, 13, 3)
    assert sub.context["graph"].n_atoms.tolist() == [8, 5]
    for k in (1, 3, 5):
        full = fine.velocity(traj.xs[k], float(traj.times[k]), k, traj)
        part = fine.velocity(sub.xs[k], float(traj.times[k]), k, sub)
        torch.testing.assert_close(part, full[rows], rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="keep must have shape"):
        fine.select(traj, torch.tensor([True, False]))


def _tail_grad(x1: Tensor, traj: Trajectory) -> Tensor:
    """A terminal gradient on the samples whose first coordinate (mean over rows) is above its median only."""
    first = x1[:, 0] if traj.group is None else torch.zeros(traj.n).index_add(0, traj.group, x1[:, 0])
    keep = first > first.median()
    rows = keep if traj.group is None else keep[traj.group]
    return 0.3 * x1 * rows.to(x1.dtype).unsqueeze(-1)


def _am_step_against_full_path(fine, base, n: int, steps: int) -> None:  # noqa: ANN001
    from fdc_mol.fdc.adjoint_matching import AMConfig, _lean_adjoint_full, am_step_loss

    cfg = AMConfig(n_traj=n, steps=steps, lct=None)
    gen = torch.Generator().manual_seed(11)
    traj = fine.sample(n, steps, memoryless=True, record=True, generator=gen)
    g = fine.project(_tail_grad(traj.x1, traj), traj)
    idx = timestep_subset(steps, cfg.final_frac, cfg.random_frac, gen)
    adj, v_base = _lean_adjoint_full(base, traj, g, None)
    ref = am_loss_for_trajectory(fine, traj, adj, v_base, idx)
    ref_g = _grads(fine, ref)
    out = am_step_loss(fine, base, lambda x1, tr: fine.project(_tail_grad(x1, tr), tr), cfg,
                       generator=torch.Generator().manual_seed(11))
    assert 0 < out.metrics["n_signal"] < n
    new_g = _grads(fine, out.loss)
    torch.testing.assert_close(out.loss.detach(), ref.detach(), rtol=RTOL, atol=ATOL)
    assert any(float(a.abs().max()) > 0 for a in ref_g)
    for a, b in zip(new_g, ref_g):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL * max(1.0, float(b.abs().max())))


def test_am_step_loss_with_partial_signal_equals_the_full_batch_path() -> None:
    """fine ≡ base (first step of a stage: only samples with signal enter the loss) and fine ≠ base (all do)."""
    fine = make_gmm_flow([[0.5, 0.0]], [0.8], [1.0], hidden=32)
    base = fine.copy_frozen()
    _am_step_against_full_path(fine, base, n=16, steps=10)
    _perturb(fine, 3)
    _am_step_against_full_path(fine, base, n=16, steps=10)
    mol = _tiny_flowmol(2)
    mol_base = mol.copy_frozen()
    _am_step_against_full_path(mol, mol_base, n=6, steps=8)
    _perturb(mol.model, 6)
    _am_step_against_full_path(mol, mol_base, n=6, steps=8)

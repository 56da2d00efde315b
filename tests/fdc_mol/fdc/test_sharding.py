"""Molecules sharded over Python threads (``shards``): the lean adjoint, the AM loss and its parameter gradient, and a
whole AM step equal the unsharded ones up to float rounding; the partition is a balanced partition."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import Tensor

from fdc_mol.fdc.adjoint_matching import (
    AMConfig,
    _lean_adjoint_full,
    am_loss_for_trajectory,
    am_step_loss,
    lean_adjoint,
    timestep_subset,
)
from fdc_mol.fdc.sharding import balanced_shards, run_in_threads, sample_costs
from fdc_mol.molecular.flowmol_flow import FlowMolFlow
from flowmol_ext.model.config import ModelConfig
from flowmol_ext.model.flow import FlowMol

RTOL, ATOL = 1e-5, 1e-6
SIZES = torch.tensor([5, 9, 3, 7, 6, 8, 4])


def _flows(seed: int = 0) -> tuple[FlowMolFlow, FlowMolFlow]:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_hidden_scalars=32, n_vec_channels=4, n_hidden_edge_feats=16, n_molecule_updates=2,
                      rbf_dim=8, n_cp_feats=2)
    model = FlowMol(cfg)
    model.metadata = {"n_atoms_hist": [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]}  # sizes 3..9 when none are given
    fine = FlowMolFlow(model, trainable="positions")
    base = fine.copy_frozen()
    with torch.no_grad():  # fine ≠ base, as after the first AM step of a stage
        for p in fine.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 7)))
    return fine, base


def _grads(flow: FlowMolFlow, loss: Tensor) -> list[Tensor]:
    params = flow.trainable_parameters()
    for p in params:
        p.grad = None
    loss.backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def test_balanced_shards_partition_the_chosen_samples_evenly() -> None:
    costs = torch.tensor([9.0, 1.0, 4.0, 16.0, 25.0, 4.0, 1.0])
    among = torch.tensor([True, True, False, True, True, True, True])
    masks = balanced_shards(costs, 2, among)
    assert len(masks) == 2 and all(bool(m.any()) for m in masks)
    assert torch.equal(masks[0] | masks[1], among) and not bool((masks[0] & masks[1]).any())
    loads = sorted(float(costs[m].sum()) for m in masks)
    assert loads == [27.0, 29.0]  # greedy over 25, 16, 9, 4, 1, 1: {25, 4} and {16, 9, 1, 1}
    one = torch.tensor([False, True, False, False, False, False, False])
    only = balanced_shards(costs, 3, one)  # fewer shards than asked: one sample, one shard
    assert len(only) == 1 and torch.equal(only[0], one)
    assert balanced_shards(costs, 2, torch.zeros(7, dtype=torch.bool)) == []
    with pytest.raises(ValueError, match="k must be"):
        balanced_shards(costs, 0)


def test_sample_costs_are_atom_pairs_per_molecule() -> None:
    fine, _ = _flows()
    traj = fine.sample(7, 3, memoryless=True, record=True, generator=torch.Generator().manual_seed(0), sizes=SIZES)
    torch.testing.assert_close(sample_costs(traj), (SIZES**2).double())


def test_run_in_threads_keeps_order_grad_mode_and_restores_torch_threads() -> None:
    before = torch.get_num_threads()
    names: list[str] = []

    def work(i: int) -> tuple[int, bool, int]:
        names.append(threading.current_thread().name)
        return i * i, torch.is_grad_enabled(), torch.get_num_threads()

    with torch.no_grad():
        out = run_in_threads(work, [1, 2, 3])
    assert [o[0] for o in out] == [1, 4, 9]
    assert not any(o[1] for o in out)  # the caller's no_grad holds in the workers
    assert all(o[2] == 1 for o in out)  # one intra-op thread each
    assert all(n.startswith("fdc-shard") for n in names)
    assert torch.get_num_threads() == before
    assert run_in_threads(work, [5])[0][0] == 25 and names[-1] == threading.current_thread().name


@pytest.mark.parametrize("signal", [None, [False, True, False, True, True, False, True], [True] + [False] * 6])
def test_sharded_lean_adjoint_equals_unsharded(signal: list[bool] | None) -> None:
    _, base = _flows()
    traj = base.sample(7, 10, memoryless=True, record=True, generator=torch.Generator().manual_seed(1), sizes=SIZES)
    g = base.project(0.05 * torch.randn(traj.x1.shape, generator=torch.Generator().manual_seed(2)), traj)
    if signal is not None:
        g = g * torch.tensor(signal)[traj.group].to(g.dtype).unsqueeze(-1)
    idx = timestep_subset(10, 0.25, 0.25, torch.Generator().manual_seed(3))
    adj1, v1 = lean_adjoint(base, traj, g, v_base_steps=idx)
    adj2, v2 = lean_adjoint(base, traj, g, v_base_steps=idx, shards=2)
    ref_adj, ref_v = _lean_adjoint_full(base, traj, g, None)
    assert float(adj2.abs().max()) > 0
    torch.testing.assert_close(adj2, adj1, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(adj2, ref_adj, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(v2[idx], ref_v[idx], rtol=RTOL, atol=ATOL)  # what the loss reads


def test_sharded_loss_equals_unsharded_in_value_and_parameter_gradient() -> None:
    fine, base = _flows(1)
    traj = fine.sample(7, 10, memoryless=True, record=True, generator=torch.Generator().manual_seed(4), sizes=SIZES)
    g = fine.project(0.05 * torch.randn(traj.x1.shape, generator=torch.Generator().manual_seed(5)), traj)
    adj, v_base = lean_adjoint(base, traj, g)
    idx = timestep_subset(10, 0.25, 0.25, torch.Generator().manual_seed(6))
    ref = am_loss_for_trajectory(fine, traj, adj, v_base, idx, clip=2.0)
    ref_g = _grads(fine, ref)
    for shards in (2, 3):
        new = am_loss_for_trajectory(fine, traj, adj, v_base, idx, clip=2.0, shards=shards)
        new_g = _grads(fine, new)
        torch.testing.assert_close(new.detach(), ref.detach(), rtol=RTOL, atol=ATOL)
        assert any(float(b.abs().max()) > 0 for b in ref_g)
        for a, b in zip(new_g, ref_g):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL * max(1.0, float(b.abs().max())))
    with torch.no_grad():  # without autograd: the value alone, sharded
        torch.testing.assert_close(am_loss_for_trajectory(fine, traj, adj, v_base, idx, clip=2.0, shards=2),
                                   ref.detach(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("same_parameters", [False, True])
def test_sharded_am_step_equals_unsharded(same_parameters: bool) -> None:
    fine, base = _flows(2)
    if same_parameters:  # the first step of a stage: the loss runs on the molecules with signal only
        base = fine.copy_frozen()

    def grad_fn(x1: Tensor, traj) -> Tensor:  # noqa: ANN001
        keep = torch.arange(traj.n) % 3 != 0
        return fine.project(0.3 * x1 * keep[traj.group].to(x1.dtype).unsqueeze(-1), traj)

    outs = []
    for shards in (1, 2):
        cfg = AMConfig(n_traj=7, steps=8, lct=None, shards=shards)
        out = am_step_loss(fine, base, grad_fn, cfg, generator=torch.Generator().manual_seed(11))
        outs.append((out, _grads(fine, out.loss)))
    (o1, g1), (o2, g2) = outs
    assert o1.metrics["n_signal"] == o2.metrics["n_signal"] == 4
    torch.testing.assert_close(o2.loss.detach(), o1.loss.detach(), rtol=RTOL, atol=ATOL)
    assert any(float(b.abs().max()) > 0 for b in g1)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL * max(1.0, float(b.abs().max())))

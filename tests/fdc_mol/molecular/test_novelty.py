"""The KDE novelty term as an Objective term: its field is −∇ₓ log p̂ of the conformer descriptors, so a small
step along it lowers the fitted log-density (more novel conformers), and it adds to the utility's field."""

from __future__ import annotations

import torch

from fdc_mol.fdc.divergences import Objective
from fdc_mol.fdc.utilities import ExpectedReward, FitContext
from fdc_mol.molecular.flowmol_flow import FlowMolFlow
from fdc_mol.molecular.novelty import ConformerNovelty
from tests.fdc_mol.test_finetune import tiny_model


def test_novelty_field_lowers_log_density_and_composes_with_the_utility() -> None:
    torch.set_num_threads(1)
    flow = FlowMolFlow(tiny_model(), n_atoms=6)
    traj = flow.sample(12, 6, memoryless=False, record=False, generator=torch.Generator().manual_seed(0))
    ctx = FitContext(x=traj.x1, traj=traj, model=flow)
    fitted = ConformerNovelty().fit(ctx)
    kde = fitted.info["kde"]
    fin = traj.context["final"]
    g = fitted.grad(traj.x1, traj)
    torch.testing.assert_close(g, -kde.grad_log_prob(traj.x1, fin.a, fin.node_graph, traj.n))
    # on fresh conformers (as in AM, where the terminal states are new samples), a step of at most 0.01 Å along
    # the field lowers log p̂ for (almost) every molecule
    new = flow.sample(12, 6, memoryless=False, record=False, generator=torch.Generator().manual_seed(5))
    fn = new.context["final"]
    gn = fitted.grad(new.x1, new)
    step = 0.01 * gn / gn.abs().max()
    lp0 = kde.log_prob(new.x1, fn.a, fn.node_graph, new.n)
    lp1 = kde.log_prob(new.x1 + step, fn.a, fn.node_graph, new.n)
    assert (lp1 < lp0).float().mean() > 0.9, (lp0, lp1)
    loo = kde.log_prob(traj.x1, fin.a, fin.node_graph, traj.n, exclude_self=True)
    assert abs(fitted.value - float(-loo.mean())) < 1e-6

    def reward(x, tr):  # noqa: ANN001, ANN202 - r = Σ x_0 per molecule, ∇r = e_0
        e0 = torch.zeros_like(x).index_fill(1, torch.tensor([0]), 1.0)
        return torch.zeros(tr.n).index_add(0, tr.group, x[:, 0]), e0

    ctx = FitContext(x=traj.x1, traj=traj, model=flow, reward=reward)
    both = Objective(ExpectedReward(), terms=[(0.5, ConformerNovelty())]).fit(ctx)
    expect = torch.zeros_like(traj.x1).index_fill(1, torch.tensor([0]), 1.0) + 0.5 * g
    torch.testing.assert_close(both.grad(traj.x1, traj), expect)
    assert "conformer_novelty" in both.info

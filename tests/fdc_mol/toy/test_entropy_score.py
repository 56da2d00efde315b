"""Issue 17: the flow score s = (v − κ_t x)/η_t at t = 1 − ε against the closed-form score of the
Gaussian-mixture marginal p_t, the entropy/KL first-variation gradients built on it, and the direction an
adjoint-matching stage moves the mass (toward low density, by the closed-form tilt p^{1 − 1/η}).

Closed form (linear schedule, x_t = (1 − t) x_0 + t x_1, x_0 ~ N(0, I)): p_t = Σ_k w_k N(t m_k, v_k(t) I)
with v_k(t) = (1 − t)² + t² s_k², so ∇ log p_t(x) = −Σ_k r_k(x) (x − t m_k)/v_k(t), r_k the posterior
responsibilities. It is written out here independently of fdc_mol.toy.flows.
"""

from __future__ import annotations

import math

import pytest
import torch

from fdc_mol.fdc.adjoint_matching import AMConfig, am_step
from fdc_mol.fdc.divergences import KL, Objective
from fdc_mol.fdc.utilities import FitContext, ScoreEntropy
from fdc_mol.toy.flows import make_gmm_flow
from fdc_mol.toy.settings import landscape

EPS = 0.005


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _ring():
    land = landscape("entropy")
    return (torch.tensor(land.means), torch.tensor(land.stds), torch.tensor(land.weights))


def _exact_score(x: torch.Tensor, t: float, means, stds, weights) -> torch.Tensor:
    """∇ log p_t(x) of the mixture's flow marginal, x (n, d) -> (n, d)."""
    var = (1 - t) ** 2 + t**2 * stds**2  # (K,)
    diff = x[:, None, :] - t * means[None]  # (n, K, d)
    d = x.shape[1]
    logp = (weights / weights.sum()).log() - 0.5 * diff.pow(2).sum(-1) / var - 0.5 * d * torch.log(2 * math.pi * var)
    r = torch.softmax(logp, -1)
    return -(r[..., None] * diff / var[None, :, None]).sum(1)


def _ring_points(n: int = 4000, seed: int = 0) -> torch.Tensor:
    """Samples of the ring mixture at t = 1 plus points between and outside the modes."""
    means, stds, weights = _ring()
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(weights, n, replacement=True, generator=g)
    x = means[k] + stds[k, None] * torch.randn(n, 2, generator=g)
    return torch.cat([x, 3.0 * torch.rand(200, 2, generator=g) - 1.5])


@pytest.mark.parametrize("t", [1 - EPS, 0.95, 0.5])
def test_flow_score_equals_closed_form_mixture_score(t):
    """(v − κ_t x)/η_t of the pre-trained mixture flow is ∇ log p_t: same sign, same scale (rel 1e-8)."""
    means, stds, weights = _ring()
    flow = make_gmm_flow(means, stds, weights, residual="score", finetune_mixture=True)
    x = t * _ring_points()
    s_flow = flow.score(x, t).detach()
    s_exact = _exact_score(x, t, means, stds, weights)
    assert torch.allclose(s_flow, s_exact, rtol=1e-8, atol=1e-8 * float(s_exact.abs().max()))
    if t > 0.9:  # sharp modes: the score points from a sample back toward its mode's centre t·m_k
        k = torch.cdist(x, t * means).argmin(-1)
        inward = ((t * means[k] - x) * s_flow).sum(-1)
        assert float((inward > 0).double().mean()) > 0.95


def test_score_entropy_and_kl_gradients_closed_form():
    """∇δH = −s_p, ∇δKL = s_p − s_pre and ∇δ(H − αKL) = −(1 + α) s_p + α s_pre, all at 1 − ε, where p is
    the CURRENT model (here a different mixture than p_pre: wider, reweighted)."""
    means, stds, weights = _ring()
    pre = make_gmm_flow(means, stds, weights)
    cur_w = weights.sqrt()
    cur = make_gmm_flow(means, 1.4 * stds, cur_w)
    x = _ring_points(seed=1)
    t = 1 - EPS
    s_p = _exact_score(x, t, means, 1.4 * stds, cur_w)
    s_pre = _exact_score(x, t, means, stds, weights)
    ctx = FitContext(x=x, model=cur, pre=pre)
    g_h = ScoreEntropy(EPS, value_by_kde=False).fit(ctx).grad(x)
    tol = 1e-7 * float(s_p.abs().max())
    assert torch.allclose(g_h, -s_p, atol=tol)
    g_kl = KL(EPS).fit(ctx).grad(x)
    assert torch.allclose(g_kl, s_p - s_pre, atol=tol)
    alpha = 0.5
    g = Objective(ScoreEntropy(EPS, value_by_kde=False), KL(EPS), alpha).fit(ctx).grad(x)
    assert torch.allclose(g, -(1 + alpha) * s_p + alpha * s_pre, atol=tol)


@pytest.mark.parametrize("residual, factor", [("velocity", lambda t: t / (1 - t)), ("score", lambda t: t)])
def test_score_residual_amplification_closed_form(residual, factor):
    """A constant residual MLP output c gives Δs = c·t/(1 − t) (velocity residual: ×199 at 1 − ε, the cause
    of issue 17's noisy scores) or Δs = c·t (score residual: bounded)."""
    means, stds, weights = _ring()
    flow = make_gmm_flow(means, stds, weights, residual=residual)
    c = torch.tensor([0.01, -0.02])
    with torch.no_grad():
        flow.net.mlp[-1].bias.copy_(c)
    x = _ring_points(500)
    for t in (1 - EPS, 0.9):
        ds = (flow.score(x, t) - _exact_score(x, t, means, stds, weights)).detach()
        assert torch.allclose(ds, c.expand_as(ds) * factor(t), rtol=1e-6, atol=1e-9)


def test_am_stage_on_entropy_gradient_widens_toward_closed_form_tilt():
    """One AM stage with terminal gradient ∇g/η = −s_p/η on p = N(0, s² I) (mixture parameters fine-tuned)
    must move toward the tilt p^{1−1/η} = N(0, s²/(1 − 1/η) I): the std grows (mass to low density).
    A flipped sign or a lost 1/η would shrink it or overshoot."""
    torch.manual_seed(0)
    s0, eta = 0.5, 2.0
    target = s0 / math.sqrt(1 - 1 / eta)  # 0.707
    flow = make_gmm_flow([[0.0, 0.0]], [s0], [1.0], hidden=16, residual="score", finetune_mixture=True)
    base = flow.copy_frozen()
    fitted = ScoreEntropy(EPS, value_by_kde=False).fit(FitContext(x=torch.zeros(2, 2), model=base))
    opt = torch.optim.Adam([p for p in flow.parameters() if p.requires_grad], lr=2e-2)
    cfg = AMConfig(n_traj=64, steps=20, lct=None)
    for _ in range(150):
        am_step(flow, base, lambda x, tr: fitted.grad(x, tr) / eta, cfg, opt, lam=1 / eta)
    std = float(flow.net.pre.stds[0].detach())
    assert s0 + 0.6 * (target - s0) < std < s0 + 1.4 * (target - s0), std

"""Adjoint matching: schedule, subset, lean adjoint vs autograd, loss minimiser, sign, Gaussian tilt."""

from __future__ import annotations

import math

import pytest
import torch

from fdc_mol.fdc.adjoint_matching import (
    AMConfig,
    am_loss,
    am_loss_for_trajectory,
    am_step,
    lean_adjoint,
    timestep_subset,
)
from fdc_mol.fdc.flow import EuclideanFlow, FlowModel, LinearSchedule
from fdc_mol.toy.flows import GMMVelocity, make_gmm_flow


def test_linear_schedule_values_and_safe_sigma():
    s = LinearSchedule()
    t = torch.tensor([0.25, 0.5, 0.8])
    assert torch.allclose(s.kappa(t), 1 / t)
    assert torch.allclose(s.eta(t), (1 - t) / t)
    assert torch.allclose(s.sigma(t), torch.sqrt(2 * (1 - t) / t))
    assert float(s.sigma(torch.tensor(1.0))) == 0.0
    assert math.isfinite(float(s.sigma(torch.tensor(0.0), h=0.025)))
    assert float(s.sigma(torch.tensor(0.0), h=0.025)) == pytest.approx(math.sqrt(2 / 0.025))


def test_timestep_subset_data_end_and_no_endpoints():
    g = torch.Generator().manual_seed(0)
    idx = timestep_subset(40, 0.25, 0.25, g)
    assert idx.min() >= 1 and idx.max() <= 39
    assert set(range(30, 40)) <= set(idx.tolist())  # last 25% of 1..39 (ceil 9.75 = 10)
    assert len(idx) == 10 + round(0.25 * 29)
    with pytest.raises(ValueError):
        timestep_subset(1)


def test_flow_score_matches_exact_gmm_score():
    flow = make_gmm_flow([[1.0, 0.0], [-1.0, 0.5]], [0.3, 0.5], [0.3, 0.7])
    x = torch.randn(50, 2)
    exact = flow.net.pre.score(x, 0.7)
    assert torch.allclose(flow.score(x, 0.7), exact, atol=1e-4)
    with pytest.raises(ValueError):
        flow.score(x, 1.0)


def test_memoryless_sampler_reproduces_data_marginal():
    flow = make_gmm_flow([[0.5]], [0.8], [1.0])
    x = flow.sample(20000, 40, memoryless=True, record=False).x1
    assert float(x.mean()) == pytest.approx(0.5, abs=0.03)
    assert float(x.var()) == pytest.approx(0.64, rel=0.05)
    assert isinstance(flow, FlowModel)


def test_lean_adjoint_equals_autograd_of_euler_map():
    """ã_k = −∂g(X_T)/∂X_k for the Euler map X_{k+1} = X_k + h b(X_k, t_k) (noise is additive)."""
    torch.manual_seed(1)
    flow = make_gmm_flow([[1.0, 0.0], [-1.0, 0.5]], [0.3, 0.5], [0.3, 0.7])
    with torch.no_grad():
        for p in flow.net.mlp.parameters():
            p.normal_(0, 0.3)
    traj = flow.sample(8, 10, memoryless=True, record=True)
    w = torch.tensor([0.7, -1.3])
    g = lambda x: (x @ w).sin().sum()  # noqa: E731
    x1 = traj.x1.clone().requires_grad_(True)
    (grad_g,) = torch.autograd.grad(g(x1), x1)
    adj, v_base = lean_adjoint(flow, traj, grad_g)
    T, h, s = traj.steps, 1.0 / traj.steps, flow.schedule

    def b(x, j):
        t = float(traj.times[j])
        return 2 * flow.velocity(x, t) - s.kappa(torch.tensor(t), h) * x

    with torch.no_grad():  # the recorded noise increments, held fixed
        noise = [traj.xs[j + 1] - traj.xs[j] - h * b(traj.xs[j], j) for j in range(T)]
    for k in (T - 1, T // 2, 1):
        xk = traj.xs[k].clone().requires_grad_(True)
        x = xk
        for j in range(k, T):
            x = x + h * b(x, j) + noise[j]
        (dk,) = torch.autograd.grad(g(x), xk)
        assert torch.allclose(adj[k], -dk, atol=1e-5), k
    assert torch.allclose(v_base[3], flow.velocity(traj.xs[3], float(traj.times[3])).detach())


def test_am_loss_zero_at_minimiser_and_clip():
    flow = make_gmm_flow([[0.0, 0.0]], [1.0], [1.0])
    traj = flow.sample(4, 10, memoryless=True, record=True)
    adj = torch.randn_like(traj.xs)
    v_base = torch.randn_like(traj.xs)
    sigma = 0.7
    v_star = v_base[5] - sigma**2 * adj[5] / 2  # Δv* = −σ² ã / 2
    assert torch.allclose(am_loss(v_star, v_base[5], adj[5], sigma, traj, None), torch.zeros(4), atol=1e-10)
    big = am_loss(v_star + 10.0, v_base[5], adj[5], sigma, traj, None)
    clipped = am_loss(v_star + 10.0, v_base[5], adj[5], sigma, traj, 1.5)
    assert torch.all(big > 1.5) and torch.allclose(clipped, torch.full((4,), 1.5))
    # the loss over a trajectory is differentiable in the fine model's parameters
    loss = am_loss_for_trajectory(flow, traj, adj, v_base, torch.tensor([5, 9]))
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.parameters())
    with pytest.raises(ValueError):
        am_loss_for_trajectory(flow, traj, adj, v_base, torch.tensor([0]))


def test_sign_linear_reward_mean_rises():
    """Under AM with r = x₀ (λ = 1) the mean of x₀ rises (the released code's sign makes it fall)."""
    torch.manual_seed(0)
    fine = make_gmm_flow([[0.5, 0.0]], [0.8], [1.0], hidden=32)
    base = fine.copy_frozen()
    before = float(fine.sample(4000, 20, memoryless=True, record=False).x1[:, 0].mean())
    opt = torch.optim.Adam(fine.parameters(), lr=1e-2)
    grad = lambda x, tr: torch.tensor([1.0, 0.0]).expand_as(x)  # noqa: E731
    for _ in range(40):
        am_step(fine, base, grad, AMConfig(n_traj=32, steps=20), opt)
    after = float(fine.sample(4000, 20, memoryless=True, record=False).x1[:, 0].mean())
    assert after > before + 0.2  # closed form: +σ²λ = +0.64


class _AffineControl(torch.nn.Module):
    """v = v_pre(x, t) + a(t) x + b(t): the family that holds the exact optimal control of this LQ problem."""

    def __init__(self, pre: torch.nn.Module) -> None:
        super().__init__()
        self.pre = pre
        self.mlp = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))
        torch.nn.init.zeros_(self.mlp[-1].weight)
        torch.nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.mlp(t)
        return self.pre(x, t) + ab[:, :1] * x + ab[:, 1:]


@pytest.mark.slow
def test_kl_regularised_am_matches_tilted_gaussian():
    """p_pre = N(0.5, 0.8²), r = x − x²/2, α = 1 (λ = 1/α): p* ∝ p_pre e^{r/α} = N(0.6951, 0.3902)."""
    torch.manual_seed(0)
    mu, s, a, c, alpha = 0.5, 0.8, 1.0, 1.0, 1.0
    P = 1 / s**2 + c / alpha
    mean_star, var_star = (mu / s**2 + a / alpha) / P, 1 / P
    fine = EuclideanFlow(_AffineControl(GMMVelocity([[mu]], [s], [1.0])), dim=1)
    base = fine.copy_frozen()
    cfg = AMConfig(n_traj=128, steps=40)
    opt = torch.optim.Adam(fine.parameters(), lr=3e-3)
    for _ in range(800):
        am_step(fine, base, lambda x, tr: (a - c * x) / alpha, cfg, opt, lam=1 / alpha)
    x = fine.sample(40000, 40, memoryless=True, record=False).x1
    assert float(x.mean()) == pytest.approx(mean_star, rel=0.05)
    assert float(x.var()) == pytest.approx(var_star, rel=0.05)


def test_tensorflow_input_checks():
    flow = EuclideanFlow(GMMVelocity([[0.0]], [1.0], [1.0]), dim=1)
    with pytest.raises(ValueError):
        flow.sample(0, 10)
    with pytest.raises(ValueError):
        GMMVelocity([[0.0]], [-1.0], [1.0])


def test_am_step_diagnostics_control_and_target_closed_form():
    """control_rms and target_rms are the RMS over samples of √Σ_k ‖(2/σ_k)Δv‖² and √Σ_k ‖σ_k ã_k‖² on the loss
    timesteps: 0 and the hand-computed target at fine ≡ base; with the fine velocity offset by a constant b,
    control = |b|·√Σ_k 4/σ_k², whatever the trajectory. Sharded diagnostics equal the unsharded ones."""
    from fdc_mol.fdc.adjoint_matching import am_step_loss, timestep_subset

    torch.manual_seed(0)
    fine = make_gmm_flow([[0.5, -0.2]], [0.8], [1.0], hidden=16)
    base = fine.copy_frozen()
    cfg = AMConfig(n_traj=6, steps=12, final_frac=0.25, random_frac=0.25)
    w = torch.tensor([0.3, -0.7])
    grad_fn = lambda x, tr: w.expand_as(x)  # noqa: E731  (r = w·x: the same terminal gradient for every sample)
    def step(flow_cfg: AMConfig, seed: int, fn=grad_fn) -> dict[str, float]:  # noqa: ANN001
        return am_step_loss(fine, base, fn, flow_cfg, generator=torch.Generator().manual_seed(seed),
                            timestep_generator=torch.Generator().manual_seed(seed + 100)).metrics

    m = step(cfg, 1)
    assert m["control_rms"] == 0.0 and m["n_signal"] == 6
    # the same trajectory and timesteps by hand: ã_k from the lean adjoint, σ_k from the schedule
    traj = fine.sample(cfg.n_traj, cfg.steps, memoryless=True, record=True, generator=torch.Generator().manual_seed(1))
    idx = timestep_subset(cfg.steps, cfg.final_frac, cfg.random_frac, torch.Generator().manual_seed(101))
    adj, _ = lean_adjoint(base, traj, w.expand_as(traj.x1))
    h = 1.0 / cfg.steps
    sig = [float(fine.schedule.sigma(torch.tensor(float(traj.times[k])), h)) for k in idx.tolist()]
    target = sum(s**2 * adj[k].pow(2).sum(-1) for s, k in zip(sig, idx.tolist()))  # (n,)
    assert m["target_rms"] == pytest.approx(float(target.mean().sqrt()), rel=1e-5)
    assert step(cfg, 1, lambda x, tr: torch.zeros_like(x))["target_rms"] == 0.0
    # signal on half the samples: the fine ≡ base shortcut scores only those, and the RMS still averages over all 6
    half = torch.tensor([1.0, 0.0] * 3).unsqueeze(-1)
    m_half = step(cfg, 1, lambda x, tr: half * w.expand_as(x))
    adj_h, _ = lean_adjoint(base, traj, half * w.expand_as(traj.x1))
    target_h = sum(s**2 * adj_h[k].pow(2).sum(-1) for s, k in zip(sig, idx.tolist()))
    assert m_half["n_signal"] == 3 and m_half["target_rms"] == pytest.approx(float(target_h.mean().sqrt()), rel=1e-5)
    # offset the fine velocity by b (the residual MLP's last bias; its weight is 0): Δv = b at every (x, t)
    b = torch.tensor([0.05, -0.02])
    with torch.no_grad():
        fine.net.mlp[-1].bias.copy_(b)
    m2 = step(cfg, 2)
    idx2 = timestep_subset(cfg.steps, cfg.final_frac, cfg.random_frac, torch.Generator().manual_seed(102))
    tr2 = fine.sample(cfg.n_traj, cfg.steps, memoryless=True, record=True, generator=torch.Generator().manual_seed(2))
    sig2 = [float(fine.schedule.sigma(tr2.times[k].clone().detach(), h)) for k in idx2.tolist()]
    expected = float(b.norm()) * math.sqrt(sum(4.0 / s**2 for s in sig2))
    assert m2["control_rms"] == pytest.approx(expected, rel=1e-5)
    sharded = step(cfg.model_copy(update={"shards": 2}), 2)
    for key in ("control_rms", "target_rms", "loss"):
        assert sharded[key] == pytest.approx(m2[key], rel=1e-5), key

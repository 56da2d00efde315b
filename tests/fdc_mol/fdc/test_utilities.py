"""First variations against finite differences of their functionals (discrete and Gaussian cases)."""

from __future__ import annotations

import math

import pytest
import torch

from fdc_mol.fdc.density import KDE
from fdc_mol.fdc.divergences import KL, Objective, Renyi
from fdc_mol.fdc.utilities import (
    ADesign,
    CVaR,
    ExpectedReward,
    FitContext,
    KDEEntropy,
    LogDetDesign,
    MeanVariance,
    ScoreEntropy,
    SuperQuantile,
    weighted_quantile,
)
from fdc_mol.toy.flows import make_gmm_flow


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _direction(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, generator=g, dtype=torch.float64)
    return u - u.mean()  # zero total mass: stays a probability perturbation


def _fd_check(value, delta, w, eps=1e-6, seed=1):
    u = _direction(w.numel(), seed)
    fd = (value(w + eps * u) - value(w - eps * u)) / (2 * eps)
    lin = (u * delta).sum()
    assert float(fd) == pytest.approx(float(lin), rel=1e-5, abs=1e-8)


@pytest.fixture
def discrete():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(50, generator=g, dtype=torch.float64) * 2.0
    w = torch.rand(50, generator=g, dtype=torch.float64) + 0.5
    return r, w / w.sum()


@pytest.mark.parametrize(
    "util", [ExpectedReward(), CVaR(0.1), CVaR(0.3), SuperQuantile(0.9), SuperQuantile(0.75), MeanVariance(0.7)]
)
def test_reward_utilities_first_variation_fd(util, discrete):
    r, w = discrete
    _fd_check(lambda ww: util.value(r, ww), util.first_variation(r, w), w)


def test_cvar_sq_values_are_tail_means():
    r = torch.arange(100, dtype=torch.float64)  # uniform weights
    assert float(CVaR(0.1).value(r)) == pytest.approx(4.5)  # mean of 0..9
    assert float(SuperQuantile(0.9).value(r)) == pytest.approx(94.5)  # mean of 90..99
    assert float(weighted_quantile(r, 0.5)) == 49.0


def test_reward_gradient_fields_with_nan_and_factors():
    x = torch.randn(200, 2)
    r = x[:, 0].clone()
    r[:5] = math.nan
    grads = torch.ones_like(x)
    ctx = FitContext(x=x, reward=lambda xx, tr: (xx[:, 0] + 0 * xx[:, 1], torch.ones_like(xx)))
    for util, coef in (
        (CVaR(0.05), lambda rr, q: (rr <= q) / 0.05),
        (SuperQuantile(0.95), lambda rr, q: (rr >= q) / 0.05),
    ):
        st = util.stats(r[torch.isfinite(r)])
        g = util.first_variation_grad(x, r, grads, st)
        assert torch.all(g[:5] == 0)  # NaN rewards: no gradient
        expect = coef(r[5:], st["q"]).to(torch.float64)[:, None] * grads[5:]
        assert torch.allclose(g[5:], expect)
        fitted = util.fit(ctx)
        assert fitted.grad_scale == pytest.approx(20.0)
        assert fitted.grad(x, None).abs().sum(-1).gt(0).float().mean() == pytest.approx(0.05, abs=0.02)


def test_mean_variance_grad_coefficient():
    r = torch.tensor([0.0, 1.0, 2.0])
    util = MeanVariance(1.0)
    st = util.stats(r)
    g = util.first_variation_grad(torch.zeros(3, 1), r, torch.ones(3, 1), st)
    assert torch.allclose(g[:, 0], 1 - 2 * (r - 1.0))


def test_discrete_entropy_and_renyi_fd(discrete):
    _, p = discrete
    q = torch.softmax(torch.randn(50, generator=torch.Generator().manual_seed(5), dtype=torch.float64), 0)
    _fd_check(KDEEntropy.discrete_value, KDEEntropy.discrete_first_variation(p), p)
    for beta in (0.5, 2.0, 3.0):
        _fd_check(lambda pp, b=beta: Renyi.discrete_value(pp, q, b), Renyi.discrete_first_variation(p, q, beta), p)


@pytest.mark.parametrize("design", [LogDetDesign(reg=0.1), ADesign(reg=0.1)])
def test_design_first_variation_and_gradient(design, discrete):
    _, w = discrete
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _fd_check(lambda ww: design.value(x, ww), design.first_variation(x, w), w)
    # gradient field = 2 M^-1 x (D) or 2 M^-2 x (A) for identity features
    fitted = design.fit(FitContext(x=x))
    M = design.moment(x)
    W = torch.linalg.inv(M) if isinstance(design, LogDetDesign) else torch.linalg.inv(M) @ torch.linalg.inv(M)
    assert torch.allclose(fitted.grad(x[:4]), 2 * x[:4] @ W, atol=1e-10)
    assert fitted.value == pytest.approx(float(design.value(x)))


def _gauss_flow(mean, std):
    return make_gmm_flow([mean], [std], [1.0])


def test_score_entropy_gradient_pathwise_matches_closed_form():
    """d/dθ H(N(m, e^{2θ} I)) = d, and ∫ ∇δH · ∂x/∂θ dp with ∂x/∂θ = x − m must give the same."""
    m, s, d = torch.tensor([0.3, -0.2]), 0.7, 2
    flow = _gauss_flow(m.tolist(), s)
    x = m + s * torch.randn(20000, d)
    fitted = ScoreEntropy(eps=1e-3, value_by_kde=False).fit(FitContext(x=x, model=flow))
    pathwise = (fitted.grad(x) * (x - m)).sum(-1).mean()
    H = lambda theta: d * (theta + 0.5 * math.log(2 * math.pi * math.e))  # noqa: E731
    fd = (H(math.log(s) + 1e-5) - H(math.log(s) - 1e-5)) / 2e-5
    assert float(pathwise) == pytest.approx(fd, rel=0.03)


def test_kl_gradient_pathwise_matches_closed_form():
    """KL(N(m, s²I) ‖ N(0, I)) = ½(d s² + ‖m‖² − d − 2d log s): its m-derivative is m."""
    m, s = torch.tensor([0.8, -0.4]), 0.9
    cur, pre = _gauss_flow(m.tolist(), s), _gauss_flow([0.0, 0.0], 1.0)
    x = m + s * torch.randn(20000, 2)
    fitted = KL(eps=1e-3).fit(FitContext(x=x, model=cur, pre=pre))
    dm = fitted.grad(x).mean(0)  # ∂x/∂m = I
    assert torch.allclose(dm, m, atol=0.03)
    obj = Objective(ExpectedReward(), KL(eps=1e-3), alpha=2.0)
    f2 = obj.fit(FitContext(x=x, model=cur, pre=pre, reward=lambda xx, tr: (xx[:, 0], torch.ones_like(xx))))
    assert torch.allclose(f2.grad(x[:3]), torch.ones(3, 2) - 2.0 * fitted.grad(x[:3]))


def test_kde_log_prob_and_gradient():
    ref = torch.randn(300, 2)
    kde = KDE(bandwidth=0.5).fit(ref)
    x = torch.randn(5, 2)
    manual = (
        torch.logsumexp(-0.5 * ((x[:, None] - ref[None]) / 0.5).pow(2).sum(-1), -1)
        - math.log(300)
        - math.log(2 * math.pi * 0.25)
    )
    assert torch.allclose(kde.log_prob(x), manual)
    eps = 1e-6
    fd = torch.stack([(kde.log_prob(x + eps * e) - kde.log_prob(x - eps * e)) / (2 * eps) for e in torch.eye(2)], -1)
    assert torch.allclose(kde.grad_log_prob(x), fd, atol=1e-6)
    # feature map: distances to the origin (rotation invariant) -> gradient is radial
    kr = KDE(feature_map=lambda y: y.norm(dim=-1, keepdim=True)).fit(ref)
    g = kr.grad_log_prob(x)
    assert torch.allclose((g[:, 0] * x[:, 1] - g[:, 1] * x[:, 0]), torch.zeros(5), atol=1e-9)
    # Scott bandwidth and entropy of a Gaussian sample close to the closed form
    big = torch.randn(3000, 2)
    h_true = math.log(2 * math.pi * math.e)
    assert KDE().fit(big).entropy() == pytest.approx(h_true, rel=0.05)
    fitted = KDEEntropy().fit(FitContext(x=big))
    assert fitted.value == pytest.approx(h_true, rel=0.05)

"""The log-barrier utility: its first variation against a finite difference of F over sample weights, its value
in closed form, and the fitted gradient field on an analytic 2-D reward and constraint."""

from __future__ import annotations

import math

import pytest
import torch

from fdc_mol.fdc.utilities import ExpectedReward, FitContext, LogBarrier, OracleOutput, SuperQuantile


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _sample(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, generator=g, dtype=torch.float64)
    c = torch.rand(n, generator=g, dtype=torch.float64) * 2.0 - 1.0
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    return r, c, w / w.sum()


@pytest.mark.parametrize("sense,bound", [("le", 0.6), ("ge", -0.7)])
@pytest.mark.parametrize("objective", ["expected", "superquantile"])
def test_first_variation_matches_finite_difference_over_weights(sense: str, bound: float, objective: str) -> None:
    """d/dε F(w + ε u) at ε = 0 equals Σ_i u_i δF_i for zero-sum u (δF is defined up to a constant)."""
    r, c, w = _sample(40, seed=3)
    util = LogBarrier(ExpectedReward() if objective == "expected" else SuperQuantile(0.8), "c", bound, beta=0.37,
                      sense=sense)
    gu = torch.Generator().manual_seed(11)
    for _ in range(3):
        u = torch.randn(40, generator=gu, dtype=torch.float64)
        u = u - u.mean()
        h = 1e-6
        fd = (util.value(r, c, w + h * u) - util.value(r, c, w - h * u)) / (2 * h)
        dF = (u * util.first_variation(r, c, w)).sum()
        assert float(dF) == pytest.approx(float(fd), rel=1e-6, abs=1e-8)


def test_value_in_closed_form() -> None:
    r = torch.tensor([1.0, 2.0, 4.0, 5.0])
    c = torch.tensor([0.0, 1.0, 2.0, 3.0])  # mean 1.5
    le = LogBarrier(ExpectedReward(), "c", bound=2.0, beta=0.5, sense="le")
    assert float(le.value(r, c)) == pytest.approx(3.0 + 0.5 * math.log(0.5))
    ge = LogBarrier(ExpectedReward(), "c", bound=1.0, beta=0.5, sense="ge")
    assert float(ge.value(r, c)) == pytest.approx(3.0 + 0.5 * math.log(0.5))
    # the barrier term pushes c down (le) / up (ge): δF's c-part has the sign of ρ
    assert float(le.first_variation(r, c)[3] - le.first_variation(r, c)[2]) == pytest.approx(1.0 - 0.5 / 0.5)
    assert float(ge.first_variation(r, c)[3] - ge.first_variation(r, c)[2]) == pytest.approx(1.0 + 0.5 / 0.5)


def _oracle(x: torch.Tensor, traj: object = None) -> OracleOutput:
    """r = x₀ + x₁² with ∇r = (1, 2x₁); c = x₀² with ∇c = (2x₀, 0); NaN for the point with x₀ > 9."""
    r = x[:, 0] + x[:, 1] ** 2
    gr = torch.stack([torch.ones_like(x[:, 0]), 2 * x[:, 1]], 1)
    c = x[:, 0] ** 2
    gc = torch.stack([2 * x[:, 0], torch.zeros_like(x[:, 0])], 1)
    bad = x[:, 0] > 9
    return OracleOutput(torch.where(bad, torch.nan, r), gr, {"c": (torch.where(bad, torch.nan, c), gc)})


def test_fitted_gradient_field_on_an_analytic_reward() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 2, generator=g)
    x[0, 0] = 10.0  # fails (NaN): left out of the statistics, zero gradient
    util = LogBarrier(SuperQuantile(0.7), "c", bound=2.0, beta=0.2, sense="le")
    fitted = util.fit(FitContext(x=x, reward=_oracle))
    ok = torch.arange(500) != 0
    r, c = x[ok, 0] + x[ok, 1] ** 2, x[ok, 0] ** 2
    m = float(c.mean())
    q = float(SuperQuantile(0.7).stats(r)["q"])
    assert fitted.info["constraint_mean"] == pytest.approx(m) and fitted.info["feasible"]
    assert fitted.info["q"] == pytest.approx(q)
    assert fitted.value == pytest.approx(float(SuperQuantile(0.7).value(r)) + 0.2 * math.log(2.0 - m))
    xe = torch.tensor([[0.5, 2.0], [0.3, -0.1], [10.0, 0.0]])
    got = fitted.grad(xe, None)
    re = xe[:, 0] + xe[:, 1] ** 2
    ind = (re >= q).double() / 0.3
    want = torch.stack([ind * 1.0, ind * 2 * xe[:, 1]], 1) - (0.2 / (2.0 - m)) * torch.stack(
        [2 * xe[:, 0], torch.zeros(3)], 1)
    want[2] = 0.0
    assert torch.allclose(got, want, atol=1e-12)
    assert ind[0] > 0 and ind[1] == 0  # one point in the tail, one not: both terms are exercised


def test_infeasible_fit_floors_the_slack_and_missing_columns_are_named() -> None:
    x = torch.tensor([[2.0, 0.0], [3.0, 1.0], [2.5, 0.5]])  # c = x₀² has mean ≈ 6.4 > bound 1
    util = LogBarrier(ExpectedReward(), "c", bound=1.0, beta=0.1, sense="le", min_slack=0.05)
    fitted = util.fit(FitContext(x=x, reward=_oracle))
    assert not fitted.info["feasible"] and fitted.info["slack"] < 0
    assert fitted.info["barrier_coef"] == pytest.approx(-0.1 / 0.05)
    # columns given in the context are used instead of calling the oracle for the fit statistics
    fitted2 = util.fit(FitContext(x=x, reward=_oracle, rewards=torch.tensor([1.0, 2.0, 3.0]),
                                  columns={"c": torch.tensor([0.0, 0.5, 1.0])}))
    assert fitted2.info["constraint_mean"] == pytest.approx(0.5) and fitted2.info["feasible"]
    with pytest.raises(ValueError, match="no constraint column 'energy'"):
        LogBarrier(ExpectedReward(), "energy", 0.0).fit(FitContext(x=x, reward=_oracle))
    with pytest.raises(ValueError, match="sense must be 'le' or 'ge'"):
        LogBarrier(ExpectedReward(), "c", 0.0, sense="lt")

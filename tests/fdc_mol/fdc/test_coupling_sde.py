"""The memoryless SDE samples a flow's own distribution only under the independent coupling.

Closed-form case: prior N(0, 1), data N(m, s²), linear schedule x_t = (1 − t) x_0 + t x_1.
- Independent coupling: v(x, t) = E[x_1 − x_0 | x_t] = m + (t s² − (1 − t))/var_t · (x − t m),
  var_t = (1 − t)² + t² s².  Both the ODE and the memoryless SDE (score s = (v − κx)/η) end at N(m, s²).
- OT (monotone) coupling x_1 = m + s x_0 (what minibatch OT converges to in 1-D, and the idea behind
  FlowMol's OT-aligned prior): v(x, t) = m + (s − 1)(x − t m)/(1 − t + t s). The ODE still ends at
  N(m, s²), but the memoryless SDE ends at N(m, s²/3): the moment equations
  dμ/dt = 2a + Bμ, dV/dt = 2BV + 2(1 − t)/t with B = 2b − 1/t integrate to V(1) = s²/3 (checked
  numerically below against scipy, and by sampling with the project's own sampler).
This is why a base model for adjoint matching must be trained with ``ot_align: false``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from scipy.integrate import solve_ivp
from torch import Tensor, nn

from fdc_mol.fdc.flow import EuclideanFlow
from fdc_mol.toy.flows import GMMVelocity

M, S = 1.0, 0.5


class MonotoneOTVelocity(nn.Module):
    """Exact velocity of the monotone (OT) coupling x_1 = m + s x_0 of N(0, 1) and N(m, s²); (n, 1)."""

    def __init__(self, m: float, s: float) -> None:
        super().__init__()
        self.m, self.s = m, s

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.m + (self.s - 1.0) * (x - t * self.m) / (1.0 - t + t * self.s)


def _slope(t: float, s: float, coupling: str) -> float:
    if coupling == "ot":
        return (s - 1.0) / (1.0 - t + t * s)
    return (t * s * s - (1.0 - t)) / ((1.0 - t) ** 2 + t * t * s * s)


def sde_terminal_moments(m: float, s: float, coupling: str, t0: float = 1e-6) -> tuple[float, float]:
    """(mean, std) at t = 1 of the memoryless SDE dx = (2v − x/t) dt + √(2(1 − t)/t) dW, from p_{t0}."""

    def rhs(t: float, y: list[float]) -> list[float]:
        b = _slope(t, s, coupling)
        a = m - b * t * m
        big_b = 2.0 * b - 1.0 / t
        return [2.0 * a + big_b * y[0], 2.0 * big_b * y[1] + 2.0 * (1.0 - t) / t]

    v0 = (1 - t0 + t0 * s) ** 2 if coupling == "ot" else (1 - t0) ** 2 + t0 * t0 * s * s
    sol = solve_ivp(rhs, (t0, 1.0), [t0 * m, v0], method="LSODA", rtol=1e-10, atol=1e-12)
    return float(sol.y[0, -1]), math.sqrt(float(sol.y[1, -1]))


@pytest.mark.parametrize("s", [0.5, 2.0])
def test_moment_equations_closed_form(s: float) -> None:
    mean_i, std_i = sde_terminal_moments(M, s, "independent")
    mean_o, std_o = sde_terminal_moments(M, s, "ot")
    assert mean_i == pytest.approx(M, abs=1e-8) and std_i == pytest.approx(s, rel=1e-8)
    assert mean_o == pytest.approx(M, abs=1e-8) and std_o == pytest.approx(s / math.sqrt(3.0), rel=1e-6)


@pytest.mark.parametrize("coupling", ["independent", "ot"])
def test_sampler_sde_matches_ode_only_under_independent_coupling(coupling: str) -> None:
    net = GMMVelocity([[M]], [S], [1.0]) if coupling == "independent" else MonotoneOTVelocity(M, S)
    flow = EuclideanFlow(net, dim=1)
    n, steps = 40_000, 200
    ode = flow.sample(n, steps, memoryless=False, record=False, generator=torch.Generator().manual_seed(0)).x1
    sde = flow.sample(n, steps, memoryless=True, record=False, generator=torch.Generator().manual_seed(1)).x1
    se_std = S / math.sqrt(2 * n)  # standard error of a sample std
    # The ODE reaches the data law under both couplings.
    assert float(ode.std()) == pytest.approx(S, abs=6 * se_std + 0.01 * S)
    assert float(ode.mean()) == pytest.approx(M, abs=0.02)
    _, std_expected = sde_terminal_moments(M, S, coupling)
    # The project's Euler–Maruyama sampler agrees with the moment equations (200 steps: < 1.5 % bias).
    assert float(sde.std()) == pytest.approx(std_expected, rel=0.015)
    assert float(sde.mean()) == pytest.approx(M, abs=0.02)
    if coupling == "independent":
        assert float(sde.std()) == pytest.approx(float(ode.std()), rel=0.02)
    else:  # 42 % too narrow: the memoryless SDE does not sample the OT-trained flow's distribution
        assert float(sde.std()) < 0.65 * float(ode.std())


def test_fdc_base_config_uses_independent_coupling() -> None:
    """The recipe of the FDC base model keeps the independent coupling (protects against recipe drift)."""
    root = Path(__file__).resolve().parents[3]
    cfg = yaml.safe_load((root / "fdc_mol" / "configs" / "flowmol_qm9_small_indep.yaml").read_text())
    assert cfg["data"]["ot_align"] is False


def test_default_model_was_trained_with_the_independent_coupling() -> None:
    """The default model (what demo, finetune and the tests use) records the independent coupling; the OT-aligned
    predecessor stays loadable under its own name."""
    from flowmol_ext import load_pretrained

    last = load_pretrained("qm9_small").metadata["history"][-1]
    assert last["coupling"] == "independent" and last["ot_align"] is False
    assert load_pretrained("qm9_small_ot").metadata.get("history")  # still loadable, with its own history

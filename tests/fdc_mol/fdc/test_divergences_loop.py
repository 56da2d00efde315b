"""W1 critic, Rényi with likelihood-ODE densities, likelihood ODE vs closed form, FDC resume determinism."""

from __future__ import annotations

import pytest
import torch

from fdc_mol.fdc.adjoint_matching import AMConfig
from fdc_mol.fdc.divergences import Objective, Renyi, Wasserstein1
from fdc_mol.fdc.flow import log_likelihood
from fdc_mol.fdc.loop import StageStore, harmonic_eta, run_fdc
from fdc_mol.fdc.utilities import FitContext, SuperQuantile
from fdc_mol.toy.flows import make_gmm_flow


@pytest.mark.parametrize("aniso", [None, (1.0, 3.0)])
def test_w1_critic_recovers_shift_distance(aniso):
    """W1 between N(m, 0.5² I) and N(0, 0.5² I) under ‖A(x − y)‖ is ‖A m‖; ∇φ points along A² m."""
    torch.manual_seed(0)
    m = torch.tensor([1.0, 1.0])
    xp = m + 0.5 * torch.randn(2000, 2)
    w1 = Wasserstein1(anisotropy=aniso, hidden=64, steps=250, lr=2e-3, batch=128)
    fitted = w1.fit(FitContext(x=xp, sample_pre=lambda n: 0.5 * torch.randn(n, 2)))
    a = torch.ones(2) if aniso is None else torch.tensor(aniso)
    assert fitted.value == pytest.approx(float((a * m).norm()), rel=0.1)
    g = fitted.grad(m + 0.5 * torch.randn(500, 2)).mean(0)
    expect = a**2 * m / (a * m).norm()
    assert torch.nn.functional.cosine_similarity(g, expect, dim=0) > 0.97


def test_likelihood_ode_matches_closed_form_and_renyi():
    flow = make_gmm_flow([[1.0, 0.0], [-1.0, 0.5]], [0.4, 0.6], [0.3, 0.7])
    x = flow.net.pre.sample_data(5)
    t1 = 1 - 1e-3
    lp = log_likelihood(lambda y, s: flow.velocity(y, s), x, steps=400, t1=t1)
    assert torch.allclose(lp, flow.net.pre.log_prob(x, t1), atol=0.03)
    # Renyi of order 2 between N(m, I·s²) and N(0, I·s²) is β‖m‖²/(2s²) = 1.0 here
    p, q = make_gmm_flow([[0.5, 0.0]], [0.5], [1.0]), make_gmm_flow([[0.0, 0.0]], [0.5], [1.0])
    xs = p.net.pre.sample_data(400)
    fitted = Renyi(beta=2.0, density="ode", ode_steps=100, eps=1e-3).fit(FitContext(x=xs, model=p, pre=q))
    assert fitted.value == pytest.approx(1.0, rel=0.2)
    g = fitted.grad(xs[:5])
    assert g.shape == (5, 2) and torch.isfinite(g).all()
    with pytest.raises(ValueError):
        Renyi(beta=1.0)


def _tiny_run(run_dir, stop_after=None):
    torch.manual_seed(123)
    model = make_gmm_flow([[0.0, 0.0], [2.0, 0.0]], [0.5, 0.5], [0.5, 0.5], hidden=16)
    reward = lambda x, tr: (x[:, 0] + 0.5 * x[:, 1], torch.tensor([1.0, 0.5]).expand_as(x))  # noqa: E731
    return run_fdc(
        model,
        Objective(SuperQuantile(0.9)),
        harmonic_eta(5.0),
        3,
        AMConfig(n_traj=8, steps=8),
        run_dir,
        steps_per_iter=3,
        lr=1e-2,
        n_fit=200,
        reward=reward,
        eval_fn=lambda m, k: {"mean_x0": float(m.sample(100, 8, memoryless=True, record=False).x1[:, 0].mean())},
        stop_after=stop_after,
    )


def test_fdc_resume_is_identical(tmp_path):
    full = _tiny_run(tmp_path / "a")
    part = _tiny_run(tmp_path / "b", stop_after=1)
    assert StageStore(tmp_path / "b").last_finished() == 1 and part.metrics[-1]["iteration"] == 1
    assert not (tmp_path / "b" / "stages" / "stage_002").exists()
    resumed = _tiny_run(tmp_path / "b")
    assert resumed.resumed_from == 1
    for pa, pb in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(pa, pb)
    assert [r["mean_x0"] for r in full.metrics] == [r["mean_x0"] for r in resumed.metrics]
    assert [r["eta"] for r in full.metrics[1:]] == [5.0, 10.0, 15.0]
    assert (tmp_path / "a" / "metrics.csv").read_text().count("\n") == 5  # header + iterations 0..3
    # the Adam state carried across stages is part of the stage (resume continues its moments)
    st = torch.load(tmp_path / "a" / "stages" / "stage_003" / "state.pt", weights_only=False)
    assert st["solver"]["optimizer"]["state"][0]["step"] == 9  # 3 stages x 3 steps, one optimizer


def test_finished_run_is_not_rerun(tmp_path):
    _tiny_run(tmp_path / "a")
    calls = []

    def reward(x, tr):  # would be called by any fit or AM step
        calls.append(1)
        return x[:, 0], torch.ones_like(x)

    torch.manual_seed(123)
    model = make_gmm_flow([[0.0, 0.0], [2.0, 0.0]], [0.5, 0.5], [0.5, 0.5], hidden=16)
    again = run_fdc(model, Objective(SuperQuantile(0.9)), harmonic_eta(5.0), 3, AMConfig(n_traj=8, steps=8),
                    tmp_path / "a", steps_per_iter=3, lr=1e-2, n_fit=200, reward=reward)
    assert calls == [] and again.resumed_from == 3 and len(again.metrics) == 4

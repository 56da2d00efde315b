"""A finetune job with reward components and the log-barrier utility (tiny network, plugin components so no xTB):
the constraint column reaches the utility through the fit context and the reward oracle, and the run writes its
report."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fdc_mol.config import FinetuneConfig
from fdc_mol.fdc.utilities import LogBarrier, OracleOutput
from fdc_mol.molecular.job import FinetuneJob, make_utility
from fdc_mol.rewards import make_molecular_reward

from ..test_finetune import tiny_model

EXAMPLES = Path(__file__).resolve().parents[3] / "docs" / "examples"


@pytest.fixture()
def examples_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield
    sys.modules.pop("plugin_example", None)


def _cfg(run_dir: Path, bound: float) -> FinetuneConfig:
    rg = "plugin_example:radius_of_gyration"
    return FinetuneConfig.model_validate({
        "run_dir": str(run_dir), "seed": 1, "device": "cpu", "K": 1, "am_steps_per_iteration": 1, "lr": 1e-3,
        "mirror_eta": 1.0, "n_fit": 12, "sample_steps": 6, "am": {"n_traj": 6, "steps": 6, "lct": None},
        "data_dir": None, "write_sdf": True, "n_atoms": 5, "evaluation": {"samplers": ["ode"], "n_boot": 20},
        "utility": {"kind": "log_barrier", "beta": 0.75,
                    "barrier": {"objective": "superquantile", "constraint": "spread", "bound": bound,
                                "weight": 0.5}},
        "reward": {"executor": "serial", "components": [
            {"plugin": rg, "name": "compact", "direction": "minimize", "params": {"heavy_only": False}},
            {"plugin": rg, "name": "spread", "role": "constraint", "params": {"heavy_only": False}}]}})


def test_log_barrier_job_gets_the_constraint_column_and_writes_the_report(tmp_path: Path, examples_on_path) -> None:  # noqa: ANN001
    torch.set_num_threads(1)
    cfg = _cfg(tmp_path / "run", bound=50.0)
    job = FinetuneJob(cfg, model=tiny_model(), reward=make_molecular_reward(cfg.reward))
    util = make_utility(cfg)
    assert isinstance(util, LogBarrier) and util.sense == "le" and util.constraint == "spread"
    ctx = job.fit_context(job.flow, job.flow, 1, None)
    assert ctx.columns is not None and "spread" in ctx.columns
    spread = ctx.columns["spread"].numpy()
    np.testing.assert_allclose(spread, -ctx.rewards.numpy(), rtol=1e-5)  # the same R_g, one minimised
    out = ctx.reward(ctx.x, ctx.traj)
    assert isinstance(out, OracleOutput) and set(out.columns) == {"spread"}
    fitted = util.fit(ctx)
    assert fitted.info["constraint_mean"] == pytest.approx(float(np.nanmean(spread)))
    assert fitted.info["feasible"] and fitted.info["barrier_coef"] == pytest.approx(-0.5 / (50.0 - spread.mean()))
    g = fitted.grad(ctx.x, ctx.traj)
    assert g.shape == ctx.x.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    rows = job.run()
    assert [r["iteration"] for r in rows] == [0, 1]
    for f in ("report.html", "top_molecules.png", "distributions.png", "plots.png"):
        assert (tmp_path / "run" / f).is_file(), f
    assert "spread" in (tmp_path / "run" / "report.html").read_text()

"""FDC on molecules: the FlowMol adapter, the AM LightningModule's sign, and kill-and-resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml

from fdc_mol.commands.demo import DEMO_CONFIG
from fdc_mol.config import FinetuneConfig
from fdc_mol.fdc.adjoint_matching import AMConfig
from fdc_mol.fdc.am_module import AdjointMatchingModule
from fdc_mol.fdc.flowmol_flow import FlowMolFlow
from fdc_mol.fdc.molecular import MolecularFDC, superquantile
from fdc_mol.rewards import RewardResult
from flowmol_ext.config import ConfigError
from flowmol_ext.graph import scatter_mean
from flowmol_ext.model.config import ModelConfig
from flowmol_ext.model.flow import FlowMol

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(n_hidden_scalars=32, n_vec_channels=4, n_hidden_edge_feats=16, n_molecule_updates=2, rbf_dim=8,
            n_cp_feats=2)


def tiny_model(seed: int = 0) -> FlowMol:
    torch.manual_seed(seed)
    return FlowMol(ModelConfig(**TINY), metadata={"n_atoms_hist": [0, 0, 0, 0, 1, 2, 2]})


class CompactnessReward:
    """r = −Σ‖x_i − x̄‖² (Å²) per molecule, gradient −2(x − x̄): a cheap analytic stand-in for xTB."""

    def __call__(self, molecules: list, with_grad: bool = True) -> RewardResult:
        vals, grads = [], []
        for m in molecules:
            xc = m.x.double() - m.x.double().mean(0)
            vals.append(-float(xc.pow(2).sum()))
            grads.append((-2 * xc).numpy())
        v = np.array(vals)
        return RewardResult(value=v, energy=-v, grad=grads if with_grad else None, ok=np.ones(len(v), bool),
                            reason=[""] * len(v), method="compactness")


def test_demo_config_file_matches_the_demo_command() -> None:
    assert yaml.safe_load((ROOT / "configs" / "fdc_demo_cpu.yaml").read_text()) == DEMO_CONFIG
    for name in ("fdc_demo_cpu", "am_demo_cpu", "fdc_novelty_energy", "am_energy"):
        FinetuneConfig.model_validate(yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text()))


def test_config_rejects_unknown_keys_and_inconsistent_methods() -> None:
    from flowmol_ext.config import validate_config

    with pytest.raises(ConfigError, match="unknown key 'etaa'"):
        validate_config(FinetuneConfig, {"etaa": 0.1})
    with pytest.raises(ConfigError, match="alpha > 0"):
        validate_config(FinetuneConfig, {"method": "am", "K": 1, "alpha": 0.0})
    with pytest.raises(ConfigError, match="not implemented"):
        validate_config(FinetuneConfig, {"alpha": 0.1})


def test_velocity_uses_the_recorded_discrete_state_and_projection_is_com_free() -> None:
    from flowmol_ext import load_pretrained

    flow = FlowMolFlow(load_pretrained("qm9_small"))
    traj = flow.sample(3, 6, memoryless=True, record=True, generator=torch.Generator().manual_seed(1))
    g = traj.context["graph"]
    k = 3
    x = traj.xs[k]
    d = traj.discrete
    t = float(traj.times[k])
    pred = flow.model.predict(x, d.a[k], d.c[k], d.e[k], torch.full((3,), t), g, remove_com=True)
    torch.testing.assert_close(flow.velocity(x, t, k, traj), (pred.x1 - x) / (1 - t))
    # a different recorded discrete state gives a different drift: the adapter really reads step k
    assert (flow.velocity(x, t, 0, traj) - flow.velocity(x, t, 5, traj)).abs().max() > 1e-2
    for xs in traj.xs:  # every recorded state is COM-free
        assert scatter_mean(xs, g.node_graph, 3).abs().max() < 1e-5
    v = torch.randn_like(x)
    assert scatter_mean(flow.project(v, traj), g.node_graph, 3).abs().max() < 1e-6


def test_positions_only_trains_the_position_updaters() -> None:
    flow = FlowMolFlow(tiny_model(), trainable="positions")
    names = [n for n, p in flow.model.named_parameters() if p.requires_grad]
    assert names and all("node_position_updaters" in n for n in names)
    assert len(flow.trainable_parameters()) == len(names)
    assert all(not p.requires_grad for p in flow.copy_frozen().parameters())


def _spread(flow: FlowMolFlow) -> float:
    traj = flow.sample(16, 8, memoryless=True, record=False, generator=torch.Generator().manual_seed(123))
    g = traj.context["graph"]
    xc = traj.x1 - scatter_mean(traj.x1, g.node_graph, traj.n)[g.node_graph]
    return float(xc.pow(2).sum() / traj.n)


def test_am_module_moves_molecules_up_the_reward() -> None:
    """Sign test on molecules: fine-tuning toward r = −Σ‖x‖² makes sampled molecules more compact."""
    torch.set_num_threads(1)
    fine = FlowMolFlow(tiny_model(), n_atoms=6)
    before = _spread(fine)
    reward = CompactnessReward()
    from fdc_mol.fdc.flowmol_flow import reward_oracle

    oracle = reward_oracle(reward)

    def grad(x: torch.Tensor, traj) -> torch.Tensor:  # noqa: ANN001
        return oracle(x, traj)[1] * 2.0

    module = AdjointMatchingModule(fine, fine.copy_frozen(), grad, AMConfig(n_traj=8, steps=8, lct=None), lr=1e-2,
                                   lam=1.0, seed=0)
    trainer = pl.Trainer(max_steps=16, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    after = _spread(fine)
    assert after < 0.85 * before, (before, after)


def _job(run_dir: Path) -> MolecularFDC:
    cfg = FinetuneConfig.model_validate({
        "run_dir": str(run_dir), "seed": 3, "device": "cpu", "K": 2, "am_steps_per_iteration": 2, "lr": 1e-3,
        "eta": 1.0, "utility": {"kind": "superquantile", "beta": 0.75}, "n_fit": 12, "sample_steps": 6,
        "am": {"n_traj": 6, "steps": 6, "lct": None}, "data_dir": None, "write_sdf": True, "n_atoms": 5})
    return MolecularFDC(cfg, model=tiny_model(), reward=CompactnessReward())


def test_kill_and_resume_gives_identical_metrics(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    full = _job(tmp_path / "full").run()
    _job(tmp_path / "killed").run(stop_after=1)  # "killed" after the first finished stage
    assert (tmp_path / "killed" / "stages" / "stage_001" / "stage_done.json").is_file()
    assert not (tmp_path / "killed" / "stages" / "stage_002").exists()
    resumed = _job(tmp_path / "killed").run()
    assert [r["iteration"] for r in full] == [0, 1, 2]
    keys = ("mean_reward", "sq_beta", "validity", "molecule_stability", "mean_n_atoms")
    for a, b in zip(full, resumed):
        for key in keys:
            assert a[key] == b[key] or (np.isnan(a[key]) and np.isnan(b[key])), (key, a[key], b[key])
    assert (tmp_path / "full" / "metrics.csv").read_text() .splitlines()[1:] != []
    for f in ("plots.png", "samples/iteration_000.sdf", "samples/iteration_002.sdf", "model/model.pt"):
        assert (tmp_path / "full" / f).is_file(), f


def test_superquantile_of_known_rewards() -> None:
    r = np.array([1.0, 2.0, 3.0, 4.0, np.nan, 10.0])
    sq, q = superquantile(r, 0.8)
    assert q == pytest.approx(np.quantile([1, 2, 3, 4, 10], 0.8))
    assert sq == pytest.approx(10.0)

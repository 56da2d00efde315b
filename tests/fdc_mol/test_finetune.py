"""FDC on molecules: the FlowMol adapter, the AM LightningModule's sign, and kill-and-resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fdc_mol.config import FinetuneConfig, config_path
from fdc_mol.fdc.adjoint_matching import AMConfig
from fdc_mol.fdc.loop import Stage
from fdc_mol.fdc.utilities import Fitted
from fdc_mol.molecular.am_module import LightningAMSolver
from fdc_mol.molecular.flowmol_flow import FlowMolFlow
from fdc_mol.molecular.job import FinetuneJob
from fdc_mol.molecular.reward_oracle import molecules_of, reward_oracle
from fdc_mol.molecular.statistics import paired_difference, superquantile
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


def test_shipped_configs_load_by_name_and_are_the_top_level_files() -> None:
    for name in ("fdc_demo_cpu", "am_demo_cpu", "fdc_novelty_energy", "am_energy"):
        path = config_path(name)
        assert path.parent.name == "configs" and path.parent.parent.name == "fdc_mol"
        FinetuneConfig.model_validate(yaml.safe_load(path.read_text()))
        # the top-level configs/ is the package folder itself (a symlink), never a copy
        assert (ROOT / "configs" / f"{name}.yaml").resolve() == path.resolve()
    with pytest.raises(FileNotFoundError, match="fdc_demo_cpu"):
        config_path("no_such_config")


def test_config_rejects_unknown_keys_and_inconsistent_methods() -> None:
    from flowmol_ext.config import validate_config

    with pytest.raises(ConfigError, match="unknown key 'etaa'"):
        validate_config(FinetuneConfig, {"etaa": 0.1})
    with pytest.raises(ConfigError, match="kl_weight > 0"):
        validate_config(FinetuneConfig, {"algorithm": "am", "K": 1, "kl_weight": 0.0})
    with pytest.raises(ConfigError, match="not implemented"):
        validate_config(FinetuneConfig, {"kl_weight": 0.1})
    with pytest.raises(ConfigError, match="novelty_kde_components"):
        validate_config(FinetuneConfig, {"novelty_kde_components": 0})
    assert validate_config(FinetuneConfig, {"novelty_kde_components": None}).novelty_kde_components is None


def test_deprecated_keys_load_with_a_message_naming_the_new_key() -> None:
    from flowmol_ext.config import validate_config

    with pytest.warns(DeprecationWarning, match="'eta' is deprecated: use 'mirror_eta'"):
        cfg = validate_config(FinetuneConfig, {"method": "am", "K": 1, "alpha": 0.5, "eta": 0.2,
                                               "reward": {"method": "gfn2"}})
    assert (cfg.algorithm, cfg.kl_weight, cfg.mirror_eta, cfg.reward.level) == ("am", 0.5, 0.2, "gfn2")
    with pytest.raises(ConfigError, match="give only 'mirror_eta'"):
        validate_config(FinetuneConfig, {"eta": 0.2, "mirror_eta": 0.3})


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
    """Sign test on molecules through the Lightning solver: fine-tuning toward r = −Σ‖x − x̄‖² makes sampled
    molecules more compact; the Adam state is carried to the next stage."""
    torch.set_num_threads(1)
    fine = FlowMolFlow(tiny_model(), n_atoms=6)
    before = _spread(fine)
    oracle = reward_oracle(CompactnessReward())

    def grad(x: torch.Tensor, traj) -> torch.Tensor:  # noqa: ANN001
        return oracle(x, traj)[1] * 2.0

    solver = LightningAMSolver(AMConfig(n_traj=8, steps=8, lct=None), lr=1e-2, progress=False)
    stage = Stage(k=1, eta=1.0, fitted=Fitted(0.0, lambda x, t: x), terminal_grad=grad, lam=1.0, steps=16, seed=0)
    out = solver.solve(fine, fine.copy_frozen(), stage)
    after = _spread(fine)
    assert after < 0.85 * before, (before, after)
    assert out["n_signal"] == 8 and out["n_scored"] == 8 and out["param_grad_norm"] > 0
    assert solver.state_dict()["optimizer"]["state"][0]["step"] == 16


def _job(run_dir: Path, **extra) -> FinetuneJob:  # noqa: ANN003
    cfg = FinetuneConfig.model_validate({
        "run_dir": str(run_dir), "seed": 3, "device": "cpu", "K": 2, "am_steps_per_iteration": 2, "lr": 1e-3,
        "mirror_eta": 1.0, "utility": {"kind": "superquantile", "beta": 0.75}, "n_fit": 12, "sample_steps": 6,
        "am": {"n_traj": 6, "steps": 6, "lct": None}, "data_dir": None, "write_sdf": True, "n_atoms": 5,
        "evaluation": {"samplers": ["ode", "sde"], "n_boot": 50}, **extra})
    return FinetuneJob(cfg, model=tiny_model(), reward=CompactnessReward())


def test_kill_and_resume_gives_identical_metrics(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    full = _job(tmp_path / "full").run()
    _job(tmp_path / "killed").run(stop_after=1)  # "killed" after the first finished stage
    assert (tmp_path / "killed" / "stages" / "stage_001" / "stage_done.json").is_file()
    assert not (tmp_path / "killed" / "stages" / "stage_002").exists()
    resumed = _job(tmp_path / "killed").run()
    assert [r["iteration"] for r in full] == [0, 1, 2]
    keys = ("mean_reward", "sq_beta", "validity", "molecule_stability", "mean_n_atoms", "sde_sq_beta", "kde_logp_pre",
            "fixed_graph_delta")
    for a, b in zip(full, resumed):
        for key in keys:
            assert a[key] == b[key] or (np.isnan(a[key]) and np.isnan(b[key])), (key, a[key], b[key])
    assert (tmp_path / "full" / "metrics.csv").read_text() .splitlines()[1:] != []
    for f in ("plots.png", "samples/iteration_000.sdf", "samples/iteration_002.sdf", "model/model.pt"):
        assert (tmp_path / "full" / f).is_file(), f


def test_superquantile_reported_is_the_optimised_one() -> None:
    """One definition (the utility's lower quantile): n = 10, β = 0.75 -> q = r_(8), SQ = q + mean((r − q)₊)/(1 − β)."""
    r = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, np.nan])
    assert superquantile(r, 0.75) == pytest.approx(8.0 + (1.0 + 2.0) / 10 / 0.25)  # 9.2: the utility's value
    assert superquantile(r[:5], 0.8) == pytest.approx(5.0)


def test_paired_difference_uses_only_unchanged_finite_pairs() -> None:
    new, ref = np.array([2.0, 3.0, np.nan, 10.0]), np.array([1.0, 1.0, 1.0, 1.0])
    d = paired_difference(new, ref, same=np.array([True, True, True, False]), n_boot=200)
    assert d.n == 2 and d.value == pytest.approx(1.5) and 1.0 <= d.low <= d.high <= 2.0


def test_evaluation_uses_common_random_numbers(tmp_path: Path) -> None:
    """Two evaluations of the same model give identical molecules; the paired difference to iteration 0 is 0."""
    torch.set_num_threads(1)
    job = _job(tmp_path / "crn")
    row0, (traj0, _) = job.evaluate(job.flow, 0)
    row1, (traj1, _) = job.evaluate(job.flow, 1)
    assert torch.equal(traj0.x1, traj1.x1)
    assert row1["paired_delta"] == 0.0 and row1["n_paired"] == row1["n"] - 0 and row1["composition_tv"] == 0.0
    assert "sde_sq_beta" in row1 and row1["sde_n"] == row1["n"]
    from fdc_mol.molecular.reward_oracle import molecules_of

    mols = molecules_of(traj1)
    res = CompactnessReward()(mols, with_grad=False)
    per_atom = np.asarray(res.energy) / np.array([m.n_atoms for m in mols])  # E/n in the reward's energy unit
    assert row1["mean_energy_per_atom"] == pytest.approx(float(per_atom.mean()))
    assert row1["sq_beta"] == pytest.approx(superquantile(np.asarray(res.value), 0.75))


class _CountingReward(CompactnessReward):
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, molecules: list, with_grad: bool = True) -> RewardResult:
        self.calls += 1
        return super().__call__(molecules, with_grad)


def test_finished_run_is_not_rerun_and_run_dir_spelling_does_not_matter(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """Re-running a finished finetune scores nothing again; a relative and an absolute run_dir are one run."""
    from fdc_mol.commands.finetune import run_finetune

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    first = _job(Path("rel"), K=1, am_steps_per_iteration=1)
    run_finetune(first.cfg, print_table=False, model=tiny_model(), reward=CompactnessReward())
    counting = _CountingReward()
    again = _job(tmp_path / "rel", K=1, am_steps_per_iteration=1)  # the same directory, spelled absolute
    rows = run_finetune(again.cfg, print_table=False, model=tiny_model(), reward=counting)
    assert counting.calls == 0 and [r["iteration"] for r in rows] == [0, 1]
    other = _job(tmp_path / "rel", K=1, am_steps_per_iteration=2)
    with pytest.raises(ValueError, match="different config"):
        run_finetune(other.cfg, print_table=False, model=tiny_model(), reward=counting)
    # a run saved before keys were added (they take their defaults) is the same run
    saved = tmp_path / "rel" / "config.yaml"
    old = yaml.safe_load(saved.read_text())
    old["evaluation"].pop("n_molecules")
    old["reward"].pop("components", None)
    saved.write_text(yaml.safe_dump(old))
    rows = run_finetune(again.cfg, print_table=False, model=tiny_model(), reward=counting)
    assert counting.calls == 0 and [r["iteration"] for r in rows] == [0, 1]


def test_replay_positions_reproduces_the_ode_and_fixed_graph_delta(tmp_path: Path) -> None:
    """Replaying the base model along its own recorded ODE trajectory gives its final positions; after a weight
    change the molecules stay the same (same graphs) and only the geometry moves."""
    torch.set_num_threads(1)
    flow = FlowMolFlow(tiny_model(), n_atoms=5)
    traj = flow.sample(6, 8, memoryless=False, record=True, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(flow.replay_positions(traj), traj.x1, rtol=0, atol=1e-5)
    job = _job(tmp_path / "fixed", evaluation={"samplers": ["ode"], "n_boot": 50})
    row0, _ = job.evaluate(job.flow, 0)
    assert row0["fixed_graph_delta"] == 0.0
    with torch.no_grad():
        for p in job.flow.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    row1, _ = job.evaluate(job.flow, 1)
    x = job.flow.replay_positions(job.ref_traj)
    r = np.asarray(CompactnessReward()(molecules_of(job.ref_traj, x)).value)
    assert row1["fixed_graph_delta"] == pytest.approx(float(np.mean(r - job.ref_rewards)), rel=1e-6)
    assert row1["n_fixed_graph"] == job.cfg.n_fit
    # the conformer-novelty metric on the same molecules: leave-own-reference-out log p̂_pre, new minus old
    final = job.ref_traj.context["final"]
    kde = job.kde_pre
    assert kde.projection is not None and kde.projection.shape[1] == job.cfg.novelty_kde_components
    lp0 = kde.log_prob(job.ref_traj.x1, final.a, final.node_graph, job.ref_traj.n, exclude_self=True)
    lp1 = kde.log_prob(x, final.a, final.node_graph, job.ref_traj.n, exclude_self=True)
    assert row0["fixed_graph_kde_delta"] == 0.0
    assert row1["fixed_graph_kde_delta"] == pytest.approx(float((lp1 - lp0).double().mean()), rel=1e-5)
    assert row1["fixed_graph_kde_delta_lo"] <= row1["fixed_graph_kde_delta"] <= row1["fixed_graph_kde_delta_hi"]
    saved = np.load(job.run_dir / "samples" / "iteration_001_ode.npz")
    np.testing.assert_allclose(saved["fixed_graph_kde_logp"], lp1.double().numpy(), rtol=1e-5)
    np.testing.assert_allclose(saved["fixed_graph_rewards"], r, rtol=1e-6)


def test_paired_bootstrap_of_a_statistic() -> None:
    from fdc_mol.molecular.statistics import paired_bootstrap

    rng = np.random.default_rng(0)
    base = rng.normal(size=400)
    shifted = base + 0.1  # the same molecules, every reward 0.1 higher: SQ moves by exactly 0.1
    d = paired_bootstrap(shifted, base, lambda v: superquantile(v, 0.75), n_boot=200)
    assert d.value == pytest.approx(0.1) and d.low == pytest.approx(0.1) and d.high == pytest.approx(0.1)
    noisy = base + rng.normal(scale=0.5, size=400)
    d = paired_bootstrap(noisy, base, np.mean, n_boot=300)
    assert d.low < d.value < d.high and d.excludes(1.0) and not d.excludes(d.value)


def test_crn_bootstrap_keeps_molecules_that_failed_on_one_side() -> None:
    from fdc_mol.molecular.statistics import crn_bootstrap, paired_bootstrap

    rng = np.random.default_rng(1)
    base = rng.normal(size=300)
    # Without failures it is the paired bootstrap (same index resamples for the same seed).
    noisy = base + rng.normal(scale=0.3, size=300)
    a, b = crn_bootstrap(noisy, base, np.mean, n_boot=200, seed=3), paired_bootstrap(noisy, base, np.mean, 200, seed=3)
    assert (a.value, a.low, a.high, a.n) == pytest.approx((b.value, b.low, b.high, b.n))
    # A shift of every finite reward by 0.1 moves SQ by exactly 0.1 in every resample, even with failures on one
    # side only: each side's statistic is over its own finite molecules.
    shifted = base + 0.1
    shifted[::7] = np.nan
    d = crn_bootstrap(shifted, base, lambda v: superquantile(v, 0.75), n_boot=100)
    assert d.n == 300
    want = superquantile(shifted, 0.75) - superquantile(base, 0.75)
    assert d.value == pytest.approx(want) and d.low <= d.value <= d.high
    e = crn_bootstrap(shifted, base, np.mean, n_boot=100)
    assert e.value == pytest.approx(np.nanmean(shifted) - base.mean())
    with pytest.raises(ValueError, match="equal shapes"):
        crn_bootstrap(base[:5], base, np.mean)


def test_evaluation_size_is_separate_from_the_fit_size(tmp_path: Path) -> None:
    """evaluation.n_molecules sets the evaluation sample (and the fixed-graph set) without changing n_fit; the
    sample is the same across evaluations (common random numbers)."""
    torch.set_num_threads(1)
    job = _job(tmp_path / "big", evaluation={"samplers": ["ode"], "n_boot": 50, "n_molecules": 20})
    row0, (traj0, r0) = job.evaluate(job.flow, 0)
    assert row0["n"] == 20 and r0.numel() == 20 and job.cfg.n_fit == 12
    row1, (traj1, _) = job.evaluate(job.flow, 1)
    assert torch.equal(traj0.x1, traj1.x1) and row1["n_fixed_graph"] == 20
    assert row1["fixed_graph_delta"] == pytest.approx(0.0, abs=1e-5)  # the replay equals the ODE up to rounding
    assert row1["fixed_graph_kde_delta"] == pytest.approx(0.0, abs=1e-3)  # same conformers: same log p̂_pre
    ctx = job.fit_context(job.flow, job.flow, 1, None)  # fit_sampler am: n_fit fresh trajectories
    assert ctx.rewards.numel() == 12


def test_compile_key_puts_the_network_and_its_frozen_copies_under_torch_compile(tmp_path: Path) -> None:
    """``compile: true`` switches the fine model's network to torch.compile; the frozen base and pre-trained copies
    (deepcopies made by the loop) keep the flag, and the default leaves everything eager. Nothing is compiled here:
    compilation happens on the first forward call."""
    job = _job(tmp_path / "c", compile=True)
    assert job.flow.model.vector_field.compiled
    assert job.flow.copy_frozen().model.vector_field.compiled
    assert not _job(tmp_path / "e").flow.model.vector_field.compiled
    with pytest.raises(ValueError, match="compile"):
        _job(tmp_path / "bad", compile="sometimes")


def test_every_shipped_config_validates_against_its_schema() -> None:
    """Each YAML in fdc_mol/configs loads through the strict schema of the command that runs it (pretrain for
    flowmol_*, toy for toy_*, finetune for the rest), with its `extends`/defaults resolved as the CLI does."""
    from fdc_mol.config import CONFIG_DIR
    from fdc_mol.toy.settings import ToyConfig
    from flowmol_ext.config import load_config
    from flowmol_ext.lightning import PretrainConfig

    names = sorted(CONFIG_DIR.glob("*.yaml"))
    assert len(names) >= 20
    for path in names:
        schema = (PretrainConfig if path.stem.startswith("flowmol_") else
                  ToyConfig if path.stem.startswith("toy_") else FinetuneConfig)
        cfg = load_config(schema, path, {})
        assert isinstance(cfg, schema), path.name


def test_demo_prints_the_paired_table_with_the_evaluation_size(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    """``fdc-mol demo`` on a config file (the tiny model and an analytic reward injected): the header names the
    evaluation size (evaluation.n_molecules, not n_fit) and the stage count, and the table has iteration 0 and the
    last iteration with the same-molecules column filled."""
    import argparse

    import fdc_mol.commands.finetune as finetune_cmd
    from fdc_mol.commands import demo

    real = finetune_cmd.run_finetune
    monkeypatch.setattr(finetune_cmd, "run_finetune",
                        lambda cfg, print_table=False: real(cfg, print_table=print_table, model=tiny_model(),
                                                            reward=CompactnessReward()))
    cfg = _job(tmp_path / "unused", K=1, am_steps_per_iteration=1,
               evaluation={"samplers": ["ode"], "n_boot": 50, "n_molecules": 16}).cfg
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    args = argparse.Namespace(run_dir=tmp_path / "demo", seed=3, config=str(path))
    threads = torch.get_num_threads()
    try:
        assert demo.run(args) == 0
    finally:
        torch.set_num_threads(threads)  # the demo sets 2 torch threads for the process
    out = capsys.readouterr().out
    assert "1 outer iteration x 1 adjoint-matching steps of 6 trajectories" in out
    assert "16 molecules per row, seed 3" in out
    rows = [line.split() for line in out.splitlines() if line[:2] in ("0 ", "1 ")]
    assert [r[0] for r in rows] == ["0", "1"]
    assert "(16)" in " ".join(rows[1])  # the same-molecules Δr over all 16 molecules (the analytic reward never fails)
    assert (tmp_path / "demo" / "samples" / "iteration_001.sdf").is_file()


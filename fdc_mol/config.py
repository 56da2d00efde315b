"""Typed configs of the application (strict: unknown keys are rejected with the key named).

Names say which quantity they are (three different η's meet in one run):
- ``mirror_eta``: the FDC mirror-descent step η_k (reward scale 1/η_k of stage k);
- ``sampler.stochasticity``: the CTMC re-masking rate of the discrete flows (FlowMol's "η");
- the schedule's η_t = α'(1 − α)/α of the memoryless SDE is not a setting.
``kl_weight`` is the α of G = F − α·KL (for plain adjoint matching: the reward multiplier is 1/α);
``algorithm`` (fdc | am) and ``reward.level`` (gfn1 | gfn2 | mmff94) replace the two ``method`` keys.
Configs written with the old names (method, eta, eta_schedule, alpha, reward.method) still load, with a
deprecation message naming the new key.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from fdc_mol.fdc.adjoint_matching import AMConfig
from fdc_mol.rewards.components import ComponentConfig
from flowmol_ext.config import StrictModel
from flowmol_ext.model.sampler import SamplerConfig

__all__ = ["BarrierConfig", "UtilityConfig", "RewardConfig", "EvaluationConfig", "FinetuneConfig", "config_path",
           "CONFIG_DIR", "DEPRECATED_KEYS"]

log = logging.getLogger("fdc_mol.config")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

DEPRECATED_KEYS = {"method": "algorithm", "eta": "mirror_eta", "eta_schedule": "mirror_eta_schedule",
                   "alpha": "kl_weight"}
DEPRECATED_REWARD_KEYS = {"method": "level"}


def config_path(name_or_path: str | Path) -> Path:
    """A config file by path, or by name from the package's ``fdc_mol/configs`` (``fdc_demo_cpu`` or
    ``fdc_demo_cpu.yaml``). Raises FileNotFoundError listing the shipped names."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / p.name, CONFIG_DIR / f"{p.name}.yaml"):
        if str(name_or_path) == p.name and cand.is_file():
            return cand
    names = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"config {str(name_or_path)!r}: no such file, and not a shipped config name ({names})")


def _rename(data: dict[str, Any], table: dict[str, str], where: str) -> dict[str, Any]:
    out = dict(data)
    for old, new in table.items():
        if old in out:
            if new in out:
                raise ValueError(f"'{where}{old}' is the deprecated name of '{where}{new}'; give only '{where}{new}'")
            msg = f"config key '{where}{old}' is deprecated: use '{where}{new}'"
            warnings.warn(msg, DeprecationWarning, stacklevel=4)
            log.warning(msg)
            out[new] = out.pop(old)
    return out


class BarrierConfig(StrictModel):
    """Log-barrier constraint (:class:`fdc_mol.fdc.utilities.LogBarrier`): maximise ``objective`` of the reward
    (superquantile: SQ_β with utility.beta; expected: E[r]) + weight · log(slack), slack = bound − E[c] (sense
    le) or E[c] − bound (ge), with c the reward component named ``constraint`` (role constraint; its units)."""

    objective: Literal["superquantile", "expected"] = "superquantile"
    constraint: str = Field(description="name of a reward component with role 'constraint'")
    bound: float = Field(description="C, in the constraint component's units")
    sense: Literal["le", "ge"] = "le"
    weight: float = Field(1.0, gt=0.0, description="β of the barrier, in reward units")
    min_slack: float = Field(1e-3, gt=0.0, description="slack floor when the current model is infeasible")


class UtilityConfig(StrictModel):
    """The utility F of the reward distribution. ``beta`` is the quantile level (SQ: top 1−β; CVaR: worst β)."""

    kind: Literal["superquantile", "expected", "cvar", "mean_variance", "log_barrier"] = "superquantile"
    beta: float = Field(0.998, gt=0.0, lt=1.0)
    barrier: BarrierConfig | None = Field(None, description="kind log_barrier: the constrained objective")

    @model_validator(mode="after")
    def _check_barrier(self) -> UtilityConfig:
        if self.kind == "log_barrier" and self.barrier is None:
            raise ValueError("utility.kind log_barrier needs utility.barrier {objective, constraint, bound, ...}")
        if self.kind != "log_barrier" and self.barrier is not None:
            raise ValueError(f"utility.barrier applies to kind log_barrier only (kind is {self.kind})")
        return self


class RewardConfig(StrictModel):
    """The reward r (Hartree) of each molecule.

    kind: ``energy`` r = −E (the paper's, GFN1-xTB); ``composition_corrected`` r = −(E − Σ_el n_el ε_el) with
    per-element reference energies ε_el fitted on QM9 (:mod:`fdc_mol.rewards.composition`), so that the
    reward measures geometry and bonding rather than the element counts (−E is 99.85 % composition).
    grad_clip_per_atom: clip each atom's ∇r to this norm (Eh/Å) before the utility (null = off).
    train_min_distance_scale: the reward gate during fine-tuning rejects atom pairs closer than this
    fraction of the sum of their covalent radii (bond-aware clash gate; null = the strict evaluation gate,
    0.9 Å for every pair); train_require_connected / train_allow_radicals relax the training gate further
    (xTB scores fragments and open shells). Evaluation always uses the strict gate.
    """

    level: Literal["gfn1", "gfn2", "mmff94"] = "gfn1"
    engine: Literal["tblite", "xtb", "rdkit"] | None = None
    kind: Literal["energy", "composition_corrected"] = "energy"
    executor: str = "local:2"
    timeout_s: float = Field(30.0, gt=0)
    cache_dir: str | None = None
    grad_clip_per_atom: float | None = Field(None, gt=0)
    train_min_distance_scale: float | None = Field(None, gt=0, lt=1.5)
    train_require_connected: bool = Field(True, description="training gate: reject disconnected molecules")
    train_allow_radicals: bool = Field(False, description="training gate: score open shells (UHF) too")
    components: list[ComponentConfig] | None = Field(
        None, description="composable reward components (fdc_mol.rewards.components); replaces kind")
    aggregate: Literal["sum", "product"] = Field("sum", description="how objective components combine")

    @model_validator(mode="after")
    def _check_components(self) -> RewardConfig:
        # (the resolved config.yaml of a run holds every key with its default, so only non-defaults are errors)
        if self.components is None:
            if self.aggregate != "sum":
                raise ValueError(f"reward.aggregate {self.aggregate} applies only with reward.components")
            return self
        if self.kind != "energy":
            raise ValueError(f"reward.kind {self.kind} does not apply with reward.components: give each component a "
                             "kind (e.g. composition_corrected_energy)")
        names = [c.label for c in self.components]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate component name(s) {dup}: set 'name' on each")
        if not any(c.role == "objective" for c in self.components):
            raise ValueError("at least one component needs role 'objective' (the reward that is optimised)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _deprecated(cls, data: Any) -> Any:
        return _rename(data, DEPRECATED_REWARD_KEYS, "reward.") if isinstance(data, dict) else data


class EvaluationConfig(StrictModel):
    """How each iteration is evaluated: common random numbers (the same sizes, initial noise and CTMC draws
    for every iteration and every run with the same seed), the first sampler is the primary one (its
    samples also fit the utility), the others are reported beside it with a prefix (``sde_...``)."""

    samplers: list[Literal["ode", "sde"]] = Field(default_factory=lambda: ["ode", "sde"], min_length=1)
    n_boot: int = Field(1000, ge=10, description="bootstrap resamples for the 95 % intervals")
    n_molecules: int | None = Field(
        None, ge=8, description="molecules per evaluation (and per fixed-graph comparison); null = n_fit. "
        "Larger than n_fit narrows the intervals without making the utility's fit more expensive")


class FinetuneConfig(StrictModel):
    """``fdc-mol finetune``: FDC (or the plain adjoint-matching baseline) on a pretrained FlowMol model.

    algorithm fdc: K outer iterations; each fits the utility's first variation on ``n_fit`` samples of the
    current model (the evaluation samples of the previous iteration), then runs ``am_steps_per_iteration`` AM
    steps with terminal gradient ∇g_k/η_k. algorithm am: one stage of ``am_steps_per_iteration`` steps toward
    the expected reward with KL weight α (reward multiplier 1/α), the paper's baseline; set K = 1.
    """

    run_dir: str = "runs/fdc_novelty_energy"
    seed: int = 0
    model: str = "qm9_small"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = Field(False, description="run the network under torch.compile (inductor, dynamic shapes): "
                          "faster AM steps and evaluations after a one-off compilation of minutes (cached on disk)")
    algorithm: Literal["fdc", "am"] = "fdc"
    K: int = Field(10, ge=1, description="outer iterations")
    am_steps_per_iteration: int = Field(2, ge=1)
    lr: float = Field(1e-4, gt=0)
    mirror_eta: float = Field(0.01, gt=0, description="FDC mirror-descent step η_k (reward scale 1/η)")
    mirror_eta_schedule: Literal["constant", "harmonic"] = "constant"
    kl_weight: float = Field(0.0, ge=0, description="α of G = F − α KL; for algorithm am the reward multiplier is 1/α")
    utility: UtilityConfig = Field(default_factory=UtilityConfig)
    novelty_kde_weight: float = Field(0.0, ge=0, description="weight w of the KDE novelty term w·(−E log p̂)")
    novelty_kde_components: int | None = Field(
        4, ge=1, description="whitened principal components of the conformer descriptor the novelty KDE (and the "
        "kde_logp_pre metrics) run on; null = the full 240-d descriptor (nearest-neighbour dominated)")
    n_fit: int = Field(5000, ge=8, description="samples per iteration for the utility's fit (and the "
                       "evaluation, unless evaluation.n_molecules is set)")
    sample_steps: int = Field(100, ge=2, description="integration steps of the evaluation/fit samples")
    n_atoms: int | None = Field(None, ge=2, description="fixed molecule size; default: the training histogram")
    trainable: Literal["all", "positions"] = Field(
        "positions", description="positions = only the position updaters ([FE] App. G.5.1); all = every parameter")
    am: AMConfig = Field(default_factory=lambda: AMConfig(n_traj=64, steps=40, lct=None, grad_clip_norm=1.0))
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    fit_sampler: Literal["am", "evaluation"] = Field(
        "am", description="samples that fit the utility (quantiles): 'am' = n_fit fresh trajectories of the "
        "process AM fine-tunes (memoryless SDE, am.steps, training gate), so the tail threshold is that of the "
        "terminal states AM sees; 'evaluation' = the primary evaluation sample of the previous iteration")
    data_dir: str | None = Field("data/qm9", description="processed QM9 for novelty (skipped when absent)")
    write_sdf: bool = True

    @model_validator(mode="before")
    @classmethod
    def _deprecated(cls, data: Any) -> Any:
        return _rename(data, DEPRECATED_KEYS, "") if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.algorithm == "am":
            if self.kl_weight <= 0:
                raise ValueError("algorithm 'am' needs kl_weight > 0 (the reward multiplier is 1/kl_weight)")
            if self.K != 1:
                raise ValueError("algorithm 'am' is a single stage: set K: 1 (give the budget in "
                                 "am_steps_per_iteration)")
        b = self.utility.barrier
        if b is not None:
            roles = {c.label: c.role for c in self.reward.components or []}
            if roles.get(b.constraint) != "constraint":
                raise ValueError(f"utility.barrier.constraint '{b.constraint}' must name a reward component with "
                                 f"role 'constraint' (components: {roles or 'none'})")
            if self.algorithm != "fdc":
                raise ValueError("utility.kind log_barrier needs algorithm fdc")
        if self.algorithm == "fdc" and self.kl_weight > 0:
            raise ValueError("kl_weight > 0 (KL regularisation) is not implemented for FDC on molecules: the "
                             "FlowMol score at t = 1 − ε needs the discrete states; use kl_weight: 0")
        return self

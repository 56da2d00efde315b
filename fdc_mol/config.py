"""Typed configs of the application (strict: unknown keys are rejected with the key named)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fdc_mol.fdc.adjoint_matching import AMConfig
from flowmol_ext.config import StrictModel


class UtilityConfig(StrictModel):
    """The utility F of the reward distribution. ``beta`` is the quantile level (SQ: top 1−β; CVaR: worst β)."""

    kind: Literal["superquantile", "expected", "cvar", "mean_variance"] = "superquantile"
    beta: float = Field(0.998, gt=0.0, lt=1.0)


class EnergyRewardConfig(StrictModel):
    """The reward r = −E (Hartree) from the reward layer; GFN1-xTB via tblite as in the paper."""

    method: Literal["gfn1", "gfn2", "mmff94"] = "gfn1"
    engine: Literal["tblite", "xtb", "rdkit"] | None = None
    executor: str = "local:2"
    timeout_s: float = Field(30.0, gt=0)
    cache_dir: str | None = None


class MolSamplerConfig(StrictModel):
    """CTMC settings of the molecular sampler (positions always use the memoryless SDE here)."""

    stochasticity: float = Field(30.0, ge=0)
    temperature: float = Field(0.05, gt=0)
    hc_thresh: float = Field(0.9, ge=0, le=1)


class FinetuneConfig(StrictModel):
    """``fdc-mol finetune``: FDC (or the plain adjoint-matching baseline) on a pretrained FlowMol model.

    method fdc: K outer iterations; each fits the utility's first variation on ``n_fit`` fresh samples of
    the current model, then runs ``am_steps_per_iteration`` AM steps with terminal gradient ∇g_k/η_k.
    method am: one stage of ``am_steps_per_iteration`` steps toward the expected reward with KL weight α
    (reward multiplier λ = 1/α), the paper's baseline. Set K = 1 for AM.
    """

    run_dir: str = "runs/fdc_novelty_energy"
    seed: int = 0
    model: str = "qm9_small"
    device: str = "auto"
    method: Literal["fdc", "am"] = "fdc"
    K: int = Field(10, ge=1, description="outer iterations")
    am_steps_per_iteration: int = Field(2, ge=1)
    lr: float = Field(1e-4, gt=0)
    eta: float = Field(0.01, gt=0, description="FDC mirror-descent step η_k (reward scale 1/η)")
    eta_schedule: Literal["constant", "harmonic"] = "constant"
    alpha: float = Field(0.0, ge=0, description="KL weight; for method am the reward multiplier is 1/alpha")
    utility: UtilityConfig = Field(default_factory=UtilityConfig)
    novelty_kde_weight: float = Field(0.0, ge=0, description="weight of the KDE novelty term (−log p̂); 0 = paper")
    n_fit: int = Field(5000, ge=8, description="samples per outer iteration to estimate quantiles and metrics")
    sample_steps: int = Field(40, ge=2, description="integration steps of the fit/evaluation samples")
    n_atoms: int | None = Field(None, ge=2, description="fixed molecule size; default: the training histogram")
    trainable: Literal["all", "positions"] = Field(
        "positions", description="positions = only the position updaters ([FE] App. G.5.1); all = every parameter")
    am: AMConfig = Field(default_factory=lambda: AMConfig(n_traj=64, steps=40, lct=None, grad_clip_norm=1.0))
    sampler: MolSamplerConfig = Field(default_factory=MolSamplerConfig)
    reward: EnergyRewardConfig = Field(default_factory=EnergyRewardConfig)
    data_dir: str | None = Field("data/qm9", description="processed QM9 for novelty (skipped when absent)")
    write_sdf: bool = True

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.method == "am":
            if self.alpha <= 0:
                raise ValueError("method 'am' needs alpha > 0 (the reward multiplier is 1/alpha)")
            if self.K != 1:
                raise ValueError("method 'am' is a single stage: set K: 1 (give the budget in am_steps_per_iteration)")
        if self.method == "fdc" and self.alpha > 0:
            raise ValueError("alpha > 0 (KL regularisation) is not implemented for FDC on molecules; use alpha: 0")
        return self

"""Flow Density Control, generic: the FlowModel protocol, adjoint matching (one step function), utilities,
divergences, densities and the one outer loop. Imports nothing molecular (no RDKit, no FlowMol)."""

from .adjoint_matching import (
    AMConfig,
    AMStepOutput,
    am_loss,
    am_loss_for_trajectory,
    am_step,
    am_step_loss,
    lean_adjoint,
    timestep_subset,
)
from .density import KDE
from .divergences import KL, Objective, Renyi, Wasserstein1
from .flow import EuclideanFlow, FlowModel, LinearSchedule, Trajectory, log_likelihood
from .loop import AdamAMSolver, InnerSolver, Stage, StageStore, constant_eta, harmonic_eta, run_fdc, run_outer_loop
from .utilities import (
    ADesign,
    CVaR,
    ExpectedReward,
    FitContext,
    Fitted,
    KDEEntropy,
    LogDetDesign,
    MeanVariance,
    ScoreEntropy,
    SuperQuantile,
)

__all__ = [
    "AMConfig",
    "am_loss",
    "am_loss_for_trajectory",
    "am_step",
    "am_step_loss",
    "AMStepOutput",
    "lean_adjoint",
    "timestep_subset",
    "KDE",
    "KL",
    "Objective",
    "Renyi",
    "Wasserstein1",
    "FlowModel",
    "LinearSchedule",
    "EuclideanFlow",
    "Trajectory",
    "log_likelihood",
    "constant_eta",
    "harmonic_eta",
    "run_fdc",
    "run_outer_loop",
    "AdamAMSolver",
    "InnerSolver",
    "Stage",
    "StageStore",
    "ADesign",
    "CVaR",
    "ExpectedReward",
    "FitContext",
    "Fitted",
    "KDEEntropy",
    "LogDetDesign",
    "MeanVariance",
    "ScoreEntropy",
    "SuperQuantile",
]

"""Flow Density Control: the FlowModel protocol, adjoint matching, utilities, divergences, the outer loop."""

from .adjoint_matching import AMConfig, am_loss, am_loss_for_trajectory, am_step, lean_adjoint, timestep_subset
from .density import KDE
from .divergences import KL, Objective, Renyi, Wasserstein1
from .flow import FlowModel, LinearSchedule, TensorFlow, Trajectory, log_likelihood
from .loop import constant_eta, harmonic_eta, run_fdc
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
    "lean_adjoint",
    "timestep_subset",
    "KDE",
    "KL",
    "Objective",
    "Renyi",
    "Wasserstein1",
    "FlowModel",
    "LinearSchedule",
    "TensorFlow",
    "Trajectory",
    "log_likelihood",
    "constant_eta",
    "harmonic_eta",
    "run_fdc",
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

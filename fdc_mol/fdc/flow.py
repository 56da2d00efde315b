"""The flow-model protocol that adjoint matching and FDC need, its schedule, and a generic tensor flow.

Time convention (DESIGN.md, [AM] §2): t = 0 is the prior (noise), t = 1 is data;
x_t = (1 − α_t) x_0 + α_t x_1 with β_t = 1 − α_t.

Derived quantities ([AM] §2, fdc.md §4.1):
  κ_t = α'_t / α_t,   η_t = β_t (κ_t β_t − β'_t) = α'_t (1 − α_t) / α_t,   σ_t = √(2 η_t)  (memoryless).
All three are singular at t = 0 (α_0 = 0); the *safe* versions replace α_t by α_t + h (h the step
size), as the memoryless FlowMol sampler does, so σ(0) = √(2 α'_0 / h) stays finite.

Memoryless SDE (Euler–Maruyama on a uniform grid of T + 1 points):
  x_{t+h} = x_t + h (2 v(x_t, t) − κ_t x_t) + √h σ_t ε.
Score ([AM] Eq. 8): s(x, t) = (v − κ_t x) / η_t.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = [
    "Schedule",
    "LinearSchedule",
    "Trajectory",
    "FlowModel",
    "EuclideanFlow",
    "per_sample_sqnorm",
    "log_likelihood",
]


class Schedule(Protocol):
    """Interpolation schedule α_t (β_t = 1 − α_t) with its derived memoryless quantities."""

    def alpha(self, t: Tensor) -> Tensor: ...

    def alpha_prime(self, t: Tensor) -> Tensor: ...

    def kappa(self, t: Tensor, h: float = 0.0) -> Tensor: ...

    def eta(self, t: Tensor, h: float = 0.0) -> Tensor: ...

    def sigma(self, t: Tensor, h: float = 0.0) -> Tensor: ...


class _ScheduleBase:
    """Derived quantities of any schedule with β = 1 − α; ``h`` > 0 gives the safe (α + h) versions."""

    def alpha(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def alpha_prime(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def kappa(self, t: Tensor, h: float = 0.0) -> Tensor:
        """κ_t = α'_t / (α_t + h)."""
        t = torch.as_tensor(t, dtype=torch.get_default_dtype())
        return self.alpha_prime(t) / (self.alpha(t) + h)

    def eta(self, t: Tensor, h: float = 0.0) -> Tensor:
        """η_t = β_t(κ_t β_t − β'_t) = α'_t (1 − α_t) / (α_t + h) for β = 1 − α."""
        t = torch.as_tensor(t, dtype=torch.get_default_dtype())
        a = self.alpha(t)
        return self.alpha_prime(t) * (1.0 - a) / (a + h)

    def sigma(self, t: Tensor, h: float = 0.0) -> Tensor:
        """Memoryless diffusion coefficient σ_t = √(2 η_t) (safe with h > 0; 0 at t = 1)."""
        return torch.sqrt(2.0 * self.eta(t, h).clamp_min(0.0))


class LinearSchedule(_ScheduleBase):
    """α_t = t, β_t = 1 − t (rectified flow / FlowMol positions); η_t = (1 − t)/t, σ_t = √(2(1 − t)/t)."""

    def alpha(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t, dtype=torch.get_default_dtype())

    def alpha_prime(self, t: Tensor) -> Tensor:
        return torch.ones_like(torch.as_tensor(t, dtype=torch.get_default_dtype()))


@dataclass
class Trajectory:
    """A batch of sampled paths on a uniform time grid.

    times: (T+1,) grid from 0 to 1. xs: (T+1, N, ...) continuous states (N rows; for molecules N atoms
    of all molecules, grouped by ``group``) or None when not recorded. discrete: opaque per-step payload
    (e.g. atom types/bonds at each step) or None. x1: (N, ...) final continuous state. context: opaque
    (e.g. graph/batch indices). n: number of samples (molecules). group: (N,) long sample index of each
    row, or None when each row is one sample. sigmas: (T+1,) the σ_t used to sample (memoryless) or None.
    """

    times: Tensor
    xs: Tensor | None
    x1: Tensor
    n: int
    discrete: Any = None
    context: Any = None
    group: Tensor | None = None
    sigmas: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        """Number of integration steps T."""
        return int(self.times.numel()) - 1


@runtime_checkable
class FlowModel(Protocol):
    """What adjoint matching needs from a flow: sampling, the drift, its schedule, and its parameters."""

    schedule: Schedule

    def sample(
        self, n: int, steps: int, *, memoryless: bool, record: bool, generator: torch.Generator | None = None
    ) -> Trajectory: ...

    def velocity(self, x: Tensor, t: float | Tensor, step_index: int, traj: Trajectory | None) -> Tensor: ...

    def project(self, v: Tensor, traj: Trajectory | None) -> Tensor: ...

    def score(self, x: Tensor, t: float, traj: Trajectory | None = None) -> Tensor: ...

    # Optional: ``select(traj, keep) -> Trajectory``, the sub-trajectory of the samples where ``keep`` (n,) bool
    # is True, for flows whose velocity treats samples independently. :func:`lean_adjoint` uses it to skip the
    # vector–Jacobian products of samples without reward signal.

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def copy_frozen(self) -> FlowModel: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def per_sample_sqnorm(v: Tensor, traj: Trajectory) -> Tensor:
    """Squared norm of each sample's rows: (N, ...) -> (n,), summing rows of one molecule via traj.group."""
    sq = v.reshape(v.shape[0], -1).pow(2).sum(-1)
    if traj.group is None:
        return sq
    out = torch.zeros(traj.n, dtype=sq.dtype, device=sq.device)
    return out.index_add(0, traj.group, sq)


class EuclideanFlow(nn.Module):
    """A flow over plain vectors in R^d (n, d) whose velocity is ``net(x, t)``; samples are rows.

    net: module mapping x (n, d) and t (n, 1) to v (n, d). prior: standard normal N(0, I_d).
    Used by the 2-D illustrative settings and the tests; ``project`` is the identity.
    """

    def __init__(self, net: nn.Module, dim: int, schedule: Schedule | None = None) -> None:
        super().__init__()
        self.net = net
        self.dim = int(dim)
        self.schedule = schedule if schedule is not None else LinearSchedule()

    def velocity(self, x: Tensor, t: float | Tensor, step_index: int = -1, traj: Trajectory | None = None) -> Tensor:
        """Drift v(x, t): x (n, d), t scalar or (n,) -> (n, d); differentiable in x and the parameters."""
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if tt.ndim == 0:
            tt = tt.expand(x.shape[0])
        return self.net(x, tt.reshape(-1, 1))

    def project(self, v: Tensor, traj: Trajectory | None = None) -> Tensor:
        return v

    def select(self, traj: Trajectory, keep: Tensor) -> Trajectory:
        """The samples (rows) of ``traj`` where ``keep`` (n,) bool is True; the net treats rows independently."""
        keep = keep.to(torch.bool)
        if keep.shape != (traj.n,):
            raise ValueError(f"keep must have shape ({traj.n},), got {tuple(keep.shape)}")
        return Trajectory(times=traj.times, xs=None if traj.xs is None else traj.xs[:, keep], x1=traj.x1[keep],
                          n=int(keep.sum()), sigmas=traj.sigmas)

    def score(self, x: Tensor, t: float, traj: Trajectory | None = None) -> Tensor:
        """s(x, t) = (v − κ_t x)/η_t ([AM] Eq. 8); use t = 1 − ε (diverges at t = 1)."""
        if not 0.0 < float(t) < 1.0:
            raise ValueError(f"score needs 0 < t < 1, got t={t}")
        tt = torch.tensor(float(t))
        return (self.velocity(x, float(t)) - self.schedule.kappa(tt) * x) / self.schedule.eta(tt)

    def copy_frozen(self) -> EuclideanFlow:
        """Deep copy with gradients off, in eval mode (the base model of one AM stage)."""
        other = copy.deepcopy(self)
        for p in other.parameters():
            p.requires_grad_(False)
        return other.eval()

    @torch.no_grad()
    def sample(
        self,
        n: int,
        steps: int,
        *,
        memoryless: bool = True,
        record: bool = True,
        generator: torch.Generator | None = None,
        x0: Tensor | None = None,
    ) -> Trajectory:
        """Sample n paths with T = ``steps`` Euler(-Maruyama) steps: ODE, or memoryless SDE (safe σ, α + h)."""
        if n < 1 or steps < 1:
            raise ValueError(f"sample needs n >= 1 and steps >= 1, got n={n}, steps={steps}")
        h = 1.0 / steps
        times = torch.linspace(0.0, 1.0, steps + 1)
        x = torch.randn(n, self.dim, generator=generator) if x0 is None else x0.clone()
        xs = [x] if record else None
        sigmas = self.schedule.sigma(times, h) if memoryless else torch.zeros(steps + 1)
        for k in range(steps):
            t = times[k]
            v = self.velocity(x, t, k, None)
            if memoryless:
                drift = 2.0 * v - self.schedule.kappa(t, h) * x
                noise = torch.randn(x.shape, generator=generator)
                x = x + h * drift + math.sqrt(h) * sigmas[k] * self.project(noise, None)
            else:
                x = x + h * v
            if record:
                xs.append(x)
        return Trajectory(
            times=times,
            xs=torch.stack(xs) if record else None,
            x1=x,
            n=n,
            sigmas=sigmas if memoryless else None,
        )


def log_likelihood(
    velocity: Callable[[Tensor, float], Tensor],
    x1: Tensor,
    *,
    steps: int = 200,
    t1: float = 1.0 - 1e-3,
    exact_divergence: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """log p_1(x1) of a flow by the instantaneous change of variables (likelihood ODE), x1 (n, d) -> (n,).

    Integrates backward from t1 to 0 (Euler): d/dt log p_t(x_t) = −div v(x_t, t), prior N(0, I).
    Exact divergence by autograd for small d; Hutchinson (Rademacher) otherwise. Units: nats.
    """
    n, d = x1.shape
    h = t1 / steps
    x = x1.detach().clone()
    div_int = torch.zeros(n, dtype=x.dtype)
    for k in range(steps, 0, -1):
        t = k * h
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            v = velocity(xr, t)
            if exact_divergence:
                div = torch.zeros(n, dtype=x.dtype)
                for j in range(d):
                    div = div + torch.autograd.grad(v[:, j].sum(), xr, retain_graph=j < d - 1)[0][:, j]
            else:
                e = torch.randint(0, 2, x.shape, generator=generator).to(x.dtype) * 2 - 1
                div = (torch.autograd.grad((v * e).sum(), xr)[0] * e).sum(-1)
        div_int = div_int + h * div.detach()
        x = (x - h * v.detach()).detach()
    log_p0 = -0.5 * (x.pow(2).sum(-1) + d * math.log(2 * math.pi))
    return log_p0 - div_int


def __getattr__(name: str) -> Any:
    if name == "TensorFlow":  # the old, misleading name (it has nothing to do with the TensorFlow library)
        import warnings

        warnings.warn("fdc_mol.fdc.flow.TensorFlow was renamed EuclideanFlow", DeprecationWarning, stacklevel=2)
        return EuclideanFlow
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

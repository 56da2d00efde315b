"""Utilities F(p) with their first variations δF and gradient fields ∇ₓδF (fdc.md §3, [FDC] Table 2).

Each utility is *fitted* once per outer iteration on a large sample of p_{k−1} (quantiles, means,
second-moment matrices, densities) and returns a :class:`Fitted` object whose ``grad(x, traj)`` is the
gradient field ∇ₓδF(p_{k−1})(x) at arbitrary x (a closure over q̂_β etc.), as the terminal gradient of
adjoint matching needs. Rewards that are NaN (failed molecules) are excluded from quantiles and means
and get zero gradient.

Factors (fdc.md §3 ambiguities): CVaR_β uses 1/β, SQ_β uses 1/(1−β). For discrete distributions
(points with rewards r_i and weights w_i) every reward utility also gives ``value(r, w)`` and
``first_variation(r, w)``, so that d/dε F(w + ε u) = Σ_i u_i δF_i for zero-sum u (checked in the tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from .density import KDE
from .flow import FlowModel, Trajectory

__all__ = [
    "RewardOracle",
    "FitContext",
    "Fitted",
    "Utility",
    "ExpectedReward",
    "CVaR",
    "SuperQuantile",
    "MeanVariance",
    "ScoreEntropy",
    "KDEEntropy",
    "LogDetDesign",
    "ADesign",
    "LogBarrier",
    "OracleOutput",
    "weighted_quantile",
]

# reward(x, traj) -> (values (n,), gradients like x); NaN values for failures.
RewardOracle = Callable[[Tensor, "Trajectory | None"], tuple[Tensor, Tensor]]


@dataclass
class FitContext:
    """What a functional may use when fitted at p_{k−1}.

    x: (n, ...) samples of the current model p_{k−1} (final states); traj: their trajectory or None;
    model: the current base π_{k−1}; pre: the frozen pre-trained π_pre; reward: the reward oracle;
    sample_current / sample_pre: callables n -> fresh samples (n, ...) of p_{k−1} / p_pre;
    rewards: (n,) the rewards of ``x`` when already computed (e.g. by the evaluation of iteration k − 1),
    so reward utilities do not score the same samples twice (NaN for failures); columns: further per-sample
    values (n,) of ``x`` by name (e.g. a constraint for :class:`LogBarrier`), NaN for failures.
    """

    x: Tensor
    traj: Trajectory | None = None
    model: FlowModel | None = None
    pre: FlowModel | None = None
    reward: RewardOracle | None = None
    sample_current: Callable[[int], Tensor] | None = None
    sample_pre: Callable[[int], Tensor] | None = None
    rewards: Tensor | None = None
    columns: dict[str, Tensor] | None = None


class OracleOutput(tuple):
    """What a reward oracle may return instead of a plain ``(values, grads)`` pair: the same pair (it unpacks
    as one), plus ``columns`` {name: (values (n,), grads like x)} of further per-sample quantities (e.g. the
    constraint of :class:`LogBarrier`)."""

    columns: dict[str, tuple[Tensor, Tensor]]

    def __new__(cls, values: Tensor, grads: Tensor,
                columns: dict[str, tuple[Tensor, Tensor]] | None = None) -> OracleOutput:
        out = super().__new__(cls, (values, grads))
        out.columns = dict(columns or {})
        return out


@dataclass
class Fitted:
    """A first variation fitted at p_{k−1}: value F(p_{k−1}) and the field ∇ₓδF(x) (like x).

    grad_scale: the typical multiplier of ∇r inside the field (1/β for CVaR), used to scale AM's loss clip.
    """

    value: float
    grad_fn: Callable[[Tensor, Trajectory | None], Tensor]
    grad_scale: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)

    def grad(self, x: Tensor, traj: Trajectory | None = None) -> Tensor:
        return self.grad_fn(x, traj)


class Utility(Protocol):
    """A functional of the terminal marginal: ``fit(ctx) -> Fitted``."""

    name: str

    def fit(self, ctx: FitContext) -> Fitted: ...


def weighted_quantile(r: Tensor, beta: float, w: Tensor | None = None) -> Tensor:
    """Lower β-quantile of a discrete distribution: the smallest r_i whose cumulative weight reaches β."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {beta}")
    if w is None:
        w = torch.full_like(r, 1.0 / r.numel())
    order = torch.argsort(r)
    cw = torch.cumsum(w[order], 0) / w.sum()
    i = int(torch.searchsorted(cw, torch.tensor(beta, dtype=cw.dtype) - 1e-12).clamp(max=r.numel() - 1))
    return r[order][i]


def _expand(coef: Tensor, grads: Tensor, traj: Trajectory | None) -> Tensor:
    """Per-sample coefficients (n,) times reward gradients (N, ...); rows grouped by traj.group if N != n."""
    if grads.shape[0] != coef.shape[0]:
        if traj is None or traj.group is None:
            raise ValueError(f"{coef.shape[0]} rewards but {grads.shape[0]} gradient rows and no traj.group")
        coef = coef[traj.group]
    return coef.reshape(-1, *([1] * (grads.ndim - 1))) * grads


class _RewardUtility:
    """Utilities of the reward distribution: δF depends on x only through r(x) (and fitted statistics)."""

    name = "reward"
    grad_scale = 1.0

    def value(self, r: Tensor, w: Tensor | None = None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def stats(self, r: Tensor, w: Tensor | None = None) -> dict[str, float]:
        return {}

    def first_variation(self, r: Tensor, w: Tensor | None = None) -> Tensor:
        """δF at each point for the discrete distribution (r, w) (defined up to a constant)."""
        return self._delta(r, self.stats(r, w))

    def _delta(self, r: Tensor, st: dict[str, float]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _coef(self, r: Tensor, st: dict[str, float]) -> Tensor:
        """d δF / d r at each reward value (the factor in front of ∇r)."""
        raise NotImplementedError  # pragma: no cover

    def first_variation_grad(
        self, x: Tensor, rewards: Tensor, reward_grads: Tensor, st: dict[str, float], traj: Trajectory | None = None
    ) -> Tensor:
        """∇ₓδF = coef(r)·∇r, NaN rewards giving 0. x (n, ...), rewards (n,), reward_grads like x."""
        ok = torch.isfinite(rewards)
        coef = torch.where(ok, self._coef(torch.nan_to_num(rewards), st), torch.zeros_like(rewards))
        return torch.nan_to_num(_expand(coef, reward_grads, traj))

    def fit(self, ctx: FitContext) -> Fitted:
        if ctx.reward is None:
            raise ValueError(f"utility {self.name} needs a reward oracle in the fit context")
        if ctx.rewards is not None:
            r = torch.as_tensor(ctx.rewards)
        else:
            with torch.no_grad():
                r, _ = ctx.reward(ctx.x, ctx.traj)
        ok = torch.isfinite(r)
        if int(ok.sum()) < 2:
            raise ValueError(f"utility {self.name}: fewer than 2 finite rewards among {r.numel()} samples")
        rf = r[ok].detach()
        st = self.stats(rf)
        reward = ctx.reward

        def grad_fn(x: Tensor, traj: Trajectory | None) -> Tensor:
            rx, gx = reward(x, traj)
            return self.first_variation_grad(x, rx, gx, st, traj)

        info = {**st, "nan_rate": float(1 - ok.float().mean()), "mean_reward": float(rf.mean())}
        return Fitted(value=float(self.value(rf)), grad_fn=grad_fn, grad_scale=self.grad_scale, info=info)


class ExpectedReward(_RewardUtility):
    """F = E[r]; δF = r; ∇δF = ∇r."""

    name = "expected_reward"

    def value(self, r: Tensor, w: Tensor | None = None) -> Tensor:
        w = torch.full_like(r, 1.0 / r.numel()) if w is None else w / w.sum()
        return (w * r).sum()

    def _delta(self, r: Tensor, st: dict[str, float]) -> Tensor:
        return r

    def _coef(self, r: Tensor, st: dict[str, float]) -> Tensor:
        return torch.ones_like(r)


class CVaR(_RewardUtility):
    """Risk-averse CVaR_β = E[r | r ≤ q_β] = max_ζ ζ + (1/β) E[min(r − ζ, 0)] (the worst β-fraction).

    δF = (1/β) min(r − q_β, 0); ∇δF = (1/β) 1{r ≤ q_β} ∇r. β in (0, 1) (paper β = 0.01: worst 1 %).
    """

    name = "cvar"

    def __init__(self, beta: float) -> None:
        if not 0.0 < beta < 1.0:
            raise ValueError(f"CVaR beta must be in (0, 1), got {beta}")
        self.beta = float(beta)
        self.grad_scale = 1.0 / self.beta

    def stats(self, r: Tensor, w: Tensor | None = None) -> dict[str, float]:
        return {"q": float(weighted_quantile(r, self.beta, w))}

    def value(self, r: Tensor, w: Tensor | None = None) -> Tensor:
        w = torch.full_like(r, 1.0 / r.numel()) if w is None else w / w.sum()
        q = weighted_quantile(r, self.beta, w)
        return q + (w * torch.clamp(r - q, max=0.0)).sum() / self.beta

    def _delta(self, r: Tensor, st: dict[str, float]) -> Tensor:
        return torch.clamp(r - st["q"], max=0.0) / self.beta

    def _coef(self, r: Tensor, st: dict[str, float]) -> Tensor:
        return (r <= st["q"]).to(r.dtype) / self.beta


class SuperQuantile(_RewardUtility):
    """Novelty-seeking SQ_β = E[r | r ≥ q_β] = min_ζ ζ + (1/(1−β)) E[(r − ζ)₊] (the top (1−β)-fraction).

    δF = (1/(1−β)) max(r − q_β, 0); ∇δF = (1/(1−β)) 1{r ≥ q_β} ∇r. Paper β = 0.99 (top 1 %).
    """

    name = "superquantile"

    def __init__(self, beta: float) -> None:
        if not 0.0 < beta < 1.0:
            raise ValueError(f"SuperQuantile beta must be in (0, 1), got {beta}")
        self.beta = float(beta)
        self.grad_scale = 1.0 / (1.0 - self.beta)

    def stats(self, r: Tensor, w: Tensor | None = None) -> dict[str, float]:
        return {"q": float(weighted_quantile(r, self.beta, w))}

    def value(self, r: Tensor, w: Tensor | None = None) -> Tensor:
        w = torch.full_like(r, 1.0 / r.numel()) if w is None else w / w.sum()
        q = weighted_quantile(r, self.beta, w)
        return q + (w * torch.clamp(r - q, min=0.0)).sum() / (1.0 - self.beta)

    def _delta(self, r: Tensor, st: dict[str, float]) -> Tensor:
        return torch.clamp(r - st["q"], min=0.0) / (1.0 - self.beta)

    def _coef(self, r: Tensor, st: dict[str, float]) -> Tensor:
        return (r >= st["q"]).to(r.dtype) / (1.0 - self.beta)


class MeanVariance(_RewardUtility):
    """F = E[r] − c·Var(r); δF = r − c(r² − 2E[r] r); ∇δF = (1 − 2c(r − E[r])) ∇r."""

    name = "mean_variance"

    def __init__(self, c: float = 1.0) -> None:
        if c < 0:
            raise ValueError(f"MeanVariance c must be >= 0, got {c}")
        self.c = float(c)

    def stats(self, r: Tensor, w: Tensor | None = None) -> dict[str, float]:
        w = torch.full_like(r, 1.0 / r.numel()) if w is None else w / w.sum()
        return {"mean": float((w * r).sum())}

    def value(self, r: Tensor, w: Tensor | None = None) -> Tensor:
        w = torch.full_like(r, 1.0 / r.numel()) if w is None else w / w.sum()
        m = (w * r).sum()
        return m - self.c * (w * (r - m) ** 2).sum()

    def _delta(self, r: Tensor, st: dict[str, float]) -> Tensor:
        return r - self.c * (r**2 - 2 * st["mean"] * r)

    def _coef(self, r: Tensor, st: dict[str, float]) -> Tensor:
        return 1.0 - 2.0 * self.c * (r - st["mean"])


class ScoreEntropy:
    """Differential entropy H = −E[log p]; δH = −1 − log p; ∇δH = −s_{k−1}(x, 1 − ε) from the flow's score.

    The value is estimated by a KDE (leave-one-out, identity features) on the fit sample (nats), since a
    score gives no density; set ``value_by_kde=False`` to skip it (NaN).

    Pitfall (issue 17, docs/toy_entropy.md): s = (v − κ_t x)/η_t divides the velocity by η_{1−ε} ≈ ε, so
    any error of the *fine-tuned* velocity near t = 1 is amplified by t/(1 − t) (199 at ε = 0.005), and
    adjoint matching barely constrains the score there (its loss weights score errors by σ_t² = 2η_t). A
    fine-tuned residual that is smooth in t (Δv(0.995) ≈ Δv(1 − 1/T)) then reports a score change ~10×
    too large (T = 20) plus noise, and −s_{k−1} can point toward high density. Parametrise the fine-tuned
    part so its score residual stays bounded (e.g. Δv = (1 − t)·net, fdc_mol.toy.flows) or check the
    current model's score against a closed form before trusting it.
    """

    name = "entropy_score"

    def __init__(self, eps: float = 0.005, value_by_kde: bool = True) -> None:
        if not 0.0 < eps < 1.0:
            raise ValueError(f"ScoreEntropy eps must be in (0, 1), got {eps}")
        self.eps = float(eps)
        self.value_by_kde = value_by_kde
        self.grad_scale = 1.0

    def fit(self, ctx: FitContext) -> Fitted:
        if ctx.model is None:
            raise ValueError("ScoreEntropy needs the current model in the fit context")
        model = ctx.model.copy_frozen()
        t = 1.0 - self.eps

        def grad_fn(x: Tensor, traj: Trajectory | None) -> Tensor:
            with torch.no_grad():
                return -model.score(x, t, traj)

        value = KDE().fit(ctx.x.reshape(ctx.x.shape[0], -1)).entropy() if self.value_by_kde else math.nan
        return Fitted(value=value, grad_fn=grad_fn, info={"entropy_kde": value})


class KDEEntropy:
    """Entropy with a KDE over a feature map: H ≈ −E log p̂, δH = −1 − log p̂, ∇δH = −∇ₓ log p̂ (autograd)."""

    name = "entropy_kde"

    def __init__(self, feature_map: Callable[[Tensor], Tensor] | None = None, bandwidth: str | float = "scott"):
        self.feature_map = feature_map
        self.bandwidth = bandwidth
        self.grad_scale = 1.0

    def fit(self, ctx: FitContext) -> Fitted:
        kde = KDE(self.feature_map, self.bandwidth).fit(ctx.x)

        def grad_fn(x: Tensor, traj: Trajectory | None) -> Tensor:
            return -kde.grad_log_prob(x)

        value = kde.entropy()
        return Fitted(value=value, grad_fn=grad_fn, info={"entropy_kde": value, "kde": kde})

    @staticmethod
    def discrete_value(p: Tensor) -> Tensor:
        """Shannon entropy −Σ p log p of a probability vector (nats)."""
        return -(p * p.log()).sum()

    @staticmethod
    def discrete_first_variation(p: Tensor) -> Tensor:
        """δH = −1 − log p."""
        return -1.0 - p.log()


class _Design:
    """Optimal experiment design on M = E[ΦΦᵀ] + λI (λ ≥ 0 regularises; [code] also uses +λI).

    phi: feature map x (n, ...) -> (n, D), differentiable; default the flattened x.
    """

    name = "design"

    def __init__(self, phi: Callable[[Tensor], Tensor] | None = None, reg: float = 0.1) -> None:
        if reg < 0:
            raise ValueError(f"design reg (lambda) must be >= 0, got {reg}")
        self.phi = phi
        self.reg = float(reg)
        self.grad_scale = 1.0

    def features(self, x: Tensor) -> Tensor:
        f = x if self.phi is None else self.phi(x)
        return f.reshape(f.shape[0], -1)

    def moment(self, f: Tensor, w: Tensor | None = None) -> Tensor:
        w = torch.full((f.shape[0],), 1.0 / f.shape[0], dtype=f.dtype) if w is None else w / w.sum()
        return (w[:, None, None] * f[:, :, None] * f[:, None, :]).sum(0) + self.reg * torch.eye(f.shape[1])

    def value_of(self, M: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def weight_matrix(self, M: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def value(self, x: Tensor, w: Tensor | None = None) -> Tensor:
        return self.value_of(self.moment(self.features(x), w))

    def first_variation(self, x: Tensor, w: Tensor | None = None) -> Tensor:
        """δF(x_i) = Φᵢᵀ W Φᵢ with W = M⁻¹ (D-design) or M⁻² (A-design), (n,)."""
        f = self.features(x)
        W = self.weight_matrix(self.moment(f, w))
        return torch.einsum("ni,ij,nj->n", f, W, f)

    def fit(self, ctx: FitContext) -> Fitted:
        with torch.no_grad():
            M = self.moment(self.features(ctx.x))
        W = self.weight_matrix(M)

        def grad_fn(x: Tensor, traj: Trajectory | None) -> Tensor:
            with torch.enable_grad():
                xr = x.detach().requires_grad_(True)
                f = self.features(xr)
                (g,) = torch.autograd.grad(torch.einsum("ni,ij,nj->n", f, W, f).sum(), xr)
            return g

        return Fitted(value=float(self.value_of(M)), grad_fn=grad_fn, info={})


class LogDetDesign(_Design):
    """D-optimal design F = log det M; δF = ΦᵀM⁻¹Φ; ∇δF = 2 J_Φᵀ M⁻¹ Φ."""

    name = "logdet_design"

    def value_of(self, M: Tensor) -> Tensor:
        return torch.logdet(M)

    def weight_matrix(self, M: Tensor) -> Tensor:
        return torch.linalg.inv(M)


class ADesign(_Design):
    """A-optimal design F = −Tr M⁻¹; δF = ΦᵀM⁻²Φ; ∇δF = 2 J_Φᵀ M⁻² Φ (what [code]'s "OED" computes)."""

    name = "a_design"

    def value_of(self, M: Tensor) -> Tensor:
        return -torch.trace(torch.linalg.inv(M))

    def weight_matrix(self, M: Tensor) -> Tensor:
        Mi = torch.linalg.inv(M)
        return Mi @ Mi


class LogBarrier:
    """A reward utility under a log-barrier constraint on the mean of a second per-sample quantity c(x).

    The paper ([FDC] Table 2) writes F = E[r] − β log(⟨p, c⟩ − C) with first variation r − β c/(⟨p, c⟩ − C).
    Read as a barrier for *maximisation* (the log term must go to −∞ at the boundary so that F keeps p inside
    the feasible set) it is, with m = ⟨p, c⟩ and slack s:

    - ``sense="le"`` (m ≤ C, e.g. mean energy ≤ C): s = C − m, F = U(p) + β log s,
      δF = δU − β c / s, ∇ₓδF = ∇ₓδU − (β / s) ∇c;
    - ``sense="ge"`` (m ≥ C): s = m − C, F = U(p) + β log s, δF = δU + β c / s, ∇ₓδF = ∇ₓδU + (β / s) ∇c;

    where U is a reward utility of r (:class:`ExpectedReward`, which gives the paper's E[r], or
    :class:`SuperQuantile` for "maximise the tail of r subject to the mean of c"). β > 0 in units of r; C and c
    in the constraint's units. When the fit sample is infeasible (s ≤ 0) the slack is floored at ``min_slack``
    (the gradient then pushes toward feasibility with weight β/min_slack) and ``info['feasible']`` is False.

    The reward oracle must return an :class:`OracleOutput` whose ``columns[constraint]`` holds (c, ∇c);
    samples with a NaN r or c are left out of the statistics and get zero gradient.
    """

    name = "log_barrier"

    def __init__(self, objective: _RewardUtility, constraint: str, bound: float, beta: float = 1.0,
                 sense: str = "le", min_slack: float = 1e-3) -> None:
        if sense not in ("le", "ge"):
            raise ValueError(f"LogBarrier sense must be 'le' or 'ge', got {sense!r}")
        if not beta > 0:
            raise ValueError(f"LogBarrier beta must be > 0, got {beta}")
        if not min_slack > 0:
            raise ValueError(f"LogBarrier min_slack must be > 0, got {min_slack}")
        self.objective = objective
        self.constraint = constraint
        self.bound = float(bound)
        self.beta = float(beta)
        self.sense = sense
        self.min_slack = float(min_slack)
        self.rho = -1.0 if sense == "le" else 1.0  # ds/dm
        self.grad_scale = objective.grad_scale

    def slack(self, m: float) -> float:
        """s = C − m (le) or m − C (ge), in the constraint's units."""
        return self.bound - m if self.sense == "le" else m - self.bound

    def value(self, r: Tensor, c: Tensor, w: Tensor | None = None) -> Tensor:
        """F of the discrete distribution with rewards r (n,), constraint values c (n,) and weights w (n,)."""
        wn = torch.full_like(r, 1.0 / r.numel()) if w is None else w / w.sum()
        m = (wn * c).sum()
        s = (self.bound - m) if self.sense == "le" else (m - self.bound)
        return self.objective.value(r, w) + self.beta * torch.log(s)

    def first_variation(self, r: Tensor, c: Tensor, w: Tensor | None = None) -> Tensor:
        """δF at each point (n,) (up to a constant): δU(r) + ρ β c / s with ρ = ds/dm."""
        wn = torch.full_like(r, 1.0 / r.numel()) if w is None else w / w.sum()
        s = self.slack(float((wn * c).sum()))
        return self.objective.first_variation(r, w) + self.rho * self.beta * c / s

    def fit(self, ctx: FitContext) -> Fitted:
        if ctx.reward is None:
            raise ValueError("utility log_barrier needs a reward oracle in the fit context")
        cols = ctx.columns or {}
        if ctx.rewards is not None and self.constraint in cols:
            r, c = torch.as_tensor(ctx.rewards), torch.as_tensor(cols[self.constraint])
        else:
            with torch.no_grad():
                out = ctx.reward(ctx.x, ctx.traj)
            r = out[0]
            got = getattr(out, "columns", {})
            if self.constraint not in got:
                raise ValueError(f"utility log_barrier: the reward has no constraint column '{self.constraint}' "
                                 f"(columns: {sorted(got) or 'none'}); give the component role 'constraint'")
            c = got[self.constraint][0]
        r, c = r.detach().to(torch.float64), c.detach().to(torch.float64).reshape(-1)
        ok = torch.isfinite(r) & torch.isfinite(c)
        if int(ok.sum()) < 2:
            raise ValueError(f"utility log_barrier: fewer than 2 samples with finite reward and constraint among "
                             f"{r.numel()}")
        rf, cf = r[ok], c[ok]
        st = self.objective.stats(rf)
        m = float(cf.mean())
        s = self.slack(m)
        feasible = s > 0
        s_eff = max(s, self.min_slack)
        coef_c = self.rho * self.beta / s_eff
        reward, objective, name = ctx.reward, self.objective, self.constraint

        def grad_fn(x: Tensor, traj: Trajectory | None) -> Tensor:
            out = reward(x, traj)
            rx, gx = out
            cols_x = getattr(out, "columns", {})
            if name not in cols_x:
                raise ValueError(f"utility log_barrier: the reward oracle returned no column '{name}'")
            cx, gcx = cols_x[name]
            g = objective.first_variation_grad(x, rx, gx, st, traj)
            okc = torch.isfinite(cx) & torch.isfinite(rx)
            coef = torch.where(okc, torch.full_like(cx, coef_c), torch.zeros_like(cx))
            return g + torch.nan_to_num(_expand(coef.to(gcx.dtype), gcx, traj))

        value = float(objective.value(rf)) + self.beta * math.log(s_eff)
        info = {**st, "constraint_mean": m, "slack": s, "feasible": feasible, "barrier_coef": coef_c,
                "nan_rate": float(1 - ok.float().mean()), "mean_reward": float(rf.mean())}
        return Fitted(value=value, grad_fn=grad_fn, grad_scale=self.grad_scale, info=info)

"""Divergences D(p ‖ p_pre) with first-variation gradient fields, and the objective G = F − α·D.

- KL: ∇δKL = s_p − s_pre, both flow scores at t = 1 − ε (never at t = 0, fdc.md §3 pitfall).
- Rényi D_β = (1/(β−1)) log ∫ p^β q^{1−β}; δD = (β/(β−1)) Z⁻¹ (p/q)^{β−1}, Z = ∫ p^β q^{1−β};
  ∇δD = (β/Z)(p/q)^{β−1}(s_p − s_q); densities from the flow's likelihood ODE or a KDE.
- Wasserstein-1: the Kantorovich potential φ* of a WGAN-GP critic; optional anisotropic metric
  d_A(x, y) = ‖A(x − y)‖₂ with A = diag(a), whose dual constraint is ‖A⁻¹∇φ‖ ≤ 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .density import KDE
from .flow import EuclideanFlow, Trajectory, log_likelihood
from .utilities import FitContext, Fitted, Utility

__all__ = ["KL", "Renyi", "Wasserstein1", "Objective", "FittedObjective"]


class KL:
    """KL(p ‖ p_pre) through the score difference at t = 1 − ε: δKL = 1 + log p − log p_pre, so
    ∇δKL = s_p − s_pre (p the current model p_{k−1}); G = F − α·KL adds −α(s_p − s_pre), pulling mass back
    toward p_pre. The value is not estimated (NaN; fdc_mol.fdc.density.kl_from_log_probs estimates it from
    log-densities). The current model's score has the amplification pitfall of :class:`ScoreEntropy`."""

    name = "kl"

    def __init__(self, eps: float = 0.005) -> None:
        if not 0.0 < eps < 1.0:
            raise ValueError(f"KL eps must be in (0, 1), got {eps}")
        self.eps = float(eps)

    def fit(self, ctx: FitContext) -> Fitted:
        if ctx.model is None or ctx.pre is None:
            raise ValueError("KL needs the current and the pre-trained model in the fit context")
        cur, pre, t = ctx.model.copy_frozen(), ctx.pre, 1.0 - self.eps

        def grad_fn(x: Tensor, traj: Trajectory | None) -> Tensor:
            with torch.no_grad():
                return cur.score(x, t, traj) - pre.score(x, t, traj)

        return Fitted(value=math.nan, grad_fn=grad_fn)


class Renyi:
    """Rényi divergence of order β ≠ 1 with densities from the likelihood ODE ('ode') or a KDE ('kde').

    'ode' needs :class:`EuclideanFlow` models and uses their scores at 1 − ε; 'kde' fits KDEs on samples of
    p_{k−1} and p_pre (``sample_pre`` in the context) and uses their autograd gradients. The weight
    (p/q)^{β−1} is computed in log space and clamped at ±``log_clip`` (log units) for stability.
    """

    name = "renyi"

    def __init__(
        self,
        beta: float = 2.0,
        density: str = "kde",
        eps: float = 0.005,
        ode_steps: int = 100,
        n_pre: int = 2000,
        log_clip: float = 10.0,
    ) -> None:
        if beta <= 0 or beta == 1:
            raise ValueError(f"Renyi beta must be > 0 and != 1, got {beta}")
        if density not in ("ode", "kde"):
            raise ValueError(f"Renyi density must be 'ode' or 'kde', got {density!r}")
        self.beta, self.density, self.eps = float(beta), density, float(eps)
        self.ode_steps, self.n_pre, self.log_clip = int(ode_steps), int(n_pre), float(log_clip)

    @staticmethod
    def discrete_value(p: Tensor, q: Tensor, beta: float) -> Tensor:
        """D_β(p ‖ q) = (1/(β−1)) log Σ p^β q^{1−β} for probability vectors."""
        return torch.log((p**beta * q ** (1 - beta)).sum()) / (beta - 1)

    @staticmethod
    def discrete_first_variation(p: Tensor, q: Tensor, beta: float) -> Tensor:
        """δD_β = (β/(β−1)) Z⁻¹ (p/q)^{β−1}, Z = Σ p^β q^{1−β}."""
        Z = (p**beta * q ** (1 - beta)).sum()
        return beta / (beta - 1) * (p / q) ** (beta - 1) / Z

    def _densities(self, ctx: FitContext):
        if self.density == "ode":
            if not isinstance(ctx.model, EuclideanFlow) or not isinstance(ctx.pre, EuclideanFlow):
                raise ValueError("Renyi density='ode' needs EuclideanFlow models (likelihood ODE)")
            cur, pre, t = ctx.model.copy_frozen(), ctx.pre, 1.0 - self.eps

            def logp(x: Tensor) -> Tensor:
                return log_likelihood(lambda y, s: cur.velocity(y, s), x, steps=self.ode_steps, t1=t)

            def logq(x: Tensor) -> Tensor:
                return log_likelihood(lambda y, s: pre.velocity(y, s), x, steps=self.ode_steps, t1=t)

            def sdiff(x: Tensor) -> Tensor:
                with torch.no_grad():
                    return cur.score(x, t) - pre.score(x, t)

            return logp, logq, sdiff
        if ctx.sample_pre is None:
            raise ValueError("Renyi density='kde' needs sample_pre in the fit context")
        kp = KDE().fit(ctx.x)
        kq = KDE().fit(ctx.sample_pre(self.n_pre))
        return kp.log_prob, kq.log_prob, lambda x: kp.grad_log_prob(x) - kq.grad_log_prob(x)

    def fit(self, ctx: FitContext) -> Fitted:
        logp, logq, sdiff = self._densities(ctx)
        b = self.beta
        with torch.no_grad():
            lr = (logp(ctx.x) - logq(ctx.x)).clamp(-self.log_clip, self.log_clip)
        # Z = E_p[(p/q)^{β−1}]
        logZ = torch.logsumexp((b - 1) * lr, 0) - math.log(lr.numel())
        value = float(logZ / (b - 1))

        def grad_fn(x: Tensor, traj: Trajectory | None) -> Tensor:
            with torch.no_grad():
                lrx = (logp(x) - logq(x)).clamp(-self.log_clip, self.log_clip)
            w = b * torch.exp((b - 1) * lrx - logZ)
            return w.reshape(-1, *([1] * (x.ndim - 1))) * sdiff(x)

        return Fitted(value=value, grad_fn=grad_fn, info={"logZ": float(logZ)})


class Wasserstein1:
    """W₁(p, p_pre) for the metric ‖A(x − y)‖₂ by a WGAN-GP critic; ∇δW₁ = ∇φ*.

    critic: MLP d → hidden → ReLU → hidden → ReLU → 1; Adam(lr, betas (0.5, 0.9)); loss
    −(E_p φ − E_pre φ) + λ_GP E[(‖A⁻¹∇φ‖ − 1)²] at random interpolates ([code] dual norm); the
    trained critic is divided by its mean dual gradient norm (removes the GP's W/(2λ_GP) inflation).
    anisotropy: the diagonal of A (None = Euclidean). value: E_p φ − E_pre φ on fresh samples.
    """

    name = "w1"

    def __init__(
        self,
        anisotropy: Sequence[float] | None = None,
        hidden: int = 128,
        steps: int = 500,
        lr: float = 1e-3,
        gp: float = 10.0,
        batch: int = 256,
        n_samples: int = 2000,
    ) -> None:
        self.a = None if anisotropy is None else torch.as_tensor(anisotropy, dtype=torch.get_default_dtype())
        if self.a is not None and (self.a <= 0).any():
            raise ValueError("Wasserstein1 anisotropy entries must be positive")
        self.hidden, self.steps, self.lr, self.gp = int(hidden), int(steps), float(lr), float(gp)
        self.batch, self.n_samples = int(batch), int(n_samples)

    def train_critic(self, xp: Tensor, xq: Tensor) -> tuple[nn.Module, float]:
        """Fit the critic on samples xp ~ p (n, d) and xq ~ q (m, d); returns (critic, W₁ estimate)."""
        d = xp.shape[1]
        center = xq.mean(0)
        scale = float(xq.std(0).mean().clamp_min(1e-6))
        net = nn.Sequential(
            nn.Linear(d, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, 1),
        )

        def critic(x: Tensor) -> Tensor:
            return scale * net((x - center) / scale).squeeze(-1)

        opt = torch.optim.Adam(net.parameters(), lr=self.lr, betas=(0.5, 0.9))
        a_inv = None if self.a is None else 1.0 / self.a
        for _ in range(self.steps):
            ip = torch.randint(0, xp.shape[0], (self.batch,))
            iq = torch.randint(0, xq.shape[0], (self.batch,))
            bp, bq = xp[ip], xq[iq]
            u = torch.rand(self.batch, 1)
            xi = (u * bp + (1 - u) * bq).requires_grad_(True)
            (gi,) = torch.autograd.grad(critic(xi).sum(), xi, create_graph=True)
            if a_inv is not None:
                gi = gi * a_inv
            penalty = (gi.norm(dim=-1) - 1).pow(2).mean()
            loss = -(critic(bp).mean() - critic(bq).mean()) + self.gp * penalty
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for p in net.parameters():
            p.requires_grad_(False)
        # The two-sided penalty lets ‖A⁻¹∇φ‖ settle near 1 + W/(2λ_GP), not 1: rescale the critic by its
        # mean dual gradient norm on interpolates so that it is (on average) 1-Lipschitz in d_A.
        n = min(xp.shape[0], xq.shape[0], 2000)
        u = torch.rand(n, 1)
        xi = (u * xp[:n] + (1 - u) * xq[:n]).requires_grad_(True)
        with torch.enable_grad():
            (gi,) = torch.autograd.grad(critic(xi).sum(), xi)
        if a_inv is not None:
            gi = gi * a_inv
        c = float(gi.norm(dim=-1).mean().clamp_min(1e-6))

        def unit_critic(x: Tensor) -> Tensor:
            return critic(x) / c

        with torch.no_grad():
            est = float(unit_critic(xp).mean() - unit_critic(xq).mean())
        return unit_critic, est

    def fit(self, ctx: FitContext) -> Fitted:
        if ctx.sample_pre is None:
            raise ValueError("Wasserstein1 needs sample_pre in the fit context")
        xp = ctx.x.detach().reshape(ctx.x.shape[0], -1)
        xq = ctx.sample_pre(self.n_samples).detach().reshape(self.n_samples, -1)
        critic, est = self.train_critic(xp, xq)

        def grad_fn(x: Tensor, traj: Trajectory | None) -> Tensor:
            with torch.enable_grad():
                xr = x.detach().reshape(x.shape[0], -1).requires_grad_(True)
                (g,) = torch.autograd.grad(critic(xr).sum(), xr)
            return g.reshape(x.shape)

        return Fitted(value=est, grad_fn=grad_fn, info={"critic": critic})


class FittedObjective(Fitted):
    """The fitted G = F − α·D + Σ_j w_j T_j: value (NaN parts skipped), field ∇δF − α∇δD + Σ_j w_j ∇δT_j."""


class Objective:
    """G = F − α·D + Σ_j w_j T_j: a utility F (or None), a divergence D (or None) with weight α ≥ 0, and
    extra weighted terms T_j (any functional with ``fit(ctx) -> Fitted``, e.g. a KDE novelty term −log p̂ of
    conformer descriptors). Each part contributes its first-variation gradient; the loop divides by η_k.
    """

    def __init__(self, F: Utility | None, D: object | None = None, alpha: float = 0.0,
                 terms: Sequence[tuple[float, Utility]] = ()) -> None:
        if alpha < 0:
            raise ValueError(f"Objective alpha must be >= 0, got {alpha}")
        if F is None and D is None and not terms:
            raise ValueError("Objective needs a utility F, a divergence D or a weighted term")
        for w, _ in terms:
            if not math.isfinite(w):
                raise ValueError(f"Objective term weights must be finite, got {w}")
        self.F, self.D, self.alpha = F, D, float(alpha)
        self.terms = [(float(w), t) for w, t in terms if w != 0.0]

    @property
    def name(self) -> str:
        parts = [self.F.name] if self.F is not None else []
        if self.D is not None and self.alpha > 0:
            parts.append(f"{self.alpha:g}*{self.D.name}")
        parts += [f"{w:g}*{t.name}" for w, t in self.terms]
        return " - ".join(parts[:2]) + "".join(f" + {p}" for p in parts[2:])

    def fit(self, ctx: FitContext) -> FittedObjective:
        fF = self.F.fit(ctx) if self.F is not None else None
        fD = self.D.fit(ctx) if (self.D is not None and self.alpha > 0) else None
        fT = [(w, t.fit(ctx), t.name) for w, t in self.terms]
        alpha = self.alpha

        def grad_fn(x: Tensor, traj: Trajectory | None) -> Tensor:
            g = fF.grad(x, traj) if fF is not None else torch.zeros_like(x)
            if fD is not None:
                g = g - alpha * fD.grad(x, traj)
            for w, ft, _ in fT:
                g = g + w * ft.grad(x, traj)
            return g

        vF = fF.value if fF is not None else 0.0
        vD = fD.value if fD is not None else 0.0
        value = vF - alpha * (0.0 if math.isnan(vD) else vD)
        value += sum(w * ft.value for w, ft, _ in fT if not math.isnan(ft.value))
        info = {"F": vF, "D": vD if fD is not None else 0.0}
        if fF is not None:
            info.update({f"F_{k}": v for k, v in fF.info.items() if isinstance(v, float)})
        for _, ft, name in fT:
            info[name] = ft.value
            info.update({f"{name}_{k}": v for k, v in ft.info.items() if isinstance(v, float)})
        scale = fF.grad_scale if fF is not None else 1.0
        return FittedObjective(value=value, grad_fn=grad_fn, grad_scale=scale, info=info)

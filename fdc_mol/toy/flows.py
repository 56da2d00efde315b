"""Small 2-D (any-d) flows for the illustrative settings: an exact Gaussian-mixture flow plus a residual MLP.

The pre-trained model is the exact rectified-flow velocity of a Gaussian mixture (linear schedule,
x_t = (1 − t) x_0 + t x_1, x_0 ~ N(0, I)); it needs no training and its score is known in closed form.
The fine-tuned model is v_θ = v_pre + Δv_θ with the MLP's last layer zero-initialised, so fine-tuning
starts exactly at the pre-trained model. Two parametrisations of the residual (linear schedule,
η_t = (1 − t)/t, score s = (v − κ_t x)/η_t, so Δs = Δv/η_t):

- ``"velocity"``: Δv = scale·MLP(x/scale, t). The score residual Δs = t·scale·MLP/(1 − t) is the MLP
  output amplified by t/(1 − t) (199 at t = 1 − 0.005), and adjoint matching barely constrains it there
  (its loss weights score errors by σ_t² = 2η_t → 0): scores at 1 − ε of a fine-tuned model are noise.
- ``"score"``: Δv = (1 − t)·scale·MLP(x/scale, t), so Δs = t·scale·MLP, bounded as t → 1. The AM optimum
  Δv* = −η_t ã_t becomes MLP* = −ã_t/t, a smooth target; scores at 1 − ε stay accurate. Use this when a
  first variation needs the current model's score (entropy, KL).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fdc_mol.fdc.flow import EuclideanFlow

__all__ = ["GMMVelocity", "ResidualVelocity", "RESIDUALS", "make_gmm_flow"]


class GMMVelocity(nn.Module):
    """Exact velocity E[x_1 − x_0 | x_t] of the linear-schedule flow to Σ_k w_k N(m_k, s_k² I).

    means (K, d), stds (K,), weights (K,) (normalised here). forward(x (n, d), t (n, 1)) -> (n, d).
    Stored as ``means``, ``log_stds`` and ``logits`` (w = softmax(logits)): buffers, or trainable
    parameters with ``trainable=True`` (fine-tuning the pre-trained model's own parameters; every
    parameter value is again an exact Gaussian-mixture flow, whose tilts p^c stay (nearly) in the family).
    """

    def __init__(
        self,
        means: Tensor | Sequence,
        stds: Tensor | Sequence,
        weights: Tensor | Sequence,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.get_default_dtype())
        stds = torch.as_tensor(stds, dtype=torch.get_default_dtype())
        weights = torch.as_tensor(weights, dtype=torch.get_default_dtype())
        if means.ndim != 2 or stds.shape != (means.shape[0],) or weights.shape != (means.shape[0],):
            raise ValueError(
                f"GMMVelocity needs means (K, d), stds (K,), weights (K,); got {tuple(means.shape)}, "
                f"{tuple(stds.shape)}, {tuple(weights.shape)}"
            )
        if (stds <= 0).any() or (weights <= 0).any():
            raise ValueError("GMMVelocity needs positive stds and weights")
        values = {"means": means, "log_stds": stds.log(), "logits": (weights / weights.sum()).log()}
        for name, v in values.items():
            if trainable:
                self.register_parameter(name, nn.Parameter(v.clone()))
            else:
                self.register_buffer(name, v.clone())

    @property
    def stds(self) -> Tensor:
        """Component standard deviations s_k (K,), length units of x."""
        return self.log_stds.exp()

    @property
    def logw(self) -> Tensor:
        """log mixture weights (K,), normalised."""
        return torch.log_softmax(self.logits, dim=-1)

    def _posterior(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Component responsibilities (n, K), marginal variances v_k(t) (n, K), centred x − t m_k (n, K, d)."""
        d = x.shape[-1]
        var = (1 - t) ** 2 + t**2 * self.stds.pow(2)  # (n, K)
        diff = x[:, None, :] - t[:, :, None] * self.means[None]  # (n, K, d)
        logp = self.logw - 0.5 * diff.pow(2).sum(-1) / var - 0.5 * d * torch.log(2 * math.pi * var)
        return torch.softmax(logp, dim=-1), var, diff

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        resp, var, diff = self._posterior(x, t)
        coef = (t * self.stds.pow(2) - (1 - t)) / var  # (n, K)
        cond = self.means[None] + coef[..., None] * diff
        return (resp[..., None] * cond).sum(1)

    def score(self, x: Tensor, t: float) -> Tensor:
        """Exact ∇ₓ log p_t(x), x (n, d) -> (n, d)."""
        tt = torch.full((x.shape[0], 1), float(t), dtype=x.dtype)
        resp, var, diff = self._posterior(x, tt)
        return -(resp[..., None] * diff / var[..., None]).sum(1)

    def log_prob(self, x: Tensor, t: float = 1.0) -> Tensor:
        """Exact log p_t(x) in nats, x (n, d) -> (n,)."""
        d = x.shape[-1]
        tt = torch.full((x.shape[0], 1), float(t), dtype=x.dtype)
        var = (1 - tt) ** 2 + tt**2 * self.stds.pow(2)
        diff = x[:, None, :] - tt[:, :, None] * self.means[None]
        logp = self.logw - 0.5 * diff.pow(2).sum(-1) / var - 0.5 * d * torch.log(2 * math.pi * var)
        return torch.logsumexp(logp, -1)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Exact samples of the data distribution (t = 1), (n, d)."""
        k = torch.multinomial(self.logw.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator)
        return self.means[k] + self.stds[k, None] * z


RESIDUALS = ("velocity", "score")


class ResidualVelocity(nn.Module):
    """v_θ(x, t) = v_pre(x, t) + c(t) · scale · MLP_θ([x/scale, t]); last layer zero-initialised.

    v_pre is frozen unless ``freeze_pre=False`` (then its own parameters are fine-tuned too);
    ``scale`` (length units of x) normalises the MLP input and output for landscapes far from the origin.
    ``residual``: "velocity" (c(t) = 1) or "score" (c(t) = 1 − t, so the score residual t·scale·MLP stays
    bounded at t → 1; module docstring). x (n, d), t (n, 1) -> (n, d).
    """

    def __init__(
        self,
        pre: nn.Module,
        dim: int,
        hidden: int = 64,
        scale: float = 1.0,
        residual: str = "velocity",
        freeze_pre: bool = True,
    ) -> None:
        super().__init__()
        if residual not in RESIDUALS:
            raise ValueError(f"ResidualVelocity residual must be one of {RESIDUALS}, got {residual!r}")
        self.residual = residual
        self.pre = pre
        if freeze_pre:
            for p in self.pre.parameters():
                p.requires_grad_(False)
        self.scale = float(scale)
        self.mlp = nn.Sequential(
            nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim)
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        out = self.scale * self.mlp(torch.cat([x / self.scale, t], dim=-1))
        if self.residual == "score":
            out = (1.0 - t) * out
        return self.pre(x, t) + out


def make_gmm_flow(
    means: Tensor | Sequence,
    stds: Tensor | Sequence,
    weights: Tensor | Sequence,
    hidden: int = 64,
    scale: float = 1.0,
    residual: str = "velocity",
    finetune_mixture: bool = False,
) -> EuclideanFlow:
    """A fine-tunable :class:`EuclideanFlow` that starts at the exact flow of the given Gaussian mixture.

    residual: "velocity" or "score" parametrisation of the fine-tuned residual (see :class:`ResidualVelocity`).
    finetune_mixture: also fine-tune the mixture's means, log-stds and weight logits (else frozen).
    """
    pre = GMMVelocity(means, stds, weights, trainable=finetune_mixture)
    net = ResidualVelocity(
        pre, pre.means.shape[1], hidden=hidden, scale=scale, residual=residual, freeze_pre=not finetune_mixture
    )
    return EuclideanFlow(net, dim=pre.means.shape[1])

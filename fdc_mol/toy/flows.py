"""Small 2-D (any-d) flows for the illustrative settings: an exact Gaussian-mixture flow plus a residual MLP.

The pre-trained model is the exact rectified-flow velocity of a Gaussian mixture (linear schedule,
x_t = (1 − t) x_0 + t x_1, x_0 ~ N(0, I)); it needs no training and its score is known in closed form.
The fine-tuned model is v_θ = v_pre + MLP_θ(x, t) with the MLP's last layer zero-initialised, so
fine-tuning starts exactly at the pre-trained model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fdc_mol.fdc.flow import TensorFlow

__all__ = ["GMMVelocity", "ResidualVelocity", "make_gmm_flow"]


class GMMVelocity(nn.Module):
    """Exact velocity E[x_1 − x_0 | x_t] of the linear-schedule flow to Σ_k w_k N(m_k, s_k² I).

    means (K, d), stds (K,), weights (K,) (normalised here). forward(x (n, d), t (n, 1)) -> (n, d).
    """

    def __init__(self, means: Tensor | Sequence, stds: Tensor | Sequence, weights: Tensor | Sequence) -> None:
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
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("logw", (weights / weights.sum()).log())

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


class ResidualVelocity(nn.Module):
    """v_θ(x, t) = v_pre(x, t) + scale · MLP_θ([x/scale, t]); last layer zero-initialised.

    v_pre is frozen (a buffer-only module such as :class:`GMMVelocity`); ``scale`` (length units of x)
    normalises the MLP input and output for landscapes far from the origin.
    """

    def __init__(self, pre: nn.Module, dim: int, hidden: int = 64, scale: float = 1.0) -> None:
        super().__init__()
        self.pre = pre
        for p in self.pre.parameters():
            p.requires_grad_(False)
        self.scale = float(scale)
        self.mlp = nn.Sequential(
            nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim)
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.pre(x, t) + self.scale * self.mlp(torch.cat([x / self.scale, t], dim=-1))


def make_gmm_flow(
    means: Tensor | Sequence, stds: Tensor | Sequence, weights: Tensor | Sequence, hidden: int = 64, scale: float = 1.0
) -> TensorFlow:
    """A fine-tunable :class:`TensorFlow` that starts at the exact flow of the given Gaussian mixture."""
    pre = GMMVelocity(means, stds, weights)
    return TensorFlow(ResidualVelocity(pre, pre.means.shape[1], hidden=hidden, scale=scale), dim=pre.means.shape[1])

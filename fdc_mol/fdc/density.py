"""Gaussian kernel density estimates over a differentiable (invariant) feature map.

p̂(x) = (1/m) Σ_j N(φ(x); φ(x_j), diag(h²)) is a density over *features* φ(x) ∈ R^D (for φ = identity
it is a density over x). ∇ₓ log p̂ comes from autograd through φ, so the same class serves 2-D toys
(φ = id) and molecules (φ = an invariant descriptor of a conformer, e.g. sorted distances).
Bandwidth per feature dimension: Scott h_j = m^{−1/(D+4)} σ_j, Silverman h_j = (4/(D+2))^{1/(D+4)}
m^{−1/(D+4)} σ_j, or a given float (same units as φ).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["KDE"]

FeatureMap = Callable[[Tensor], Tensor]


class KDE:
    """Gaussian KDE over φ(x). ``fit(x_ref)`` then ``log_prob(x)`` (n,) and ``grad_log_prob(x)`` like x."""

    def __init__(
        self, feature_map: FeatureMap | None = None, bandwidth: str | float = "scott", chunk: int = 4096
    ) -> None:
        if isinstance(bandwidth, str) and bandwidth not in ("scott", "silverman"):
            raise ValueError(f"KDE bandwidth must be 'scott', 'silverman' or a positive float, got {bandwidth!r}")
        if not isinstance(bandwidth, str) and not float(bandwidth) > 0:
            raise ValueError(f"KDE bandwidth must be positive, got {bandwidth}")
        self.feature_map = feature_map
        self.bandwidth = bandwidth
        self.chunk = int(chunk)
        self.ref: Tensor | None = None
        self.h: Tensor | None = None

    def features(self, x: Tensor) -> Tensor:
        """φ(x) as (n, D)."""
        f = x if self.feature_map is None else self.feature_map(x)
        return f.reshape(f.shape[0], -1)

    def fit(self, x_ref: Tensor) -> KDE:
        """Store the reference features (detached) and choose the bandwidth (n >= 2 rows)."""
        with torch.no_grad():
            f = self.features(x_ref.detach())
        m, D = f.shape
        if m < 2:
            raise ValueError(f"KDE.fit needs at least 2 reference samples, got {m}")
        f = f[torch.isfinite(f).all(-1)]
        if isinstance(self.bandwidth, str):
            std = f.std(0).clamp_min(1e-8)
            factor = m ** (-1.0 / (D + 4))
            if self.bandwidth == "silverman":
                factor *= (4.0 / (D + 2)) ** (1.0 / (D + 4))
            self.h = std * factor
        else:
            self.h = torch.full((D,), float(self.bandwidth), dtype=f.dtype)
        self.ref = f
        return self

    def _log_prob_features(self, f: Tensor, exclude_self: bool) -> Tensor:
        if self.ref is None or self.h is None:
            raise ValueError("KDE is not fitted: call fit(x_ref) first")
        m, D = self.ref.shape
        log_norm = -0.5 * D * math.log(2 * math.pi) - self.h.log().sum() - math.log(m - (1 if exclude_self else 0))
        outs = []
        for i in range(0, f.shape[0], self.chunk):
            fi = f[i : i + self.chunk]
            z = (fi[:, None, :] - self.ref[None]) / self.h
            e = -0.5 * z.pow(2).sum(-1)  # (c, m)
            if exclude_self:
                idx = torch.arange(fi.shape[0])
                e = e.clone()
                e[idx, i + idx] = -math.inf
            outs.append(torch.logsumexp(e, -1))
        return torch.cat(outs) + log_norm

    def log_prob(self, x: Tensor, exclude_self: bool = False) -> Tensor:
        """log p̂(φ(x)) in nats (density over features), (n,). exclude_self: leave-one-out when x is the
        reference set itself (row i skips reference i)."""
        return self._log_prob_features(self.features(x), exclude_self)

    def grad_log_prob(self, x: Tensor) -> Tensor:
        """∇ₓ log p̂(φ(x)) by autograd through the feature map, shape like x."""
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            lp = self.log_prob(xr)
            (g,) = torch.autograd.grad(lp.sum(), xr)
        return g

    def entropy(self, x: Tensor | None = None) -> float:
        """Resubstitution entropy −mean log p̂ (leave-one-out on the reference set when x is None), nats."""
        if x is None:
            if self.ref is None:
                raise ValueError("KDE is not fitted: call fit(x_ref) first")
            return float(-self._log_prob_features(self.ref, exclude_self=True).mean())
        return float(-self.log_prob(x).mean())

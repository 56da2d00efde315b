"""Gaussian kernel density estimates over a differentiable (invariant) feature map.

p̂(x) = (1/m) Σ_j N(φ(x); φ(x_j), diag(h²)) is a density over *features* φ(x) ∈ R^D (for φ = identity
it is a density over x). ∇ₓ log p̂ comes from autograd through φ, so the same class serves 2-D toys
(φ = id) and molecules (φ = an invariant descriptor of a conformer, e.g. sorted distances).
Bandwidth per feature dimension: Scott h_j = m^{−1/(D+4)} σ_j, Silverman h_j = (4/(D+2))^{1/(D+4)}
m^{−1/(D+4)} σ_j, or a given float (same units as φ).

Sample-based entropy and divergence evaluation, shared by the 2-D settings and molecules (conformer
descriptors): :func:`histogram_entropy` (discrete entropy of a fixed-grid histogram, the paper's 200×200
on [−6, 6]²), :func:`kde_entropy` (leave-one-out resubstitution −mean log p̂), :func:`nll_entropy` and
:func:`kl_from_log_probs` (from per-sample log-densities, e.g. a likelihood ODE or a closed form), and
:func:`cluster_fractions` (mass per mode, nearest centre).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["KDE", "histogram_entropy", "kde_entropy", "nll_entropy", "kl_from_log_probs", "cluster_fractions"]

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


def histogram_entropy(x: Tensor, bins: int = 200, lim: float | Sequence[tuple[float, float]] = 6.0) -> float:
    """Discrete entropy −Σ_b p_b log p_b (nats) of the histogram of x (n, D) on a fixed grid.

    bins per dimension; lim: half-width L (the box [−L, L]^D) or per-dimension (lo, hi) ranges. Samples
    outside the box are dropped before normalising (report their share separately if it matters). Not a
    differential entropy: it equals H_diff − D·log(bin width) only for densities smooth on the bin scale.
    The paper's 2-D estimator is bins=200, lim=6 (bin width 0.06; a uniform on the box gives log 40000).
    """
    a = x.detach().reshape(x.shape[0], -1).cpu().double().numpy()
    ranges = [(-float(lim), float(lim))] * a.shape[1] if isinstance(lim, (int, float)) else [tuple(r) for r in lim]
    if len(ranges) != a.shape[1]:
        raise ValueError(f"histogram_entropy: {len(ranges)} ranges for {a.shape[1]} dimensions")
    h, _ = np.histogramdd(a, bins=bins, range=ranges)
    total = h.sum()
    if total == 0:
        raise ValueError("histogram_entropy: no sample inside the histogram range")
    p = h.ravel() / total
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def kde_entropy(
    x: Tensor, feature_map: FeatureMap | None = None, bandwidth: str | float = "scott", max_n: int = 3000
) -> float:
    """Leave-one-out KDE entropy −mean log p̂₋ᵢ(φ(x_i)) (nats, density over features) of the first max_n rows."""
    return KDE(feature_map, bandwidth).fit(x[:max_n]).entropy()


def nll_entropy(log_prob: Tensor) -> float:
    """Monte-Carlo entropy −mean log p(x_i) (nats) from log-densities (n,) of samples x_i ~ p."""
    lp = log_prob.detach()
    if not torch.isfinite(lp).all():
        raise ValueError("nll_entropy: non-finite log-densities")
    return float(-lp.mean())


def kl_from_log_probs(log_p: Tensor, log_q: Tensor) -> tuple[float, float]:
    """KL(p ‖ q) ≈ mean(log p(x_i) − log q(x_i)) over x_i ~ p (nats) and its Monte-Carlo standard error.

    log_p, log_q: (n,) log-densities of the same samples of p under p and q.
    """
    if log_p.shape != log_q.shape or log_p.ndim != 1:
        raise ValueError(f"kl_from_log_probs needs two (n,) tensors, got {tuple(log_p.shape)}, {tuple(log_q.shape)}")
    d = (log_p - log_q).detach().double()
    return float(d.mean()), float(d.std() / math.sqrt(d.numel()))


def cluster_fractions(x: Tensor, centers: Tensor) -> Tensor:
    """Fraction of the samples x (n, D) whose nearest centre (Euclidean) is each of centers (K, D) -> (K,)."""
    k = torch.cdist(x.detach().reshape(x.shape[0], -1), centers.reshape(centers.shape[0], -1)).argmin(-1)
    return torch.bincount(k, minlength=centers.shape[0]).to(torch.get_default_dtype()) / x.shape[0]

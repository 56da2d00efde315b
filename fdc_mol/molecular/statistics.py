"""Interval estimates for comparing generators: bootstrap intervals of SQ_β / CVaR / means, and paired
per-molecule differences under common random numbers.

SQ_β and CVaR are THE definitions of :mod:`fdc_mol.fdc.utilities` (lower empirical quantile), so the
reported figure is the quantity the utility optimises. NaN rewards (failed molecules) are left out.
All functions are numpy-only and deterministic for a given ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fdc_mol.fdc.utilities import CVaR, SuperQuantile

__all__ = ["Interval", "superquantile", "cvar", "bootstrap", "paired_difference", "paired_bootstrap", "crn_bootstrap"]


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile-bootstrap interval at ``level`` over ``n`` finite values."""

    value: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def excludes(self, x: float) -> bool:
        """True when x lies outside [low, high] (both bounds finite)."""
        return math.isfinite(self.low) and math.isfinite(self.high) and not self.low <= x <= self.high

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}] (n={self.n})"


def _finite(r: np.ndarray) -> np.ndarray:
    r = np.asarray(r, dtype=np.float64)
    return r[np.isfinite(r)]


def superquantile(r: np.ndarray, beta: float) -> float:
    """SQ_β of the finite rewards = the utility's value (mean of the top 1 − β above the lower β-quantile)."""
    rf = _finite(r)
    if rf.size == 0:
        return math.nan
    return float(SuperQuantile(beta).value(torch.as_tensor(rf)))


def cvar(r: np.ndarray, beta: float) -> float:
    """CVaR_β of the finite rewards = the utility's value (mean of the worst β share)."""
    rf = _finite(r)
    if rf.size == 0:
        return math.nan
    return float(CVaR(beta).value(torch.as_tensor(rf)))


def bootstrap(r: np.ndarray, stat: Callable[[np.ndarray], float], n_boot: int = 1000, level: float = 0.95,
              seed: int = 0) -> Interval:
    """Percentile bootstrap of ``stat`` over the finite entries of r (resampling molecules)."""
    rf = _finite(r)
    if rf.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0, level)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, rf.size, size=(n_boot, rf.size))
    vals = np.array([stat(rf[i]) for i in idx])
    a = (1.0 - level) / 2.0
    return Interval(float(stat(rf)), float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a)), int(rf.size), level)


def paired_difference(r_new: np.ndarray, r_ref: np.ndarray, same: np.ndarray | None = None, n_boot: int = 1000,
                      level: float = 0.95, seed: int = 0) -> Interval:
    """Mean of r_new − r_ref over pairs (same index = same size, noise and CTMC draws) where both are finite
    and ``same`` (e.g. the bond graph did not change) holds, with a bootstrap interval over those pairs."""
    r_new, r_ref = np.asarray(r_new, np.float64), np.asarray(r_ref, np.float64)
    if r_new.shape != r_ref.shape:
        raise ValueError(f"paired_difference needs equal shapes, got {r_new.shape} and {r_ref.shape}")
    ok = np.isfinite(r_new) & np.isfinite(r_ref)
    if same is not None:
        ok &= np.asarray(same, bool)
    return bootstrap(r_new[ok] - r_ref[ok], np.mean, n_boot=n_boot, level=level, seed=seed)


def paired_bootstrap(r_a: np.ndarray, r_b: np.ndarray, stat: Callable[[np.ndarray], float], n_boot: int = 1000,
                     level: float = 0.95, seed: int = 0) -> Interval:
    """stat(r_a) − stat(r_b) over molecules finite in both (the same molecules), with a paired percentile bootstrap
    (one resample of molecule indices applied to both), e.g. the SQ_β difference between two models' geometries
    of the same molecules."""
    r_a, r_b = np.asarray(r_a, np.float64), np.asarray(r_b, np.float64)
    if r_a.shape != r_b.shape:
        raise ValueError(f"paired_bootstrap needs equal shapes, got {r_a.shape} and {r_b.shape}")
    ok = np.isfinite(r_a) & np.isfinite(r_b)
    a, b = r_a[ok], r_b[ok]
    if a.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0, level)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    vals = np.array([stat(a[i]) - stat(b[i]) for i in idx])
    q = (1.0 - level) / 2.0
    return Interval(float(stat(a) - stat(b)), float(np.quantile(vals, q)), float(np.quantile(vals, 1 - q)),
                    int(a.size), level)


def crn_bootstrap(r_a: np.ndarray, r_b: np.ndarray, stat: Callable[[np.ndarray], float], n_boot: int = 1000,
                  level: float = 0.95, seed: int = 0) -> Interval:
    """stat(r_a) − stat(r_b) for two fresh samples drawn with common random numbers (index i of both used the
    same size, noise and CTMC draws), with a bootstrap that resamples indices jointly. Unlike
    :func:`paired_bootstrap` a molecule stays in when the other model's molecule of that index failed: each side's
    statistic is taken over its own finite entries of the resample. ``n`` is the number of indices."""
    r_a, r_b = np.asarray(r_a, np.float64), np.asarray(r_b, np.float64)
    if r_a.shape != r_b.shape:
        raise ValueError(f"crn_bootstrap needs equal shapes, got {r_a.shape} and {r_b.shape}")

    def diff(i: np.ndarray | slice) -> float:
        a, b = _finite(r_a[i]), _finite(r_b[i])
        return float(stat(a) - stat(b)) if a.size and b.size else math.nan

    if r_a.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0, level)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, r_a.size, size=(n_boot, r_a.size))
    vals = np.array([diff(i) for i in idx])
    vals = vals[np.isfinite(vals)]
    q = (1.0 - level) / 2.0
    lo, hi = (float(np.quantile(vals, q)), float(np.quantile(vals, 1 - q))) if vals.size else (math.nan, math.nan)
    return Interval(diff(slice(None)), lo, hi, int(r_a.size), level)

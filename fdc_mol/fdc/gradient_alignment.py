"""Which way does an adjoint-matching step push the network, and how noisy is that direction?

At the start of a stage the fine model equals the base (v_fine ≡ v_base). The AM loss of one sample is then
‖σ ã‖² + (terms that vanish with their gradient), so its parameter gradient 4 Σ_k ã_k·∂v_fine/∂θ is linear in the
lean adjoint, which is linear in the terminal gradient. With terminal gradients wᵢ ∇r(x₁ⁱ), the batch gradient is
exactly (1/n) Σᵢ wᵢ Gᵢ, where Gᵢ (P,) is sample i's gradient with unit weight. Plain AM weights every scored sample by
1/α; FDC on SQ_β weights the tail by 1/(η(1−β)); CVaR the lower tail. One batch of trajectories with one backward
pass per sample therefore gives every utility's first-step gradient, and the spread of the Gᵢ gives its noise.

Everything below works on the Gram matrix K = G Gᵀ (m, m): cosines between weighted sums of rows, and the
per-sample signal-to-noise ρ = ‖μ‖²/E‖Gᵢ − μ‖² of rows drawn around a mean direction μ.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .adjoint_matching import _sample_rows, am_loss_for_trajectory
from .flow import FlowModel, Trajectory, per_sample_sqnorm

__all__ = ["per_sample_am_gradients", "gram_cosine", "mean_weights", "signal_to_noise", "expected_step_cosine"]


def per_sample_am_gradients(fine: FlowModel, traj: Trajectory, adj: Tensor, v_base: Tensor,
                            indices: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample AM parameter gradients Gᵢ for the samples whose lean adjoint is non-zero.

    fine: the model whose trainable parameters (``requires_grad``) are differentiated; it must offer
    ``select(traj, keep)``. adj, v_base: :func:`~fdc_mol.fdc.adjoint_matching.lean_adjoint` of ``traj`` with
    unit weights (T+1, N, ...); indices: the loss timesteps. Returns (G (m, P) float64, rows (m,) int: the sample
    index of each row). With fine ≡ base, (1/n) Σᵢ wᵢ Gᵢ is the batch gradient for terminal gradients scaled
    per sample by wᵢ (tests/fdc_mol/fdc/test_gradient_alignment.py)."""
    params = [p for p in fine.parameters() if p.requires_grad]
    if not params:
        raise ValueError("per_sample_am_gradients: the model has no trainable parameters")
    signal = per_sample_sqnorm(adj[-1], traj) != 0
    samples = torch.nonzero(signal).flatten().tolist()
    G = np.zeros((len(samples), sum(p.numel() for p in params)), dtype=np.float64)
    for j, i in enumerate(samples):
        one = torch.zeros(traj.n, dtype=torch.bool, device=traj.x1.device)
        one[i] = True
        rows = _sample_rows(traj, one)
        loss = am_loss_for_trajectory(fine, fine.select(traj, one), adj[:, rows], v_base[:, rows], indices)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        G[j] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                          for g, p in zip(grads, params)]).double().cpu().numpy()
    return G, np.asarray(samples, dtype=np.int64)


def gram_cosine(K: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """cos(Σᵢ aᵢGᵢ, Σⱼ bⱼGⱼ) from the Gram matrix K = G Gᵀ (m, m) and weights a, b (m,)."""
    den = float(a @ K @ a) * float(b @ K @ b)
    return float(a @ K @ b) / math.sqrt(den) if den > 0 else math.nan


def mean_weights(m: int, idx: np.ndarray) -> np.ndarray:
    """Weights (m,) of the mean of rows ``idx`` (a repeated index counts again, as in a bootstrap resample)."""
    if len(idx) == 0:
        raise ValueError("mean_weights: no rows")
    return np.bincount(np.asarray(idx, dtype=np.int64), minlength=m).astype(np.float64) / len(idx)


def signal_to_noise(K: np.ndarray) -> tuple[float, float]:
    """(‖μ‖², E‖Gᵢ − μ‖²) of m ≥ 2 rows Gᵢ = μ + eᵢ (eᵢ independent, zero mean) from K = G Gᵀ.

    ‖μ‖² is the mean off-diagonal inner product (unbiased: E[Gᵢ·Gⱼ] = ‖μ‖² for i ≠ j); the noise is the mean
    squared norm minus it. The ratio is the per-sample signal-to-noise ρ."""
    m = K.shape[0]
    if m < 2:
        raise ValueError("signal_to_noise needs at least 2 rows")
    tr = float(np.trace(K))
    mu2 = (float(K.sum()) - tr) / (m * (m - 1))
    return mu2, tr / m - mu2


def expected_step_cosine(rho: float, m: float) -> float:
    """cos between the mean of m rows and μ when each row has signal-to-noise ρ and the noise is spread over
    many directions: ‖μ‖/√(‖μ‖² + s²/m) = √(mρ/(1 + mρ)). 0 for ρ ≤ 0 (no detectable common direction)."""
    if not rho > 0 or not m > 0:
        return 0.0
    return math.sqrt(m * rho / (1.0 + m * rho))

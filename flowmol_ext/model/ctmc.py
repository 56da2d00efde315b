"""One sampling step: CTMC jumps for masked categoricals (FlowMol ``campbell_step``) and Euler positions.

CTMC rule per token (state k in 0..K−1 or the mask token): p̂ = softmax(log p / T); x̂₁ ~ Cat(p̂);
a masked token unmasks to x̂₁ with probability clamp(dt·(α' + η·α)/(1 − α), 0, 1); an unmasked token
re-masks with probability clamp(dt·η, 0, 1) (not on the last step). Re-masking is applied first, then
unmasking (both decided on the state before the step). Random draws, in order: multinomial (x̂₁),
rand(n) (unmask), rand(n) (re-mask, not on the last step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class CTMCDraws:
    """Pre-recorded random draws to replay a step: x1 (n,) long samples, unmask_u / mask_u (n,) U[0,1)."""

    x1: Tensor
    unmask_u: Tensor
    mask_u: Tensor | None = None


@dataclass
class CTMCStepOut:
    """New state (n,) long (mask token where masked) and the sampled endpoint x̂₁ (n,) long."""

    state: Tensor
    x1_sampled: Tensor


def temper(probs: Tensor, temperature: float) -> Tensor:
    """softmax(log p / T) over the last dim; p (n, K) probabilities."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(torch.log(probs) / temperature, dim=-1)


def purity_unmask_prob(
    state: Tensor, p_tempered: Tensor, unmask_prob: Tensor, mask_index: int, hc_thresh: float, group: Tensor
) -> Tensor:
    """Per-token unmask probability of purity sampling (n,), FlowMol ``threshold_purity_sampling``.

    Per group g with M masked tokens of which H are high-confidence (max p̂ ≥ hc_thresh): the
    expected budget rate·M goes first to the H tokens, p_h = min(rate·M/H, 1), the rest to the
    others, p_l = (rate·M − p_h·H)/(M − H). Unmasked tokens get 0.
    """
    n_groups = int(group.max()) + 1 if group.numel() else 0
    masked = state == mask_index
    hc = (p_tempered.max(dim=-1).values >= hc_thresh) & masked
    lc = masked & ~hc
    dtype = p_tempered.dtype
    m = torch.bincount(group, weights=masked.to(dtype), minlength=n_groups)
    h = torch.bincount(group, weights=hc.to(dtype), minlength=n_groups)
    budget = unmask_prob.to(dtype) * m
    ph = torch.where(h > 0, (budget / h.clamp(min=1)).clamp(max=1.0), torch.zeros_like(budget))
    rest = m - h
    pl = torch.where(rest > 0, ((budget - ph * h) / rest.clamp(min=1)).clamp(0.0, 1.0), torch.zeros_like(budget))
    prob = torch.zeros(state.shape, dtype=dtype, device=state.device)
    prob = torch.where(hc, ph[group], prob)
    return torch.where(lc, pl[group], prob)


def ctmc_step(
    state: Tensor,
    probs: Tensor,
    t: float,
    dt: float,
    eta: float,
    temperature: float,
    last_step: bool,
    mask_index: int,
    hc_thresh: float = 0.0,
    group: Tensor | None = None,
    draws: CTMCDraws | None = None,
    generator: torch.Generator | None = None,
    alpha_t: float | None = None,
    alpha_t_prime: float | None = None,
) -> CTMCStepOut:
    """One CTMC jump step for one categorical feature.

    state (n,) long with ``mask_index`` for masked tokens; probs (n, K) predicted p(x₁ | x_t) without
    the mask class (K = mask_index); t, dt the time and step; eta the re-masking rate η; temperature T.
    ``alpha_t``/``alpha_t_prime`` default to the linear schedule (α = t, α' = 1). With hc_thresh > 0,
    purity sampling per ``group`` (n,) (e.g. molecule index; default one group). ``draws`` replays
    recorded randomness; otherwise draws come from ``generator`` (on its own device, results moved to
    the probs device) or the global RNG.
    """
    if state.dim() != 1 or probs.dim() != 2 or probs.shape[0] != state.shape[0]:
        raise ValueError(f"state must be (n,) and probs (n, K); got {tuple(state.shape)} and {tuple(probs.shape)}")
    if probs.shape[1] != mask_index:
        raise ValueError(f"probs has {probs.shape[1]} classes but mask_index is {mask_index}; they must be equal")
    if dt <= 0:
        raise ValueError(f"dt must be > 0, got {dt}")
    if eta < 0:
        raise ValueError(f"eta (stochasticity) must be >= 0, got {eta}")
    n, dev = state.shape[0], probs.device
    f32 = dict(dtype=torch.float32, device=dev)
    a = torch.tensor(float(t) if alpha_t is None else float(alpha_t), **f32)
    ap = torch.tensor(1.0 if alpha_t_prime is None else float(alpha_t_prime), **f32)
    dt_t = torch.tensor(float(dt), **f32)
    unmask_prob = torch.clamp(dt_t * (ap + eta * a) / (1 - a), min=0, max=1)
    mask_prob = torch.clamp(dt_t * eta, min=0, max=1)

    p = temper(probs, temperature)
    if draws is None:
        gdev = generator.device if generator is not None else dev  # draw where the generator lives
        if n:
            x1 = torch.multinomial(p.to(gdev), 1, replacement=True, generator=generator).squeeze(-1).to(dev)
        else:
            x1 = state.clone()
        unmask_u = torch.rand(n, device=gdev, generator=generator).to(dev)
        mask_u = None if last_step else torch.rand(n, device=gdev, generator=generator).to(dev)
    else:
        x1, unmask_u, mask_u = draws.x1.to(dev).long(), draws.unmask_u.to(dev), draws.mask_u
        if not last_step and mask_u is None:
            raise ValueError("draws.mask_u is required unless last_step is True")
        if x1.shape != (n,) or unmask_u.shape != (n,) or (mask_u is not None and mask_u.shape != (n,)):
            raise ValueError(f"every draw must have shape ({n},)")

    masked = state == mask_index
    if hc_thresh > 0:
        grp = group if group is not None else torch.zeros(n, dtype=torch.long, device=state.device)
        if grp.shape != (n,):
            raise ValueError(f"group must have shape ({n},), got {tuple(grp.shape)}")
        will_unmask = unmask_u < purity_unmask_prob(state, p, unmask_prob, mask_index, hc_thresh, grp)
    else:
        will_unmask = (unmask_u < unmask_prob) & masked

    new = state.clone()
    if not last_step:
        will_mask = (mask_u.to(dev) < mask_prob) & ~masked
        new[will_mask] = mask_index
    new[will_unmask] = x1[will_unmask]
    return CTMCStepOut(state=new, x1_sampled=x1)


def euler_position_step(
    x_t: Tensor, x1_hat: Tensor, t: Tensor | float, dt: float, alpha_t: Tensor | float | None = None,
    alpha_t_prime: Tensor | float | None = None,
) -> Tensor:
    """Euler step of the position ODE: x_t + dt·α'/(1 − α)·(x̂₁ − x_t), Å.

    x_t, x1_hat (N, 3); t a float or per-node (N,) tensor; α, α' default to the linear schedule.
    """
    a = t if alpha_t is None else alpha_t
    ap = 1.0 if alpha_t_prime is None else alpha_t_prime
    if isinstance(a, Tensor) and a.dim() == 1:
        a = a.unsqueeze(-1)
    if isinstance(ap, Tensor) and ap.dim() == 1:
        ap = ap.unsqueeze(-1)
    return x_t + dt * (ap / (1 - a) * (x1_hat - x_t))

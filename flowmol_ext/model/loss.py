"""FlowMol CTMC training loss: MSE on x̂₁ and cross-entropy on the currently masked tokens only.

L_x = mean over N×3 of (x̂₁ − x₁)²; L_a, L_c, L_e = mean CE over masked atoms / charges / upper edges
(targets of unmasked tokens are ignored, as FlowMol's ignore_index −100); total = Σ w_f L_f.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from flowmol_ext.model.config import LossWeights

IGNORE_INDEX = -100


@dataclass
class LossTerms:
    """The four loss terms (scalars), their weighted total, and how many tokens were scored."""

    x: Tensor
    a: Tensor
    c: Tensor
    e: Tensor
    total: Tensor
    n_masked_a: int
    n_masked_c: int
    n_masked_e: int

    def as_dict(self) -> dict[str, float]:
        """Detached floats for logging."""
        return {k: float(getattr(self, k).detach()) for k in ("x", "a", "c", "e", "total")}


def masked_targets(target: Tensor, state: Tensor, mask_index: int) -> Tensor:
    """Target class indices (n,) with IGNORE_INDEX wherever ``state`` is not the mask token."""
    return torch.where(state == mask_index, target.long(), torch.full_like(target.long(), IGNORE_INDEX))


def masked_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over entries whose target ≠ IGNORE_INDEX.

    logits (n, K), target (n,) long. With no scored entry it returns 0 (connected to the graph)
    instead of torch's NaN.
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (n, K) and target (n,); got {tuple(logits.shape)}, {tuple(target.shape)}")
    if not bool((target != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="mean")


def flowmol_loss(
    pred_x: Tensor,
    pred_a: Tensor,
    pred_c: Tensor,
    pred_e: Tensor,
    x1: Tensor,
    target_a: Tensor,
    target_c: Tensor,
    target_e: Tensor,
    weights: LossWeights,
) -> LossTerms:
    """Loss from predictions and (already masked) targets.

    pred_x, x1 (N, 3) Å; pred_a (N, n_a), pred_c (N, n_c), pred_e (E/2, n_e) logits; targets (N,),
    (N,), (E/2,) long with IGNORE_INDEX on unscored tokens.
    """
    if pred_x.shape != x1.shape:
        raise ValueError(f"pred_x {tuple(pred_x.shape)} and x1 {tuple(x1.shape)} differ in shape")
    lx = F.mse_loss(pred_x, x1, reduction="mean")
    la, lc, le = masked_ce(pred_a, target_a), masked_ce(pred_c, target_c), masked_ce(pred_e, target_e)
    total = weights.x * lx + weights.a * la + weights.c * lc + weights.e * le
    return LossTerms(
        x=lx, a=la, c=lc, e=le, total=total,
        n_masked_a=int((target_a != IGNORE_INDEX).sum()),
        n_masked_c=int((target_c != IGNORE_INDEX).sum()),
        n_masked_e=int((target_e != IGNORE_INDEX).sum()),
    )

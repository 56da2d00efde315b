"""Schedules α_t, the CTMC conditional path, and the OT-aligned Gaussian position prior.

Time convention: t = 0 is the prior (all-mask tokens, Gaussian positions), t = 1 is the data.
Positions: x_t = (1 − α_t) x₀ + α_t x₁. Categoricals (CTMC): each token is replaced by the mask
token where u < 1 − α_t, u ~ U[0, 1), one draw per atom and per upper edge (lower edges mirror).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flowmol_ext.batch import MolBatch
from flowmol_ext.graph import Graph, lower_from_upper, remove_com
from flowmol_ext.model.config import FEATURES, CosineNu, ScheduleConfig


def rand_on(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None = None,
            normal: bool = False) -> Tensor:
    """U[0, 1) (or N(0, 1) if ``normal``) draws made on the generator's device, returned on ``device``.

    With a CPU generator the numbers are the same whichever device the model runs on.
    """
    gen_dev = generator.device if generator is not None else device
    fn = torch.randn if normal else torch.rand
    return fn(shape, device=gen_dev, generator=generator).to(device)


def _check_kind(kind: str) -> None:
    if kind not in ("linear", "cosine"):
        raise ValueError(f"unknown schedule {kind!r}; valid: 'linear', 'cosine'")


def alpha(t: Tensor, kind: str = "linear", nu: float = 1.0) -> Tensor:
    """Progress α_t (same shape as t). linear: t; cosine: 1 − cos²(π/2 · t^ν)."""
    _check_kind(kind)
    if kind == "linear":
        return t.clone()
    return 1 - torch.cos(0.5 * math.pi * t.pow(nu)) ** 2


def alpha_prime(t: Tensor, kind: str = "linear", nu: float = 1.0) -> Tensor:
    """dα/dt (same shape as t). linear: 1; cosine: (π/2)·sin(π t^ν)·ν·t^(ν−1), t clamped ≥ 1e-9 (a copy)."""
    _check_kind(kind)
    if kind == "linear":
        return torch.ones_like(t)
    tc = t.clamp(min=1e-9)
    return 0.5 * math.pi * torch.sin(math.pi * tc.pow(nu)) * nu * tc.pow(nu - 1)


@dataclass(frozen=True)
class Schedule:
    """Per-modality schedules; ``alpha(t)``/``alpha_prime(t)`` give (..., 4) with columns [x, a, c, e]."""

    kinds: ScheduleConfig
    nu: CosineNu

    def alpha(self, t: Tensor) -> Tensor:
        return torch.stack([alpha(t, getattr(self.kinds, f), getattr(self.nu, f)) for f in FEATURES], dim=-1)

    def alpha_prime(self, t: Tensor) -> Tensor:
        return torch.stack([alpha_prime(t, getattr(self.kinds, f), getattr(self.nu, f)) for f in FEATURES], dim=-1)


@dataclass
class ConditionalPath:
    """A sample of p(g_t | g_0, g_1): x_t (N, 3) Å; a_t (N,), c_t (N,), e_t (E,) long with mask tokens."""

    x_t: Tensor
    a_t: Tensor
    c_t: Tensor
    e_t: Tensor


def sample_conditional_path(
    x0: Tensor,
    x1: MolBatch,
    alpha_t: Tensor,
    mask_index: tuple[int, int, int],
    generator: torch.Generator | None = None,
    draws: tuple[Tensor, Tensor, Tensor] | None = None,
) -> ConditionalPath:
    """Interpolate positions and mask categoricals.

    x0 (N, 3) Å prior; x1 the data batch (class indices a, c (N,), e (E,)); alpha_t (B, 4) per
    molecule, columns [x, a, c, e]; mask_index = (mask of a, of c, of e). Random draws, in order:
    rand(N) for a, rand(N) for c, rand(E/2) for upper edges (or the given ``draws``).
    """
    g = x1.graph
    n, n_up = g.num_nodes, g.num_upper
    up, _ = g.upper_lower_index()
    if x0.shape != x1.x.shape:
        raise ValueError(f"x0 shape {tuple(x0.shape)} must match x1.x shape {tuple(x1.x.shape)}")
    if alpha_t.shape != (g.num_graphs, 4):
        raise ValueError(f"alpha_t must have shape ({g.num_graphs}, 4), got {tuple(alpha_t.shape)}")
    if draws is None:
        dev = x0.device
        draws = (rand_on((n,), dev, generator), rand_on((n,), dev, generator), rand_on((n_up,), dev, generator))
    u_a, u_c, u_e = draws
    if u_a.shape != (n,) or u_c.shape != (n,) or u_e.shape != (n_up,):
        raise ValueError(f"draws must have shapes ({n},), ({n},), ({n_up},)")
    w = alpha_t[:, 0][g.node_graph].unsqueeze(-1)
    x_t = (1 - w) * x0 + w * x1.x
    a_t = torch.where(u_a < 1 - alpha_t[:, 1][g.node_graph], mask_index[0], x1.a.long())
    c_t = torch.where(u_c < 1 - alpha_t[:, 2][g.node_graph], mask_index[1], x1.c.long())
    e_up = torch.where(u_e < 1 - alpha_t[:, 3][g.edge_graph.index_select(0, up)], mask_index[2],
                       x1.e.index_select(0, up).long())
    return ConditionalPath(x_t=x_t, a_t=a_t, c_t=c_t, e_t=lower_from_upper(e_up, g))


def centered_normal_prior(
    graph: Graph, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Standard normal positions (N, 3) Å with each molecule's COM removed (one randn draw).

    Returned on ``device`` (default: the graph's); drawn on the generator's device.
    """
    dev = torch.device(device) if device is not None else graph.node_graph.device
    x = rand_on((graph.num_nodes, 3), dev, generator, normal=True)
    return remove_com(x, graph.node_graph.to(dev), graph.num_graphs)


def kabsch_align(x0: Tensor, x1: Tensor) -> Tensor:
    """Rotate x0 (n, 3) onto x1 (n, 3) as FlowMol's ``rigid_alignment`` (no reflection fix).

    H = x0cᵀ x1c, H = U S Vᵀ, R = V Uᵀ, result x0c Rᵀ + m0 + (m1 − R m0).
    """
    m0, m1 = x0.mean(dim=0), x1.mean(dim=0)
    x0c, x1c = x0 - m0, x1 - m1
    h = x0c.T @ x1c
    u, _, vh = torch.linalg.svd(h)
    r = vh.mT @ u.T
    return x0c @ r.T + m0 + (m1 - r @ m0)


def ot_permutation(x1: Tensor, x0: Tensor) -> Tensor:
    """Hungarian assignment on cdist(x1, x0): returns perm (n,) long with x0[perm] matched to x1."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x1.detach().cpu().double(), x0.detach().cpu().double()).numpy()
    _, cols = linear_sum_assignment(cost)
    return torch.as_tensor(cols, dtype=torch.long, device=x0.device)


def ot_align_prior(x1: Tensor, x0: Tensor) -> Tensor:
    """OT-align a prior sample to one molecule: permute x0 by the Hungarian assignment, then Kabsch.

    x1, x0: (n, 3) Å, both COM-free. Returns the aligned x0 (n, 3).
    """
    if x1.shape != x0.shape or x1.dim() != 2 or x1.shape[1] != 3:
        raise ValueError(f"x1 and x0 must both be (n, 3); got {tuple(x1.shape)} and {tuple(x0.shape)}")
    if x1.shape[0] < 2:
        return x0.clone()
    return kabsch_align(x0[ot_permutation(x1, x0)], x1)


def aligned_prior(batch: MolBatch, generator: torch.Generator | None = None) -> Tensor:
    """OT-aligned centred Gaussian prior for a data batch: (N, 3) Å.

    Per molecule, in batch order (the FlowMol data-loader order): randn(n_i, 3), minus its mean,
    Hungarian permutation against x₁, Kabsch rotation onto x₁. Draws on the CPU generator (or the
    global CPU RNG), result moved to the batch device. ``batch.x`` must be COM-free.
    """
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"aligned_prior draws on the CPU; got a generator on {generator.device}")
    x1_all = batch.x.detach().cpu()
    out = []
    start = 0
    for n in batch.n_atoms.tolist():
        x1 = x1_all[start : start + n]
        z = torch.randn(n, 3, generator=generator)
        z = z - z.mean(dim=0, keepdim=True)
        out.append(ot_align_prior(x1, z))
        start += n
    return torch.cat(out).to(device=batch.x.device, dtype=batch.x.dtype)

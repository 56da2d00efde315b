"""The FlowMol CTMC model: endpoint prediction, training loss and the position velocity.

``FlowMol.predict`` takes CTMC states as class indices (mask token = last index) and returns
x̂₁ and logits (or probabilities). ``FlowMol.training_loss`` is FlowMol v2.0 ``FlowMol.forward``:
t ~ U(0, 1) per molecule, the conditional path, the network and the masked CE/MSE loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowmol_ext.batch import MolBatch
from flowmol_ext.graph import Graph, remove_com
from flowmol_ext.model.config import GeometryDistortion, ModelConfig
from flowmol_ext.model.interpolants import Schedule, alpha, alpha_prime, rand_on, sample_conditional_path
from flowmol_ext.model.loss import LossTerms, flowmol_loss, masked_targets
from flowmol_ext.model.vector_field import VectorField


@dataclass
class EndpointPrediction:
    """x1 (N, 3) Å; a (N, n_atom_types), c (N, n_charges), e (E/2, n_bond_types) on upper edges.

    Logits, or probabilities when predicted with ``apply_softmax=True``.
    """

    x1: Tensor
    a: Tensor
    c: Tensor
    e: Tensor


def velocity_from_endpoint(
    x_t: Tensor, x1_hat: Tensor, alpha_t: Tensor | float, alpha_t_prime: Tensor | float = 1.0
) -> Tensor:
    """Position velocity α'/(1 − α)·(x̂₁ − x_t), Å per unit time. α may be a float or (N, 1)/(N,) per node."""
    if isinstance(alpha_t, Tensor) and alpha_t.dim() == 1:
        alpha_t = alpha_t.unsqueeze(-1)
    if isinstance(alpha_t_prime, Tensor) and alpha_t_prime.dim() == 1:
        alpha_t_prime = alpha_t_prime.unsqueeze(-1)
    return alpha_t_prime / (1 - alpha_t) * (x1_hat - x_t)


class FlowMol(nn.Module):
    """FlowMol v2.0 CTMC generator (positions: Gaussian flow; types, charges, bonds: masking CTMC).

    ``metadata`` carries model-directory extras (e.g. the n_atoms histogram for the sampler).
    """

    def __init__(self, cfg: ModelConfig, metadata: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.vector_field = VectorField(cfg)
        self.schedule = Schedule(cfg.schedule, cfg.cosine_nu)
        self.metadata: dict[str, Any] = dict(metadata or {})

    # ---- token helpers -------------------------------------------------------------------------
    @property
    def mask_index(self) -> tuple[int, int, int]:
        """Mask token of (a, c, e): the last index of each categorical."""
        return self.cfg.n_atom_types, self.cfg.n_charges, self.cfg.n_bond_types

    def _one_hot(self, state: Tensor, n_classes: int, name: str, n_rows: int, dtype: torch.dtype) -> Tensor:
        if state.dtype in (torch.long, torch.int32, torch.int64, torch.uint8, torch.int16, torch.int8):
            if state.shape != (n_rows,):
                raise ValueError(f"{name}_t must have shape ({n_rows},) as class indices; got {tuple(state.shape)}")
            lo, hi = (int(state.min()), int(state.max())) if state.numel() else (0, 0)
            if lo < 0 or hi >= n_classes:
                raise ValueError(f"{name}_t indices must lie in [0, {n_classes - 1}] (mask = {n_classes - 1}); "
                                 f"got range [{lo}, {hi}]")
            return F.one_hot(state.long(), n_classes).to(dtype)
        if state.shape != (n_rows, n_classes):
            raise ValueError(
                f"{name}_t as one-hot/probabilities must be ({n_rows}, {n_classes}); got {tuple(state.shape)}"
            )
        return state.to(dtype)

    # ---- network -------------------------------------------------------------------------------
    def predict(
        self,
        x_t: Tensor,
        a_t: Tensor,
        c_t: Tensor,
        e_t: Tensor,
        t: Tensor | float,
        graph: Graph,
        apply_softmax: bool = False,
        remove_com: bool = False,
    ) -> EndpointPrediction:
        """Predict the endpoint from the state at time t.

        x_t (N, 3) Å; a_t (N,), c_t (N,), e_t (E,) long class indices with mask = last index (float
        one-hots with the mask column are accepted too); t (B,) per molecule, or a float for all.
        """
        n, n_e = graph.num_nodes, int(graph.src.numel())
        if x_t.shape != (n, 3):
            raise ValueError(f"x_t must have shape ({n}, 3); got {tuple(x_t.shape)}")
        if not isinstance(t, Tensor):
            t = torch.full((graph.num_graphs,), float(t), device=x_t.device, dtype=x_t.dtype)
        elif t.dim() == 0:
            t = t.expand(graph.num_graphs)
        if t.shape != (graph.num_graphs,):
            raise ValueError(f"t must have shape ({graph.num_graphs},) (one time per molecule); got {tuple(t.shape)}")
        cfg = self.cfg
        a = self._one_hot(a_t, cfg.n_atom_types + 1, "a", n, x_t.dtype)
        c = self._one_hot(c_t, cfg.n_charges + 1, "c", n, x_t.dtype)
        e = self._one_hot(e_t, cfg.n_bond_types + 1, "e", n_e, x_t.dtype)
        out = self.vector_field(x_t, a, c, e, t, graph)
        x1 = out.x
        if remove_com:
            x1 = _remove_com(x1, graph)
        if apply_softmax:
            return EndpointPrediction(x1=x1, a=out.a.softmax(-1), c=out.c.softmax(-1), e=out.e.softmax(-1))
        return EndpointPrediction(x1=x1, a=out.a, c=out.c, e=out.e)

    def forward(self, *args: Any, **kwargs: Any) -> EndpointPrediction:
        """Alias of :meth:`predict`."""
        return self.predict(*args, **kwargs)

    # ---- training ------------------------------------------------------------------------------
    def training_loss(
        self,
        x1: MolBatch,
        x0: Tensor,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
        draws: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> LossTerms:
        """FlowMol v2.0 training loss on a data batch.

        x1: COM-free data (x (N, 3) Å, class indices a, c, e); x0 (N, 3) Å the (OT-aligned) prior;
        t (B,) or sampled U(0, 1) here. Draw order: t (B), rand_a (N), rand_c (N), rand_e (E/2), then, only
        with ``cfg.distortion.p > 0``, rand (N) and randn (N, 3) of the train-time distortion.
        """
        g = x1.graph
        if int(x1.e.numel()) != int(g.src.numel()):
            raise ValueError(f"x1.e must hold one class per directed edge ({g.src.numel()}); got {x1.e.numel()}")
        if t is None:
            t = rand_on((g.num_graphs,), x1.x.device, generator)
        elif t.shape != (g.num_graphs,):
            raise ValueError(f"t must have shape ({g.num_graphs},); got {tuple(t.shape)}")
        alpha_t = self.schedule.alpha(t)
        path = sample_conditional_path(x0, x1, alpha_t, self.mask_index, generator=generator, draws=draws)
        x_t = distort_positions(path.x_t, t, g.node_graph, self.cfg.distortion, generator)
        pred = self.predict(x_t, path.a_t, path.c_t, path.e_t, t, g)
        ma, mc, me = self.mask_index
        return flowmol_loss(
            pred.x1, pred.a, pred.c, pred.e, x1.x,
            masked_targets(x1.a, path.a_t, ma),
            masked_targets(x1.c, path.c_t, mc),
            masked_targets(x1.e.index_select(0, g.upper_lower_index()[0]),
                           path.e_t.index_select(0, g.upper_lower_index()[0]), me),
            self.cfg.loss_weights,
        )

    # ---- sampling helpers ----------------------------------------------------------------------
    def velocity_from_endpoint(self, x_t: Tensor, x1_hat: Tensor, t: Tensor | float) -> Tensor:
        """Position velocity α'/(1 − α)·(x̂₁ − x_t) under the model's x schedule. t: float or (N,) per node."""
        tt = t if isinstance(t, Tensor) else torch.tensor(float(t), device=x_t.device, dtype=x_t.dtype)
        k, nu = self.cfg.schedule.x, self.cfg.cosine_nu.x
        return velocity_from_endpoint(x_t, x1_hat, alpha(tt, k, nu), alpha_prime(tt, k, nu))

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_compile(self, enabled: bool = True) -> None:
        """Opt in to ``torch.compile`` for the network (see :meth:`VectorField.set_compile`); kept by deepcopy."""
        self.vector_field.set_compile(enabled)


def distort_positions(x_t: Tensor, t: Tensor, node_graph: Tensor, cfg: GeometryDistortion,
                      generator: torch.Generator | None = None) -> Tensor:
    """FlowMol3's train-time distortion of x_t (N, 3) Å (see :class:`~flowmol_ext.model.config.GeometryDistortion`):
    atoms of molecules with t > cfg.t_min, each with probability cfg.p, move by N(0, cfg.std²) per coordinate.
    t (B,), node_graph (N,) molecule of each atom. Returns x_t itself when cfg.p == 0 (no draws)."""
    if cfg.p <= 0:
        return x_t
    n = x_t.shape[0]
    hit = (rand_on((n,), x_t.device, generator) < cfg.p) & (t[node_graph] > cfg.t_min)
    noise = rand_on((n, 3), x_t.device, generator, normal=True).to(x_t.dtype) * cfg.std
    return x_t + noise * hit.unsqueeze(-1).to(x_t.dtype)


def _remove_com(x: Tensor, graph: Graph) -> Tensor:
    return remove_com(x, graph.node_graph, graph.num_graphs)


__all__ = ["EndpointPrediction", "FlowMol", "LossTerms", "distort_positions", "velocity_from_endpoint"]

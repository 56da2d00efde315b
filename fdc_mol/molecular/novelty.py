"""The KDE novelty term over conformer descriptors, as a term of the FDC :class:`~fdc_mol.fdc.divergences.Objective`.

T(p) = −E_p[log p̂(φ(x))] (the entropy of the descriptor distribution, estimated by a KDE fitted on samples
of p_{k−1}); its first variation is −1 − log p̂, whose position gradient is −∇ₓ log p̂(φ(x)) (per Å). With
weight w > 0 in G = F + w·T, FDC moves molecules toward conformers that are rare under the current model.
The descriptor is the element-resolved soft pair-distance histogram of :mod:`.descriptors`, by default reduced
to its 4 leading whitened principal components on the fit sample (``n_components``), where a KDE of a few dozen
conformers is a smooth density rather than a nearest-neighbour lookup (see :class:`.descriptors.MoleculeKDE`).
"""

from __future__ import annotations

from torch import Tensor

from fdc_mol.fdc.flow import Trajectory
from fdc_mol.fdc.utilities import FitContext, Fitted

from .descriptors import MoleculeKDE

__all__ = ["ConformerNovelty"]


class ConformerNovelty:
    """Functional −E log p̂ over conformer descriptors, fitted on the fit sample of p_{k−1}.

    The fit context must carry the sample's trajectory (``ctx.traj`` with ``context['final']``, a MolBatch);
    the gradient is evaluated with the atom types of the trajectory it is asked about. value: nats.
    """

    name = "conformer_novelty"

    def __init__(self, bandwidth: str | float = "scott", n_components: int | None = 4) -> None:
        self.bandwidth = bandwidth
        self.n_components = n_components
        self.grad_scale = 1.0

    def fit(self, ctx: FitContext) -> Fitted:
        if ctx.traj is None or "final" not in (ctx.traj.context or {}):
            raise ValueError("ConformerNovelty needs the fit sample's molecular trajectory (context['final'])")
        final = ctx.traj.context["final"]
        kde = MoleculeKDE(self.bandwidth, n_components=self.n_components)
        kde.fit(ctx.x, final.a, final.node_graph, ctx.traj.n)
        value = -float(kde.log_prob(ctx.x, final.a, final.node_graph, ctx.traj.n, exclude_self=True).mean())

        def grad_fn(x: Tensor, traj: Trajectory | None) -> Tensor:
            if traj is None:
                raise ValueError("ConformerNovelty.grad needs the molecular trajectory of x")
            fin = traj.context["final"]
            return -kde.grad_log_prob(x, fin.a, fin.node_graph, traj.n)

        return Fitted(value=value, grad_fn=grad_fn, info={"kde": kde})

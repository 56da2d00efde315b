"""Fully connected molecular graphs in FlowMol's edge order, and per-graph scatter helpers.

Edge order per molecule with n atoms (E = n(n-1) directed edges, no self loops): first the
upper-triangle pairs in ``torch.triu_indices(n, n, 1)`` order (src = i < dst = j), then the same
pairs swapped in the same order. Lower edge k mirrors upper edge k. Molecule blocks are concatenated
in batch order with node ids offset by the atoms of earlier molecules. This is the official FlowMol
order; the fixtures in tests/fixtures/flowmol_v2 rely on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor


@lru_cache(maxsize=64)
def _local_edges(n: int) -> tuple[Tensor, Tensor]:
    iu = torch.triu_indices(n, n, offset=1)
    src = torch.cat([iu[0], iu[1]])
    dst = torch.cat([iu[1], iu[0]])
    return src, dst


def n_upper_edges(n_atoms: Tensor) -> Tensor:
    """Number of upper-triangle pairs per molecule, n(n-1)/2. Shape (B,)."""
    return n_atoms * (n_atoms - 1) // 2


@dataclass(frozen=True)
class Graph:
    """Index tensors of a batch of fully connected graphs.

    ``src``, ``dst``, ``edge_graph``, ``upper``: (E,); ``node_graph``: (N,); ``n_atoms``: (B,);
    ``node_offset``: (B,) first node of each molecule. ``upper_index`` / ``lower_index`` (E/2,): the
    positions of the upper edges and of their mirrored lower edges (filled by :func:`build_graph`;
    derived from ``upper`` when a Graph is built without them).
    """

    n_atoms: Tensor
    node_offset: Tensor
    node_graph: Tensor
    src: Tensor
    dst: Tensor
    edge_graph: Tensor
    upper: Tensor
    upper_index: Tensor | None = None
    lower_index: Tensor | None = None

    def __post_init__(self) -> None:
        if self.upper_index is None or self.lower_index is None:
            up = torch.nonzero(self.upper).squeeze(-1)
            lo = torch.nonzero(~self.upper).squeeze(-1)
            object.__setattr__(self, "upper_index", up)
            object.__setattr__(self, "lower_index", lo)

    @property
    def num_graphs(self) -> int:
        return int(self.n_atoms.numel())

    @property
    def num_nodes(self) -> int:
        return int(self.node_graph.numel())

    @property
    def num_upper(self) -> int:
        """Number of upper (i < j) edges, E/2."""
        return int(self.upper_lower_index()[0].numel())

    def upper_lower_index(self) -> tuple[Tensor, Tensor]:
        """(upper_index, lower_index), each (E/2,) long: lower edge ``lower_index[k]`` mirrors ``upper_index[k]``."""
        return self.upper_index, self.lower_index  # type: ignore[return-value]  # set in __post_init__

    def to(self, device: torch.device | str) -> Graph:
        return Graph(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def build_graph(n_atoms: Tensor | list[int], device: torch.device | str | None = None) -> Graph:
    """Build the batched fully connected graph for molecules of the given sizes.

    Per-size local edge lists are cached; the batch is assembled with one concatenation and
    vectorised offsets (no per-molecule tensor arithmetic).
    """
    sizes = [int(n) for n in (n_atoms.tolist() if isinstance(n_atoms, Tensor) else n_atoms)]
    if any(n < 1 for n in sizes):
        raise ValueError(f"every molecule needs at least one atom; got sizes {sizes}")
    n_atoms_t = torch.tensor(sizes, dtype=torch.long)
    offsets = torch.zeros(len(sizes), dtype=torch.long)
    if sizes:
        offsets[1:] = torch.cumsum(n_atoms_t, 0)[:-1]
    empty = torch.zeros(0, dtype=torch.long)
    n_edges = n_atoms_t * (n_atoms_t - 1)
    if sizes and int(n_edges.sum()) > 0:
        local = [_local_edges(n) for n in sizes]
        edge_graph = torch.repeat_interleave(torch.arange(len(sizes)), n_edges)
        node_off = offsets[edge_graph]
        src = torch.cat([s for s, _ in local]) + node_off
        dst = torch.cat([d for _, d in local]) + node_off
        edge_off = torch.cumsum(n_edges, 0) - n_edges
        pos = torch.arange(src.numel()) - edge_off[edge_graph]
        upper = pos < (n_edges // 2)[edge_graph]
        upper_index = torch.nonzero(upper).squeeze(-1)
        lower_index = upper_index + (n_edges // 2)[edge_graph[upper_index]]
    else:
        src = dst = edge_graph = upper_index = lower_index = empty
        upper = torch.zeros(0, dtype=torch.bool)
    g = Graph(
        n_atoms=n_atoms_t,
        node_offset=offsets,
        node_graph=torch.repeat_interleave(torch.arange(len(sizes)), n_atoms_t),
        src=src,
        dst=dst,
        edge_graph=edge_graph,
        upper=upper,
        upper_index=upper_index,
        lower_index=lower_index,
    )
    return g.to(device) if device is not None else g


def lower_from_upper(upper_values: Tensor, graph: Graph) -> Tensor:
    """Expand per-upper-edge values (E/2, ...) to all directed edges (E, ...), mirrored.

    Each molecule stores its upper block, then its lower block with the same pair order, so the
    lower edges taken in order carry exactly the upper values taken in order.
    """
    up, lo = graph.upper_lower_index()
    out = upper_values.new_empty((graph.src.numel(),) + tuple(upper_values.shape[1:]))
    out.index_copy_(0, up, upper_values)
    return out.index_copy_(0, lo, upper_values)


def scatter_sum(values: Tensor, index: Tensor, dim_size: int) -> Tensor:
    """Sum rows of ``values`` (M, ...) into ``dim_size`` buckets given by ``index`` (M,)."""
    out = values.new_zeros((dim_size,) + tuple(values.shape[1:]))
    return out.index_add_(0, index, values)


def scatter_mean(values: Tensor, index: Tensor, dim_size: int) -> Tensor:
    """Mean of rows of ``values`` per bucket; empty buckets give 0."""
    total = scatter_sum(values, index, dim_size)
    count = torch.bincount(index, minlength=dim_size).clamp(min=1).to(values.dtype)
    return total / count.view((-1,) + (1,) * (values.dim() - 1))


def remove_com(x: Tensor, node_graph: Tensor, num_graphs: int) -> Tensor:
    """Subtract each molecule's centre of mass (unweighted mean position). x: (N, 3) Å."""
    return x - scatter_mean(x, node_graph, num_graphs)[node_graph]

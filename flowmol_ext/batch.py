"""Molecules as tensors: :class:`Molecule` (one) and :class:`MolBatch` (a flat batch).

Conventions (shared with every other module):
- ``x`` positions in Å, float32; ``a`` atom-type index over ``ATOM_TYPES`` = [C, H, N, O, F];
  ``c`` charge index = formal charge + 2 over −2..+3; ``e`` bond class over [none, single, double,
  triple] (kekulized). CTMC states add a mask token as the last index (5 for a, 6 for c, 4 for e).
- Edges are fully connected in FlowMol order (:mod:`flowmol_ext.graph`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from flowmol_ext.graph import Graph, build_graph, lower_from_upper, n_upper_edges

N_ATOM_TYPES = 5
N_CHARGES = 6
N_BOND_TYPES = 4


def triu_pair_index(i: Tensor, j: Tensor, n: int) -> Tensor:
    """Position of the pair (i, j), i < j, in ``torch.triu_indices(n, n, 1)`` order."""
    return i * n - i * (i + 1) // 2 + (j - i - 1)


@dataclass
class Molecule:
    """One molecule with explicit hydrogens.

    ``x`` (n, 3) float32 Å; ``a`` (n,) long; ``c`` (n,) long charge index; ``bonds`` (k, 3) long rows
    ``[i, j, order]`` with i < j and order in 1..3. ``props`` holds free-form annotations (SMILES,
    QM9 index, energies).
    """

    x: Tensor
    a: Tensor
    c: Tensor
    bonds: Tensor
    props: dict = field(default_factory=dict)

    @property
    def n_atoms(self) -> int:
        return int(self.a.numel())

    def e_upper(self) -> Tensor:
        """Bond class on every upper-triangle pair, (n(n-1)/2,) long, triu order."""
        n = self.n_atoms
        e = torch.zeros(n * (n - 1) // 2, dtype=torch.long)
        if self.bonds.numel():
            i = torch.minimum(self.bonds[:, 0], self.bonds[:, 1]).long()
            j = torch.maximum(self.bonds[:, 0], self.bonds[:, 1]).long()
            e[triu_pair_index(i, j, n)] = self.bonds[:, 2].long()
        return e

    @staticmethod
    def bonds_from_e_upper(e_upper: Tensor, n: int) -> Tensor:
        """Inverse of :meth:`e_upper`: (k, 3) long rows [i, j, order] for pairs with a bond."""
        iu = torch.triu_indices(n, n, offset=1)
        keep = e_upper > 0
        return torch.stack([iu[0][keep], iu[1][keep], e_upper[keep].long()], dim=1)


@dataclass
class MolBatch:
    """B molecules, N atoms and E directed edges in total, as flat tensors.

    ``x`` (N, 3) float Å; ``a`` (N,), ``c`` (N,), ``e`` (E,) long class indices (or float one-hots /
    probabilities with a trailing class dim where a model needs them); ``graph`` the index tensors.
    """

    x: Tensor
    a: Tensor
    c: Tensor
    e: Tensor
    graph: Graph

    # Convenience views of the graph, so callers can write batch.src etc.
    @property
    def src(self) -> Tensor:
        return self.graph.src

    @property
    def dst(self) -> Tensor:
        return self.graph.dst

    @property
    def node_graph(self) -> Tensor:
        return self.graph.node_graph

    @property
    def edge_graph(self) -> Tensor:
        return self.graph.edge_graph

    @property
    def upper(self) -> Tensor:
        return self.graph.upper

    @property
    def n_atoms(self) -> Tensor:
        return self.graph.n_atoms

    @property
    def num_graphs(self) -> int:
        return self.graph.num_graphs

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(self, device: torch.device | str) -> MolBatch:
        return MolBatch(
            x=self.x.to(device), a=self.a.to(device), c=self.c.to(device), e=self.e.to(device),
            graph=self.graph.to(device),
        )

    def replace(self, **changes: Tensor) -> MolBatch:
        return replace(self, **changes)

    @classmethod
    def from_molecules(cls, molecules: list[Molecule], device: torch.device | str | None = None) -> MolBatch:
        """Collate molecules into one flat batch (the DataLoader collate function)."""
        if not molecules:
            raise ValueError("cannot build a MolBatch from an empty list of molecules")
        graph = build_graph([m.n_atoms for m in molecules])
        e_upper = torch.cat([m.e_upper() for m in molecules])
        batch = cls(
            x=torch.cat([m.x.float() for m in molecules]),
            a=torch.cat([m.a.long() for m in molecules]),
            c=torch.cat([m.c.long() for m in molecules]),
            e=lower_from_upper(e_upper, graph),
            graph=graph,
        )
        return batch.to(device) if device is not None else batch

    def to_molecules(self) -> list[Molecule]:
        """Split into per-molecule :class:`Molecule` objects (on CPU). Class-index states only."""
        cpu = self.to("cpu")
        sizes = cpu.n_atoms.tolist()
        xs = torch.split(cpu.x.detach(), sizes)
        as_ = torch.split(cpu.a, sizes)
        cs = torch.split(cpu.c, sizes)
        es = torch.split(cpu.e[cpu.upper], n_upper_edges(cpu.n_atoms).tolist())
        return [
            Molecule(x=x.clone(), a=a.clone(), c=c.clone(), bonds=Molecule.bonds_from_e_upper(e, len(a)))
            for x, a, c, e in zip(xs, as_, cs, es)
        ]

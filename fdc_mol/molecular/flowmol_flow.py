"""The FlowMol adapter of the :class:`~fdc_mol.fdc.flow.FlowModel` protocol (positions-only adjoint).

- ``sample`` runs the memoryless SDE on positions (COM-free noise) and CTMC jumps on atom types,
  charges and bonds, recording every state; the continuous state is all atoms' positions (N, 3) Å,
  grouped per molecule by ``Trajectory.group``.
- ``velocity(x, t, k, traj)`` evaluates the network with the *discrete* state recorded at step k of
  ``traj``: the adjoint and the loss cover positions only, as in the FDC paper; types, charges and
  bonds follow the fine model's CTMC jumps during sampling but get no control signal.
- ``project`` removes each molecule's centre of mass (noise, reward gradients and the adjoint live in
  the zero-COM subspace).
- ``trainable`` selects what fine-tuning may change: ``all`` parameters, or ``positions`` (the
  position updaters only), which keeps the categorical heads and the shared trunk fixed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fdc_mol.fdc.flow import LinearSchedule, Trajectory
from flowmol_ext.batch import MolBatch, Molecule
from flowmol_ext.graph import Graph, build_graph, remove_com
from flowmol_ext.model.flow import FlowMol
from flowmol_ext.model.sampler import SamplerConfig, sample_batch, sample_n_atoms

TRAINABLE = ("all", "positions")


@dataclass
class DiscreteStates:
    """Atom types, charges and bonds (long, incl. mask tokens) at every grid time: lists of T+1 tensors."""

    a: list[Tensor]
    c: list[Tensor]
    e: list[Tensor]


class FlowMolFlow(nn.Module):
    """FlowMol as a FlowModel. ``sizes`` draws molecule sizes (histogram) unless ``n_atoms`` fixes them."""

    def __init__(self, model: FlowMol, sampler: SamplerConfig | None = None, n_atoms: int | None = None,
                 trainable: str = "all") -> None:
        super().__init__()
        if trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
        self.model = model
        self.sampler = (sampler or SamplerConfig()).model_copy(update={"position_sampler": "sde"})
        self.n_atoms = n_atoms
        self.trainable = trainable
        self.schedule = LinearSchedule()
        self._apply_trainable()

    def _apply_trainable(self) -> None:
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.trainable == "all" or "node_position_updaters" in name)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # -- sampling ---------------------------------------------------------------------------------
    def draw_sizes(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        if self.n_atoms is not None:
            return torch.full((n,), int(self.n_atoms), dtype=torch.long)
        hist = (self.model.metadata or {}).get("n_atoms_hist")
        if hist is None:
            raise ValueError("the model carries no atom-count histogram; set n_atoms")
        cpu_gen = None
        if generator is not None:
            cpu_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator,
                                                                      device=generator.device)))
        return sample_n_atoms(torch.as_tensor(hist), n, cpu_gen)

    @torch.no_grad()
    def sample(self, n: int, steps: int, *, memoryless: bool = True, record: bool = True,
               generator: torch.Generator | None = None, sizes: Tensor | None = None) -> Trajectory:
        """n molecules on a grid of ``steps`` steps: memoryless SDE (or Euler ODE) for positions, CTMC jumps.

        Wraps :func:`flowmol_ext.model.sampler.sample_batch` (recording every state). ``sizes`` (n,) fixes the
        atom counts (e.g. the same sizes for every evaluation of a run, so that extensive quantities such as
        total energies are compared at matched sizes)."""
        if n < 1 or steps < 1:
            raise ValueError(f"sample needs n >= 1 and steps >= 1, got n={n}, steps={steps}")
        cfg = self.sampler.model_copy(update={"steps": steps, "position_sampler": "sde" if memoryless else "ode"})
        if sizes is None:
            sizes = self.draw_sizes(n, generator)
        elif sizes.numel() != n:
            raise ValueError(f"sizes has {sizes.numel()} entries for {n} molecules")
        was_training = self.model.training
        self.model.eval()
        res = sample_batch(self.model, sizes, cfg, generator=generator, record=record)
        self.model.train(was_training)
        graph = res.batch.graph
        disc = None
        if record:
            disc = DiscreteStates([s.a for s in res.states], [s.c for s in res.states], [s.e for s in res.states])
        h = 1.0 / steps
        return Trajectory(
            times=res.times, xs=torch.stack([s.x for s in res.states]) if record else None, x1=res.batch.x, n=n,
            discrete=disc, context={"graph": graph, "final": res.batch}, group=graph.node_graph,
            sigmas=self.schedule.sigma(res.times, h) if memoryless else None,
        )

    # -- the drift --------------------------------------------------------------------------------
    def velocity(self, x: Tensor, t: float | Tensor, step_index: int, traj: Trajectory | None) -> Tensor:
        """v(x, t) = α'/(1−α)(x̂₁ − x) with the discrete state of step ``step_index`` of ``traj``. (N, 3) Å/unit t."""
        if traj is None or traj.discrete is None:
            raise ValueError("FlowMolFlow.velocity needs a recorded trajectory (its discrete states)")
        graph: Graph = traj.context["graph"]
        d: DiscreteStates = traj.discrete
        tt = float(t)
        t_vec = torch.full((graph.num_graphs,), tt, device=x.device)
        pred = self.model.predict(x, d.a[step_index], d.c[step_index], d.e[step_index], t_vec, graph,
                                  apply_softmax=False, remove_com=True)
        return (pred.x1 - x) / max(1.0 - tt, 1e-6)

    @torch.no_grad()
    def replay_positions(self, ref: Trajectory) -> Tensor:
        """Final positions (N, 3) Å of this model's Euler ODE along the recorded discrete states of ``ref``.

        Starts from ref's initial positions and, at step k, evaluates this network with ref's atom types, charges
        and bonds of step k: the molecules (graphs) are those of ``ref``, only the geometry is this model's. For
        the model that sampled ``ref`` with the ODE it reproduces ref.x1 (float rounding). Used to compare a
        fine-tuned model with its base on identical molecules (positions-only fine-tuning moves geometry; the
        CTMC jumps that follow new positions change most graphs and would otherwise mask it)."""
        if ref.xs is None or ref.discrete is None:
            raise ValueError("replay_positions needs a recorded trajectory (sample with record=True)")
        was_training = self.model.training
        self.model.eval()
        x = ref.xs[0]
        for k in range(ref.steps):
            t, dt = float(ref.times[k]), float(ref.times[k + 1] - ref.times[k])
            x = x + dt * self.velocity(x, t, k, ref)
        self.model.train(was_training)
        return x

    def select(self, traj: Trajectory, keep: Tensor) -> Trajectory:
        """The molecules of a recorded ``traj`` where ``keep`` (n,) bool is True, with their own graph.

        Molecules are independent in the network (messages run inside each molecule), so the velocity of the
        selection equals the rows of the full batch's velocity up to float rounding. ``context`` holds the graph
        only (no final MolBatch)."""
        if traj.xs is None or traj.discrete is None:
            raise ValueError("select needs a recorded trajectory (sample with record=True)")
        keep = keep.to(device=traj.x1.device, dtype=torch.bool)
        if keep.shape != (traj.n,):
            raise ValueError(f"keep must have shape ({traj.n},), got {tuple(keep.shape)}")
        graph: Graph = traj.context["graph"]
        nodes, edges = keep[graph.node_graph], keep[graph.edge_graph]
        sub = build_graph(graph.n_atoms[keep.to(graph.n_atoms.device)], device=traj.x1.device)
        d: DiscreteStates = traj.discrete
        disc = DiscreteStates([a[nodes] for a in d.a], [c[nodes] for c in d.c], [e[edges] for e in d.e])
        return Trajectory(times=traj.times, xs=traj.xs[:, nodes], x1=traj.x1[nodes], n=int(keep.sum()),
                          discrete=disc, context={"graph": sub}, group=sub.node_graph, sigmas=traj.sigmas)

    def project(self, v: Tensor, traj: Trajectory | None) -> Tensor:
        if traj is None:
            raise ValueError("project needs the trajectory (its molecule grouping)")
        return remove_com(v, traj.group, traj.n)

    def score(self, x: Tensor, t: float, traj: Trajectory | None = None) -> Tensor:
        """s = (v − κ_t x)/η_t ([AM] Eq. 8), evaluated at the last recorded discrete state."""
        if not 0.0 < float(t) < 1.0:
            raise ValueError(f"score needs 0 < t < 1, got t={t}")
        if traj is None:
            raise ValueError("score needs a recorded trajectory")
        tt = torch.tensor(float(t))
        v = self.velocity(x, float(t), traj.steps, traj)
        return (v - self.schedule.kappa(tt) * x) / self.schedule.eta(tt)

    def copy_frozen(self) -> FlowMolFlow:
        other = copy.deepcopy(self)
        for p in other.parameters():
            p.requires_grad_(False)
        other.model.eval()
        return other

    # -- molecules ----------------------------------------------------------------------------------
    @staticmethod
    def molecules(traj: Trajectory, x: Tensor | None = None) -> list[Molecule]:
        """The final molecules of a trajectory (positions ``x`` if given, else traj.x1)."""
        final: MolBatch = traj.context["final"]
        return final.replace(x=(traj.x1 if x is None else x).detach()).to_molecules()

"""Sampling: Euler ODE or memoryless SDE for positions, CTMC jumps for types, charges and bonds.

Time runs from t = 0 (prior: Gaussian positions, every token masked) to t = 1 (data) on a uniform
grid of ``steps`` intervals. Positions stay in each molecule's zero-COM subspace: x̂₁ is re-centred
and SDE noise is projected per molecule.

Memoryless SDE (adjoint matching, reference/fdc.md §4): with the linear schedule α = t,
    x ← x + h·(2v − α'/(α+h)·x) + √h·σ·ε,   σ² = 2α'(1−α)/(α+h),   v = α'/(1−α)·(x̂₁ − x),
where α + h in the denominators keeps t = 0 finite (as the FlowMol fork of the FDC authors does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from flowmol_ext import CHARGE_OFFSET
from flowmol_ext.batch import MolBatch
from flowmol_ext.config import StrictModel
from flowmol_ext.graph import Graph, build_graph, lower_from_upper, remove_com
from flowmol_ext.model.ctmc import ctmc_step
from flowmol_ext.model.interpolants import alpha, alpha_prime, centered_normal_prior


class SamplerConfig(StrictModel):
    """How to integrate the flow. Defaults follow FlowMol2's published CTMC settings at 100 steps."""

    steps: int = 100
    position_sampler: str = "ode"  # "ode" (Euler) or "sde" (memoryless, for adjoint matching)
    stochasticity: float = 30.0  # CTMC η (re-masking rate); FlowMol README: 30 for published numbers
    temperature: float = 0.05  # CTMC tempering of the predicted categorical distributions
    hc_thresh: float = 0.9  # purity sampling threshold (0 disables)
    batch_size: int = 100  # molecules per forward pass

    def model_post_init(self, __context: object) -> None:
        if self.steps < 1:
            raise ValueError(f"sampler.steps must be >= 1, got {self.steps}")
        if self.position_sampler not in ("ode", "sde"):
            raise ValueError(f"sampler.position_sampler must be 'ode' or 'sde', got {self.position_sampler!r}")
        if self.temperature <= 0:
            raise ValueError(f"sampler.temperature must be > 0, got {self.temperature}")


@dataclass
class SampleState:
    """A CTMC/flow state at one grid time: x (N,3) Å, a/c (N,), e (E,) long incl. mask tokens."""

    x: Tensor
    a: Tensor
    c: Tensor
    e: Tensor


@dataclass
class SampleResult:
    """Final molecules, plus the recorded states per grid time when ``record=True``."""

    batch: MolBatch
    times: Tensor  # (steps+1,)
    states: list[SampleState] = field(default_factory=list)
    noise: list[Tensor] = field(default_factory=list)  # SDE noise ε per step (projected), when recorded


def randn_like_on(ref: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``ref``, drawn on the generator's device, moved to ref's."""
    gen_device = generator.device if generator is not None else ref.device
    return torch.randn(ref.shape, generator=generator, device=gen_device, dtype=ref.dtype).to(ref.device)


def memoryless_sigma(t: float, h: float) -> float:
    """σ(t) of the memoryless SDE for the linear schedule, safe at t = 0 (uses α + h)."""
    a = float(alpha(torch.tensor(t)))
    ap = float(alpha_prime(torch.tensor(t)))
    return (2.0 * ap * max(1.0 - a, 0.0) / (a + h)) ** 0.5


def sample_n_atoms(histogram: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw n molecule sizes from an atom-count histogram (counts indexed by atom count)."""
    probs = histogram.double().clamp(min=0)
    if probs.sum() <= 0:
        raise ValueError("the atom-count histogram is empty")
    return torch.multinomial(probs / probs.sum(), n, replacement=True, generator=generator)


def initial_state(model, graph: Graph, generator: torch.Generator | None = None) -> SampleState:  # noqa: ANN001
    """The prior: COM-free Gaussian positions, every token masked."""
    ma, mc, me = model.mask_index
    device = graph.src.device
    x = centered_normal_prior(graph, generator=generator).to(device)
    n, e = graph.num_nodes, graph.src.numel()
    return SampleState(
        x=x,
        a=torch.full((n,), ma, dtype=torch.long, device=device),
        c=torch.full((n,), mc, dtype=torch.long, device=device),
        e=torch.full((e,), me, dtype=torch.long, device=device),
    )


def flow_step(
    model,  # noqa: ANN001 - a flowmol_ext.model.flow.FlowMol
    state: SampleState,
    graph: Graph,
    t: float,
    dt: float,
    cfg: SamplerConfig,
    last_step: bool,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> tuple[SampleState, Tensor | None]:
    """One grid step t → t + dt for the whole batch. Returns the new state and the SDE noise used."""
    ma, mc, me = model.mask_index
    t_vec = torch.full((graph.num_graphs,), t, device=state.x.device)
    pred = model.predict(state.x, state.a, state.c, state.e, t_vec, graph, apply_softmax=True, remove_com=True)
    a_t = float(alpha(torch.tensor(t)))
    ap_t = float(alpha_prime(torch.tensor(t)))
    v = ap_t / max(1.0 - a_t, 1e-12) * (pred.x1 - state.x)
    used_noise = None
    if cfg.position_sampler == "ode":
        x_new = state.x + dt * v
    else:
        sigma = memoryless_sigma(t, dt)
        if noise is None:
            noise = randn_like_on(state.x, generator)
            noise = remove_com(noise, graph.node_graph, graph.num_graphs)
        used_noise = noise
        x_new = state.x + dt * (2.0 * v - ap_t / (a_t + dt) * state.x) + (dt**0.5) * sigma * noise
        x_new = remove_com(x_new, graph.node_graph, graph.num_graphs)
    common = dict(t=t, dt=dt, eta=cfg.stochasticity, temperature=cfg.temperature, last_step=last_step,
                  hc_thresh=cfg.hc_thresh, generator=generator)
    a_new = ctmc_step(state.a, pred.a, mask_index=ma, group=graph.node_graph, **common).state
    c_new = ctmc_step(state.c, pred.c, mask_index=mc, group=graph.node_graph, **common).state
    up, _ = graph.upper_lower_index()
    e_up = ctmc_step(state.e.index_select(0, up), pred.e, mask_index=me, group=graph.edge_graph.index_select(0, up),
                     **common).state
    return SampleState(x=x_new, a=a_new, c=c_new, e=lower_from_upper(e_up, graph)), used_noise


def finalize(state: SampleState, graph: Graph, model) -> MolBatch:  # noqa: ANN001
    """Turn the last state into a MolBatch; tokens still masked become: bond → none, charge → neutral.

    A still-masked atom type keeps the mask index, which chemistry code reports as invalid (FlowMol
    decodes it as Se). With the linear schedule every token is unmasked on the last step.
    """
    _, mc, me = model.mask_index
    c = torch.where(state.c == mc, torch.full_like(state.c, CHARGE_OFFSET), state.c)
    e = torch.where(state.e == me, torch.zeros_like(state.e), state.e)
    return MolBatch(x=state.x, a=state.a, c=c, e=e, graph=graph)


@torch.no_grad()
def sample_batch(
    model,  # noqa: ANN001
    n_atoms: Tensor | list[int],
    cfg: SamplerConfig,
    generator: torch.Generator | None = None,
    record: bool = False,
    device: torch.device | str | None = None,
) -> SampleResult:
    """Sample one batch of molecules of the given sizes."""
    device = device or next(model.parameters()).device
    graph = build_graph(n_atoms).to(device)
    state = initial_state(model, graph, generator)
    times = torch.linspace(0.0, 1.0, cfg.steps + 1)
    states = [state] if record else []
    noises: list[Tensor] = []
    for i in range(cfg.steps):
        t, s = float(times[i]), float(times[i + 1])
        state, noise = flow_step(model, state, graph, t, s - t, cfg, last_step=(i == cfg.steps - 1),
                                 generator=generator)
        if record:
            states.append(state)
            if noise is not None:
                noises.append(noise)
    return SampleResult(batch=finalize(state, graph, model), times=times, states=states, noise=noises)


def sample_molecules(
    model,  # noqa: ANN001
    n: int,
    cfg: SamplerConfig,
    n_atoms: int | Tensor | None = None,
    seed: int | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> list:
    """Sample n molecules in batches of ``cfg.batch_size``; sizes from the model's training histogram
    (``model.metadata['n_atoms_hist']``) unless ``n_atoms`` fixes them. Returns list[Molecule]."""
    from tqdm.auto import tqdm

    if n < 1:
        raise ValueError(f"number of molecules must be >= 1, got {n}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    size_gen = torch.Generator().manual_seed(seed) if seed is not None else None
    # Flow randomness is drawn on the model's device so CPU and CUDA runs are each reproducible.
    gen = torch.Generator(device=device).manual_seed(seed + 1) if seed is not None else None
    if n_atoms is None:
        hist = (getattr(model, "metadata", None) or {}).get("n_atoms_hist")
        if hist is None:
            raise ValueError("the model carries no atom-count histogram; pass n_atoms explicitly")
        sizes = sample_n_atoms(torch.as_tensor(hist), n, size_gen)
    elif isinstance(n_atoms, int):
        sizes = torch.full((n,), n_atoms, dtype=torch.long)
    else:
        sizes = torch.as_tensor(n_atoms, dtype=torch.long)
        if sizes.numel() != n:
            raise ValueError(f"n_atoms has {sizes.numel()} entries for {n} molecules")
    if int(sizes.min()) < 1:
        raise ValueError("every molecule needs at least one atom")
    out = []
    was_training = model.training
    model.eval()
    chunks = torch.split(sizes, cfg.batch_size)
    for chunk in tqdm(chunks, desc="sampling", unit="batch", disable=not progress):
        res = sample_batch(model, chunk, cfg, generator=gen, device=device)
        out.extend(res.batch.to_molecules())
    model.train(was_training)
    return out

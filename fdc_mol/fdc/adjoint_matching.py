"""Adjoint Matching ([AM], Domingo-Enrich et al.) with the paper's sign, as the FDC inner solver.

One step (fdc.md §4.2):
1. sample trajectories of the *fine* model with the memoryless SDE, recording every state;
2. lean adjoint with the *base* model: ã_T = −∇g(X_1) (g already carries 1/η), and for k = T−1..1
   ã_k = ã_{k+1} + h ∇ₓ[ã_{k+1} · b_base(X_k, t_k)],  b = 2v − α'/(α+h) x
   (a vector–Jacobian product; this is the exact adjoint of the Euler map, so the base velocity is
   never evaluated at t = 1 where endpoint-parametrised flows are singular);
3. loss L = mean_batch Σ_{k∈S} ‖(2/σ_k)(v_fine − v_base)(X_k, t_k) + σ_k ã_k‖², each (sample, timestep)
   term clipped at LCT·λ² ([AM]); the minimiser v_fine − v_base = −σ²ã/2 = +(σ²/2)∇g moves *up* g;
4. S = the last 25 % of the grid (data end) plus a random 25 % of the rest; t = 0 (σ = ∞) is never used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from flowmol_ext.config import StrictModel

from .flow import FlowModel, Trajectory, per_sample_sqnorm
from .sharding import balanced_shards, run_in_threads, sample_costs

__all__ = [
    "AMConfig",
    "AMStepOutput",
    "TerminalGradFn",
    "timestep_subset",
    "lean_adjoint",
    "am_loss",
    "am_loss_for_trajectory",
    "am_step_loss",
    "am_step",
]

TerminalGradFn = Callable[[Tensor, Trajectory], Tensor]


class AMConfig(StrictModel):
    """Adjoint-matching inner-solver settings."""

    n_traj: int = Field(64, ge=1, description="trajectories sampled per optimizer step")
    steps: int = Field(40, ge=2, description="Euler–Maruyama steps T of the memoryless SDE")
    final_frac: float = Field(0.25, ge=0.0, le=1.0, description="fraction of the grid at the data end always used")
    random_frac: float = Field(0.25, ge=0.0, le=1.0, description="fraction of the remaining times drawn at random")
    lct: float | None = Field(1.6, gt=0.0, description="loss clip LCT: each term is clipped at LCT·λ²; null = off")
    grad_clip_norm: float | None = Field(None, gt=0.0, description="optional clip of the parameter-gradient norm")
    shards: int = Field(1, ge=1, description="split the molecules over this many Python threads (one torch thread "
                        "each) for the lean adjoint and the loss; same result to float rounding (2 on 2 cores: "
                        "bench/bench_shard_threads.py)")


def timestep_subset(
    steps: int, final_frac: float = 0.25, random_frac: float = 0.25, generator: torch.Generator | None = None
) -> Tensor:
    """Grid indices k in 1..T−1 used in the loss: the last ⌈final_frac·(T−1)⌉ plus a random share of the rest.

    Index k is time t_k = k/T; k = 0 (t = 0, σ = ∞) and k = T (t = 1, σ = 0) are excluded. Sorted (m,) long.
    """
    if steps < 2:
        raise ValueError(f"timestep_subset needs steps >= 2, got {steps}")
    valid = torch.arange(1, steps)
    n_final = min(valid.numel(), max(1, math.ceil(final_frac * valid.numel())))
    final = valid[valid.numel() - n_final :]
    rest = valid[: valid.numel() - n_final]
    n_rand = int(round(random_frac * rest.numel()))
    if n_rand > 0:
        perm = torch.randperm(rest.numel(), generator=generator)[:n_rand]
        chosen = torch.cat([rest[perm], final])
    else:
        chosen = final
    return chosen.sort().values


def _sample_rows(traj: Trajectory, keep: Tensor) -> Tensor:
    """(N,) bool: the rows (atoms, or samples when ``traj.group`` is None) of the samples where ``keep`` (n,)."""
    return keep if traj.group is None else keep[traj.group]


def lean_adjoint(
    base: FlowModel,
    traj: Trajectory,
    terminal_grad: Tensor,
    running_grad_fn: Callable[[Tensor, float], Tensor] | None = None,
    *,
    v_base_steps: Tensor | None = None,
    shards: int = 1,
) -> tuple[Tensor, Tensor]:
    """Lean adjoint ã_k (k = 0..T) and the base velocities v_base(X_k, t_k) on a recorded trajectory.

    terminal_grad: ∇g(X_1), shape like traj.x1 (already scaled by 1/η). Returns (adj, v_base), both
    (T+1, N, ...), detached; entries at k = 0 are zero (never used). The adjoint is projected by
    ``base.project`` at every step. running_grad_fn(x, t) -> ∇f(x, t) adds a running cost −h ∇f.

    Samples whose terminal gradient is zero (no reward signal: failed the gate, or outside the tail the
    utility weights) have ã ≡ 0 at every step when there is no running cost, because the recursion is linear
    in ã. When ``base`` offers ``select(traj, keep)`` (samples are independent in its velocity), the
    vector–Jacobian products run on the samples with signal only, and the others get a forward pass of the
    base model without gradients at the steps in ``v_base_steps`` (default: every step 1..T−1); their v_base
    rows at other steps are left 0. With signal in every sample, or without ``select``, it is the full-batch
    recursion. The two agree to float rounding (tests/fdc_mol/fdc/test_am_speed_equivalence.py).

    ``shards`` > 1 (with ``select`` and no running cost) splits the molecules into that many groups of near-equal
    cost and runs each group's recursion (and no-gradient forward) in its own Python thread
    (:mod:`fdc_mol.fdc.sharding`); the result is the same to float rounding.
    """
    if traj.xs is None:
        raise ValueError("lean_adjoint needs a recorded trajectory (sample with record=True)")
    signal = per_sample_sqnorm(terminal_grad.detach(), traj) != 0  # NaN rows count as signal (they propagate)
    select = getattr(base, "select", None)
    n_signal = int(signal.sum())
    if running_grad_fn is not None or select is None:
        return _lean_adjoint_full(base, traj, terminal_grad, running_grad_fn)
    if n_signal == traj.n and shards == 1:
        return _lean_adjoint_full(base, traj, terminal_grad, None)
    adj = torch.zeros_like(traj.xs)
    v_base = torch.zeros_like(traj.xs)
    costs = sample_costs(traj)
    signal_cpu = signal.cpu()

    def adjoint_part(keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        rows = _sample_rows(traj, keep.to(signal.device))
        adj_s, v_s = _lean_adjoint_full(base, select(traj, keep), terminal_grad[rows], None)
        return rows, adj_s, v_s

    for rows, adj_s, v_s in run_in_threads(adjoint_part, balanced_shards(costs, shards, signal_cpu)):
        adj[:, rows] = adj_s
        v_base[:, rows] = v_s
    steps = range(1, traj.steps) if v_base_steps is None else [int(k) for k in v_base_steps.tolist()]

    def forward_part(keep: Tensor) -> tuple[Tensor, list[Tensor]]:
        rows = _sample_rows(traj, keep.to(signal.device))
        sub = select(traj, keep)
        with torch.no_grad():
            return rows, [base.velocity(sub.xs[k], float(traj.times[k]), k, sub) for k in steps]

    for rows, vs in run_in_threads(forward_part, balanced_shards(costs, shards, ~signal_cpu)):
        for k, v in zip(steps, vs):
            v_base[k, rows] = v
    return adj, v_base


def _lean_adjoint_full(
    base: FlowModel,
    traj: Trajectory,
    terminal_grad: Tensor,
    running_grad_fn: Callable[[Tensor, float], Tensor] | None,
) -> tuple[Tensor, Tensor]:
    """The lean-adjoint recursion on the whole batch (see :func:`lean_adjoint`)."""
    T = traj.steps
    h = 1.0 / T
    sched = base.schedule
    adj = torch.zeros_like(traj.xs)
    v_base = torch.zeros_like(traj.xs)
    a = -base.project(terminal_grad.detach(), traj)
    adj[T] = a
    for k in range(T - 1, 0, -1):
        t = float(traj.times[k])
        with torch.enable_grad():
            x = traj.xs[k].detach().requires_grad_(True)
            v = base.velocity(x, t, k, traj)
            b = 2.0 * v - sched.kappa(torch.tensor(t), h) * x
            (vjp,) = torch.autograd.grad(b, x, grad_outputs=a)
        a = a + h * vjp.detach()
        if running_grad_fn is not None:
            a = a - h * running_grad_fn(traj.xs[k], t).detach()
        a = base.project(a, traj)
        adj[k] = a
        v_base[k] = v.detach()
    return adj, v_base


def am_loss(
    v_fine: Tensor, v_base: Tensor, adj: Tensor, sigma: float | Tensor, traj: Trajectory, clip: float | None
) -> Tensor:
    """Per-sample AM loss at one timestep: ‖(2/σ)(v_fine − v_base) + σ ã‖², clipped at ``clip``. -> (n,)."""
    sigma = torch.as_tensor(sigma, dtype=v_fine.dtype)
    resid = (2.0 / sigma) * (v_fine - v_base) + sigma * adj
    term = per_sample_sqnorm(resid, traj)
    if clip is not None:
        term = term.clamp(max=clip)
    return term


def am_loss_for_trajectory(
    fine: FlowModel,
    traj: Trajectory,
    adj: Tensor,
    v_base: Tensor,
    indices: Tensor,
    *,
    clip: float | None = None,
    shards: int = 1,
    diagnostics: dict[str, float] | None = None,
) -> Tensor:
    """Differentiable scalar loss mean_batch Σ_{k ∈ indices} of :func:`am_loss` on one recorded trajectory.

    Pure: no sampling and no optimizer; usable inside a Lightning training_step.

    When gradients are enabled and ``fine`` is an ``nn.Module``, the parameter gradient is computed here,
    one timestep at a time (forward, backward, free), so memory stays at one network graph instead of
    ``len(indices)`` graphs; the returned loss carries that gradient (``loss.backward()`` puts
    Σ_k ∂L_k/∂θ, times the incoming gradient, into the trainable parameters' ``.grad``). Its value and
    gradient equal the all-graphs-at-once form up to float rounding (the order of the Σ_k accumulation).

    ``shards`` > 1 (when ``fine`` offers ``select``) computes the loss of each of that many groups of molecules in
    its own Python thread and returns Σ_s (n_s/n) L_s, the same mean (:mod:`fdc_mol.fdc.sharding`).

    ``diagnostics`` (a dict, updated in place) accumulates the two parts of the residual (2/σ)(v_fine − v_base) + σã
    over the loss timesteps, summed over molecules: ``control_sq`` += Σ_i Σ_k ‖(2/σ_k)(v_fine − v_base)‖² and
    ``target_sq`` += Σ_i Σ_k ‖σ_k ã_k‖² (per-atom vectors, squared units of the state per unit time). At each
    sample's minimiser the two are equal.
    """
    if traj.xs is None:
        raise ValueError("am_loss_for_trajectory needs a recorded trajectory")
    select = getattr(fine, "select", None)
    if shards > 1 and select is not None and traj.n > 1:
        def part(keep: Tensor) -> tuple[Tensor, dict[str, float]]:
            rows = _sample_rows(traj, keep.to(traj.x1.device))
            diag_s: dict[str, float] = {}
            loss_s = am_loss_for_trajectory(fine, select(traj, keep), adj[:, rows], v_base[:, rows], indices,
                                            clip=clip, diagnostics=diag_s)
            return loss_s * (int(keep.sum()) / traj.n), diag_s

        parts = run_in_threads(part, balanced_shards(sample_costs(traj), shards))
        if diagnostics is not None:  # each thread filled its own dict; merged here, in shard order
            for _, diag_s in parts:
                for key, val in diag_s.items():
                    diagnostics[key] = diagnostics.get(key, 0.0) + val
        return sum((loss_s for loss_s, _ in parts), adj.new_zeros(()))
    h = 1.0 / traj.steps
    ks = indices.tolist()
    for k in ks:
        if not 1 <= k <= traj.steps - 1:
            raise ValueError(f"timestep index {k} outside 1..{traj.steps - 1} (t = 0 and t = 1 are excluded)")

    def term(k: int) -> Tensor:
        t = float(traj.times[k])
        sigma = fine.schedule.sigma(torch.tensor(t), h)
        v = fine.velocity(traj.xs[k].detach(), t, k, traj)
        if diagnostics is not None:
            with torch.no_grad():
                sig = torch.as_tensor(sigma, dtype=v.dtype)
                control = float(per_sample_sqnorm((2.0 / sig) * (v.detach() - v_base[k]), traj).sum())
                target = float(per_sample_sqnorm(sig * adj[k], traj).sum())
            diagnostics["control_sq"] = diagnostics.get("control_sq", 0.0) + control
            diagnostics["target_sq"] = diagnostics.get("target_sq", 0.0) + target
        return am_loss(v, v_base[k], adj[k], sigma, traj, clip)

    total = torch.zeros(traj.n, dtype=traj.xs.dtype, device=traj.xs.device)
    params = ([p for p in fine.parameters() if p.requires_grad]
              if torch.is_grad_enabled() and isinstance(fine, torch.nn.Module) else [])
    if not params:  # no trainable parameters (or no autograd): the plain graph
        for k in ks:
            total = total + term(k)
        return total.mean()
    grads: list[Tensor | None] = [None] * len(params)
    for k in ks:
        loss_k = term(k)
        # d mean_i(Σ_k L_k,i) / d L_k,i = 1/n, as the mean's backward hands to every term.
        g_k = torch.autograd.grad(loss_k, params, grad_outputs=torch.full_like(loss_k, 1.0 / traj.n),
                                  allow_unused=True)
        grads = [g if acc is None else (acc if g is None else acc.add_(g)) for acc, g in zip(grads, g_k)]
        total = total + loss_k.detach()
    value = total.mean()
    # value + (s − s.detach()) has the value of ``value`` and gradient Σ_k ∂L_k/∂θ in every parameter.
    surrogate = sum(((p * g).sum() for p, g in zip(params, grads) if g is not None), value.new_zeros(()))
    return value + (surrogate - surrogate.detach())


def _same_parameters(fine: FlowModel, base: FlowModel) -> bool:
    """True when ``fine`` and ``base`` hold identical parameter values (e.g. right after ``copy_frozen``)."""
    if fine is base:
        return True
    pf, pb = list(fine.parameters()), list(base.parameters())
    return len(pf) == len(pb) and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(pf, pb))


@dataclass
class AMStepOutput:
    """One adjoint-matching step before the optimizer: the differentiable loss and what to log.

    metrics: loss; terminal_grad_norm (mean per-sample ‖∇g/η‖); n_traj; n_signal (trajectories whose terminal
    gradient is non-zero, e.g. scored and in the SQ tail); n_scored (trajectories with a finite reward, when the
    terminal-gradient function reports it in ``traj.extras['n_scored']``); control_rms and target_rms, the RMS over
    molecules of √Σ_k ‖(2/σ_k)(v_fine − v_base)‖² and √Σ_k ‖σ_k ã_k‖² on the loss timesteps. control_rms is 0 at
    fine ≡ base and grows with each optimizer step's length. target_rms is the per-sample target, mostly noise that
    no model can fit (the loss's minimiser matches its conditional mean), so the two are not compared one to one:
    a step that overshoots shows as a jump of param_grad_norm after a stage's first step
    (``docs/results/adam_overshoot/README.md``; ``tools/am_step_size.py`` measures the right length).
    """

    loss: Tensor
    metrics: dict[str, float]


def am_step_loss(
    fine: FlowModel,
    base: FlowModel,
    terminal_grad_fn: TerminalGradFn,
    cfg: AMConfig,
    *,
    lam: float = 1.0,
    generator: torch.Generator | None = None,
    timestep_generator: torch.Generator | None = None,
) -> AMStepOutput:
    """THE adjoint-matching step (fdc.md §4.2) up to the loss: sample → lean adjoint → loss.

    Samples ``cfg.n_traj`` trajectories of ``fine`` with the memoryless SDE (recorded), evaluates the terminal
    gradient ∇g(x1) (NaN → 0), runs the lean adjoint through ``base`` and returns the differentiable loss on
    the timestep subset, each term clipped at LCT·λ². Used by :func:`am_step` (a plain optimizer) and by the
    molecular LightningModule (Lightning's optimizer), so both run exactly this code.
    """
    traj = fine.sample(cfg.n_traj, cfg.steps, memoryless=True, record=True, generator=generator)
    g = terminal_grad_fn(traj.x1.detach(), traj)
    if g.shape != traj.x1.shape:
        raise ValueError(f"terminal_grad_fn returned shape {tuple(g.shape)}, expected {tuple(traj.x1.shape)}")
    g = torch.nan_to_num(g, nan=0.0)
    idx = timestep_subset(cfg.steps, cfg.final_frac, cfg.random_frac,
                          timestep_generator if timestep_generator is not None else generator)
    # v_base is needed only on the loss timesteps: samples without signal get no adjoint pass at all.
    adj, v_base = lean_adjoint(base, traj, g, v_base_steps=idx, shards=cfg.shards)
    clip = None if cfg.lct is None else cfg.lct * lam**2
    gnorm = per_sample_sqnorm(g, traj).sqrt()
    signal = gnorm != 0
    n_signal = int(signal.sum())
    diag: dict[str, float] = {"control_sq": 0.0, "target_sq": 0.0}
    if 0 < n_signal < traj.n and hasattr(fine, "select") and _same_parameters(fine, base):
        # fine ≡ base (the first step of every stage): v_fine − v_base ≡ 0 and ã ≡ 0 for the samples without
        # signal, so their loss terms, parameter gradients and diagnostics are exactly 0; the batch mean keeps 1/n.
        rows = _sample_rows(traj, signal)
        sub = fine.select(traj, signal)
        loss = am_loss_for_trajectory(fine, sub, adj[:, rows], v_base[:, rows], idx, clip=clip,
                                      shards=cfg.shards, diagnostics=diag) * (n_signal / traj.n)
    else:
        loss = am_loss_for_trajectory(fine, traj, adj, v_base, idx, clip=clip, shards=cfg.shards, diagnostics=diag)
    metrics = {"loss": float(loss.detach()), "terminal_grad_norm": float(gnorm.mean()), "n_traj": float(traj.n),
               "n_signal": float(n_signal), "control_rms": math.sqrt(diag["control_sq"] / traj.n),
               "target_rms": math.sqrt(diag["target_sq"] / traj.n)}
    if "n_scored" in traj.extras:
        metrics["n_scored"] = float(traj.extras["n_scored"])
    return AMStepOutput(loss=loss, metrics=metrics)


def am_step(
    fine: FlowModel,
    base: FlowModel,
    terminal_grad_fn: TerminalGradFn,
    cfg: AMConfig,
    optimizer: torch.optim.Optimizer,
    *,
    lam: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """One adjoint-matching optimizer step: :func:`am_step_loss`, backward, optional norm clip, step.

    ``lam`` (λ, the reward scale) sets the clip LCT·λ². terminal_grad_fn(x1, traj) -> ∇g(x1) like x1.
    Returns the metrics of :class:`AMStepOutput` plus ``param_grad_norm`` (before clipping).
    """
    optimizer.zero_grad(set_to_none=True)
    out = am_step_loss(fine, base, terminal_grad_fn, cfg, lam=lam, generator=generator)
    out.loss.backward()
    params = [p for p in fine.parameters() if p.requires_grad]
    max_norm = cfg.grad_clip_norm if cfg.grad_clip_norm is not None else float("inf")
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    return {**out.metrics, "param_grad_norm": float(total)}

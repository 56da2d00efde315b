"""The ONE FDC outer loop ([FDC] Algorithm 1), shared by the 2-D settings and by molecules.

For k = 1..K:
1. build the fit context at p_{k−1} (samples of the current model, their rewards; ``fit_context`` hook);
2. fit the objective's first variation there (quantiles, densities, critics: :class:`Objective`);
3. hand the stage (terminal gradient ∇g_k/η_k projected by the model, λ = grad_scale/η_k, AM steps) to
   the inner solver, which fine-tunes π_k from the frozen copy π_{k−1} (adjoint matching);
4. evaluate π_k (``evaluate`` hook) and store the stage (model, solver/optimizer state, metrics).

Plain adjoint matching with KL weight α is the special case K = 1, G = E[r], η = α (p ∝ p_pre e^{r/α}).

Every stage draws its randomness from its own seed (seed, k), and the stage store keeps the model and the
inner solver's state (the optimizer carried across iterations, as the paper's code does), so a run killed
after stage k and resumed gives the same numbers as an uninterrupted run. A finished run is not re-run.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from flowmol_ext.io_utils import atomic_torch_save, atomic_write_text

from .adjoint_matching import AMConfig, TerminalGradFn, am_step
from .divergences import Objective
from .flow import FlowModel, Trajectory
from .utilities import FitContext, Fitted, RewardOracle

__all__ = [
    "constant_eta",
    "harmonic_eta",
    "Stage",
    "InnerSolver",
    "AdamAMSolver",
    "StageStore",
    "FDCResult",
    "run_outer_loop",
    "run_fdc",
    "stage_seed",
]

log = logging.getLogger("fdc_mol.fdc")

EvaluateFn = Callable[[FlowModel, int], "tuple[dict[str, Any], Any]"]
FitContextFn = Callable[[FlowModel, FlowModel, int, Any], FitContext]


def constant_eta(eta: float) -> Callable[[int], float]:
    """η_k = η (every experiment of the paper)."""
    if not eta > 0:
        raise ValueError(f"eta must be positive, got {eta}")
    return lambda k: float(eta)


def harmonic_eta(eta0: float) -> Callable[[int], float]:
    """η_k = η₀·k, i.e. step size γ_k = γ₀/k (Robbins–Monro, Thm 5.2), k = 1, 2, ..."""
    if not eta0 > 0:
        raise ValueError(f"eta0 must be positive, got {eta0}")
    return lambda k: float(eta0) * k


def stage_seed(seed: int, k: int) -> int:
    """The seed of outer iteration k of a run with ``seed`` (distinct per (seed, k), stable across resumes)."""
    return (int(seed) * 1_000_003 + int(k) * 7_919) % (2**62)


@dataclass
class Stage:
    """Outer iteration k as the inner solver sees it.

    terminal_grad(x1, traj) -> ∇g_k/η_k (like x1, already projected by the model); lam = grad_scale/η_k
    (sets AM's loss clip LCT·λ²); steps: AM optimizer steps; seed: this stage's seed.
    """

    k: int
    eta: float
    fitted: Fitted
    terminal_grad: TerminalGradFn
    lam: float
    steps: int
    seed: int


class InnerSolver(Protocol):
    """Fine-tunes ``fine`` from the frozen ``base`` toward a stage's terminal gradient (adjoint matching)."""

    def solve(self, fine: FlowModel, base: FlowModel, stage: Stage) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class AdamAMSolver:
    """AM steps in a plain loop with one Adam whose state carries over across outer iterations.

    The optimizer is created lazily on the first stage over the model's trainable parameters
    (``requires_grad``), so resuming loads its state before any step.
    """

    def __init__(self, am: AMConfig, lr: float) -> None:
        if not lr > 0:
            raise ValueError(f"learning rate must be > 0, got {lr}")
        self.am, self.lr = am, float(lr)
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending: dict[str, Any] | None = None

    def _opt(self, fine: FlowModel) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam([p for p in fine.parameters() if p.requires_grad], lr=self.lr)
            if self._pending is not None:
                self.optimizer.load_state_dict(self._pending)
                self._pending = None
        return self.optimizer

    def solve(self, fine: FlowModel, base: FlowModel, stage: Stage) -> dict[str, float]:
        opt = self._opt(fine)
        gen = torch.Generator().manual_seed(stage.seed)
        rows = [am_step(fine, base, stage.terminal_grad, self.am, opt, lam=stage.lam, generator=gen)
                for _ in range(stage.steps)]
        return {key: float(np.mean([r[key] for r in rows])) for key in (rows[0] if rows else {})}

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is not None:
            return {"optimizer": self.optimizer.state_dict()}
        return {"optimizer": self._pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        st = state.get("optimizer")
        if self.optimizer is not None and st is not None:
            self.optimizer.load_state_dict(st)
        else:
            self._pending = st


class StageStore:
    """One folder per finished outer iteration: ``run_dir/stages/stage_KKK/{state.pt, stage_done.json}``.

    ``state.pt`` holds the model's state dict and the inner solver's state; ``stage_done.json`` (written
    last, atomically) marks the stage finished and holds the metrics rows so far. ``metrics.csv`` in the
    run directory is rewritten after every stage.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def stage_dir(self, k: int) -> Path:
        return self.run_dir / "stages" / f"stage_{k:03d}"

    def last_finished(self) -> int:
        done = [int(p.parent.name.split("_")[1]) for p in (self.run_dir / "stages").glob("stage_*/stage_done.json")]
        return max(done, default=0)

    def save(self, k: int, model: FlowModel, solver: InnerSolver, metrics: list[dict[str, Any]],
             info: dict[str, Any]) -> None:
        sd = self.stage_dir(k)
        atomic_torch_save({"k": k, "model": model.state_dict(), "solver": solver.state_dict()}, sd / "state.pt")
        self.write_metrics(metrics)
        atomic_write_text(sd / "stage_done.json", json.dumps({"k": k, "info": _jsonable(info),
                                                              "metrics": _jsonable(metrics)}, indent=1))

    def load(self, k: int, model: FlowModel, solver: InnerSolver) -> list[dict[str, Any]]:
        sd = self.stage_dir(k)
        try:
            st = torch.load(sd / "state.pt", map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - a damaged stage file is reported with its path
            raise ValueError(f"cannot resume from {sd / 'state.pt'}: {type(err).__name__}: {err}; delete "
                             f"{sd} to redo that stage") from err
        model.load_state_dict(st["model"])
        solver.load_state_dict(st["solver"])
        return json.loads((sd / "stage_done.json").read_text())["metrics"]

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys and _scalar(r[k])]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.run_dir / "metrics.csv", buf.getvalue())


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if _scalar(v) or isinstance(v, (dict, list))}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return obj  # json writes NaN/Infinity for non-finite floats; Python's json reads them back


@dataclass
class FDCResult:
    """The fine-tuned model π_K, the metrics rows (iteration 0 = π_pre), and the stage a resume started after."""

    model: FlowModel
    metrics: list[dict[str, Any]]
    resumed_from: int
    info: list[dict[str, Any]] = field(default_factory=list)


def stage_terminal_grad(fitted: Fitted, eta: float, base: FlowModel) -> TerminalGradFn:
    """The stage's AM terminal gradient x1 ↦ ∇δG(x1)/η, projected by the base model (e.g. centre-of-mass free)."""

    def terminal_grad(x: Tensor, traj: Trajectory) -> Tensor:
        return base.project(fitted.grad(x, traj) / eta, traj)

    return terminal_grad


def run_outer_loop(
    model: FlowModel,
    objective: Objective,
    *,
    K: int,
    eta: Callable[[int], float] | float,
    solver: InnerSolver,
    steps_per_iter: int,
    fit_context: FitContextFn,
    seed: int = 0,
    pre: FlowModel | None = None,
    evaluate: EvaluateFn | None = None,
    store: StageStore | None = None,
    stop_after: int | None = None,
) -> FDCResult:
    """Run (or resume) Algorithm 1 on ``model`` (modified in place).

    fit_context(base, pre, k, payload) -> FitContext at p_{k−1}; ``payload`` is what ``evaluate`` returned
    for iteration k − 1 (e.g. its samples and rewards, to reuse them), or None (no evaluation, or the first
    stage after a resume). evaluate(model, k) ->
    (metrics row, payload) after iteration k (k = 0: π_pre). store: stages on disk (None: in memory only).
    pre: the frozen π_pre (default: a frozen copy of ``model`` before any resume).
    """
    if K < 1 or steps_per_iter < 0:
        raise ValueError(f"the FDC loop needs K >= 1 and steps_per_iter >= 0; got K={K}, {steps_per_iter}")
    eta_fn = constant_eta(eta) if isinstance(eta, (int, float)) else eta
    pre = pre if pre is not None else model.copy_frozen()
    metrics: list[dict[str, Any]] = []
    start = store.last_finished() if store is not None else 0
    payload: Any = None
    if start > 0:
        assert store is not None
        metrics = store.load(min(start, K), model, solver)
        log.info("resuming after finished outer iteration %d of %d (%s)", start, K, store.run_dir)
        if start >= K:
            log.info("the run in %s is finished (K=%d); nothing to do", store.run_dir, K)
            return FDCResult(model=model, metrics=metrics, resumed_from=start)
        # payload stays None: fit_context samples what it needs (the evaluation is deterministic under CRN)
    elif evaluate is not None:
        torch.manual_seed(stage_seed(seed, 0) + 1)
        row, payload = evaluate(model, 0)
        metrics.append({"iteration": 0, **row})
    infos = []
    for k in range(start + 1, K + 1):
        t0 = time.time()
        s = stage_seed(seed, k)
        torch.manual_seed(s)
        eta_k = float(eta_fn(k))
        base = model.copy_frozen()
        ctx = fit_context(base, pre, k, payload)
        fitted = objective.fit(ctx)
        lam = fitted.grad_scale / eta_k

        stage = Stage(k=k, eta=eta_k, fitted=fitted, terminal_grad=stage_terminal_grad(fitted, eta_k, base), lam=lam,
                      steps=steps_per_iter, seed=s)
        solver_metrics = solver.solve(model, base, stage) if steps_per_iter > 0 else {}
        info = {"eta": eta_k, "lambda": lam, "G_prev": fitted.value,
                **{f"fit_{a}": b for a, b in fitted.info.items() if isinstance(b, (int, float))},
                **{f"am_{a}": b for a, b in solver_metrics.items()}, "train_seconds": time.time() - t0}
        row: dict[str, Any] = {"iteration": k, **info}
        if evaluate is not None:
            torch.manual_seed(s + 1)
            ev, payload = evaluate(model, k)
            row.update(ev)
        metrics.append(row)
        infos.append(info)
        log.info("FDC k=%d/%d eta=%g G(p_{k-1})=%.5g lambda=%.4g (%.1f s)", k, K, eta_k, fitted.value, lam,
                 time.time() - t0)
        if store is not None:
            store.save(k, model, solver, metrics, info)
        if stop_after is not None and k >= stop_after:
            break
    return FDCResult(model=model, metrics=metrics, resumed_from=start, info=infos)


def run_fdc(
    model: FlowModel,
    objective: Objective,
    eta_schedule: Callable[[int], float] | float,
    K: int,
    am_cfg: AMConfig,
    run_dir: str | Path | None,
    resume: bool = True,
    *,
    steps_per_iter: int = 100,
    lr: float = 1e-3,
    n_fit: int = 4000,
    fit_steps: int | None = None,
    reward: RewardOracle | None = None,
    pre: FlowModel | None = None,
    sample_pre: Callable[[int], Tensor] | None = None,
    eval_fn: Callable[[FlowModel, int], dict[str, float]] | None = None,
    stop_after: int | None = None,
    seed: int = 0,
) -> FDCResult:
    """:func:`run_outer_loop` with the plain Adam AM solver and samples of the memoryless SDE for the fit.

    For flows whose samples are plain tensors (the 2-D settings, tests). n_fit: samples of p_{k−1} drawn with
    ``fit_steps`` (default am_cfg.steps) SDE steps; sample_pre: n -> samples of p_pre (default: π_pre's SDE).
    eval_fn(model, k) adds metrics per iteration. resume=False starts over even if ``run_dir`` has stages.
    """
    if n_fit < 2:
        raise ValueError(f"n_fit must be >= 2, got {n_fit}")
    fit_steps = fit_steps or am_cfg.steps
    pre = pre if pre is not None else model.copy_frozen()
    if sample_pre is None:

        def sample_pre(n: int) -> Tensor:
            return pre.sample(n, fit_steps, memoryless=True, record=False).x1

    def fit_context(base: FlowModel, pre_: FlowModel, k: int, payload: Any) -> FitContext:
        traj = base.sample(n_fit, fit_steps, memoryless=True, record=False)
        return FitContext(x=traj.x1, traj=traj, model=base, pre=pre_, reward=reward,
                          sample_current=lambda n: base.sample(n, fit_steps, memoryless=True, record=False).x1,
                          sample_pre=sample_pre)

    evaluate = None if eval_fn is None else (lambda m, k: (eval_fn(m, k), None))
    store = None
    if run_dir is not None:
        store = StageStore(run_dir)
        if not resume and store.last_finished() > 0:
            raise ValueError(f"{run_dir} holds finished FDC stages; resume=False would overwrite them")
    return run_outer_loop(model, objective, K=K, eta=eta_schedule, solver=AdamAMSolver(am_cfg, lr),
                          steps_per_iter=steps_per_iter, fit_context=fit_context, seed=seed, pre=pre,
                          evaluate=evaluate, store=store, stop_after=stop_after)

"""The FDC outer loop ([FDC] Algorithm 1) with a checkpoint after every outer iteration and resume.

For k = 1..K: fit G's first variation at p_{k−1} on a large sample of the current model (quantiles etc.);
fine-tune π_k from π_{k−1} by adjoint matching with terminal gradient ∇g_k/η_k (λ = 1/η_k); π_k becomes
the new base. One Adam optimizer carries over across k (as [code]). After each k the model, optimizer and
RNG states, k and the metrics are written atomically to ``run_dir/fdc_checkpoint.pt`` (and metrics to
``metrics.csv``); a rerun with ``resume=True`` continues after the last finished k and gives the same numbers
as an uninterrupted run on CPU.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowmol_ext.io_utils import atomic_torch_save, atomic_write_text

from .adjoint_matching import AMConfig, am_step
from .divergences import Objective
from .flow import FlowModel
from .utilities import FitContext, RewardOracle

__all__ = ["constant_eta", "harmonic_eta", "run_fdc", "FDCResult", "CHECKPOINT_NAME"]

log = logging.getLogger("fdc_mol.fdc")
CHECKPOINT_NAME = "fdc_checkpoint.pt"


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


@dataclass
class FDCResult:
    """The fine-tuned model π_K, per-iteration metrics, and the iteration a resumed run started from."""

    model: FlowModel
    metrics: list[dict[str, Any]]
    resumed_from: int


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])


def _write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(path, buf.getvalue())


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
) -> FDCResult:
    """Run Algorithm 1 on ``model`` (modified in place) and return it with the metrics.

    model: the pre-trained flow in its initial state (on resume its weights are replaced by the
    checkpoint's). pre: frozen π_pre (default: a frozen copy of ``model`` taken before any resume).
    eta_schedule: η_k as a float or a callable k -> η_k (k = 1..K). steps_per_iter: AM optimizer steps per
    outer iteration; n_fit: samples of p_{k−1} for fitting the first variation (quantiles etc.), drawn with
    the memoryless SDE on ``fit_steps`` (default am_cfg.steps) steps. sample_pre: n -> samples of p_pre
    (default: the frozen π_pre). eval_fn(model, k) adds metrics after each iteration (k = 0 is π_pre).
    stop_after: end after this iteration (to simulate an interruption in tests).
    """
    if K < 1 or steps_per_iter < 0 or n_fit < 2:
        raise ValueError(f"run_fdc needs K >= 1, steps_per_iter >= 0, n_fit >= 2; got {K}, {steps_per_iter}, {n_fit}")
    eta_fn = constant_eta(eta_schedule) if isinstance(eta_schedule, (int, float)) else eta_schedule
    fit_steps = fit_steps or am_cfg.steps
    pre = pre if pre is not None else model.copy_frozen()
    if sample_pre is None:

        def sample_pre(n: int) -> Tensor:
            return pre.sample(n, fit_steps, memoryless=True, record=False).x1

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    metrics: list[dict[str, Any]] = []
    start = 1
    ckpt_path = Path(run_dir) / CHECKPOINT_NAME if run_dir is not None else None
    if ckpt_path is not None and resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if int(ck.get("K", K)) != K:
            log.warning("checkpoint was written for K=%s, continuing with K=%s", ck.get("K"), K)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        _set_rng_state(ck["rng"])
        metrics = list(ck["metrics"])
        start = int(ck["k"]) + 1
        log.info("resuming FDC from %s after outer iteration %d", ckpt_path, start - 1)
    elif eval_fn is not None:
        metrics.append({"k": 0, **eval_fn(model, 0)})
    resumed_from = start - 1

    for k in range(start, K + 1):
        t0 = time.time()
        eta = float(eta_fn(k))
        base = model.copy_frozen()

        def sample_current(n: int, _base: FlowModel = base) -> Tensor:
            return _base.sample(n, fit_steps, memoryless=True, record=False).x1

        traj = base.sample(n_fit, fit_steps, memoryless=True, record=False)
        ctx = FitContext(
            x=traj.x1,
            traj=traj,
            model=base,
            pre=pre,
            reward=reward,
            sample_current=sample_current,
            sample_pre=sample_pre,
        )
        fitted = objective.fit(ctx)
        lam = fitted.grad_scale / eta

        def terminal_grad(x: Tensor, tr: Any, _f: Any = fitted, _eta: float = eta) -> Tensor:
            return _f.grad(x, tr) / _eta

        losses = []
        for _ in range(steps_per_iter):
            out = am_step(model, base, terminal_grad, am_cfg, opt, lam=lam)
            losses.append(out["loss"])
        row: dict[str, Any] = {
            "k": k,
            "eta": eta,
            "G_prev": fitted.value,
            "am_loss": float(np.mean(losses)) if losses else math.nan,
            "seconds": time.time() - t0,
        }
        row.update({f"fit_{key}": v for key, v in fitted.info.items() if isinstance(v, float)})
        if eval_fn is not None:
            row.update(eval_fn(model, k))
        metrics.append(row)
        log.info(
            "FDC k=%d/%d eta=%g G(p_{k-1})=%.4g am_loss=%.4g (%.1fs)",
            k,
            K,
            eta,
            fitted.value,
            row["am_loss"],
            row["seconds"],
        )
        if run_dir is not None:
            state = {
                "k": k,
                "K": K,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "rng": _rng_state(),
                "metrics": metrics,
            }
            atomic_torch_save(state, ckpt_path)
            _write_metrics_csv(Path(run_dir) / "metrics.csv", metrics)
        if stop_after is not None and k >= stop_after:
            break
    return FDCResult(model=model, metrics=metrics, resumed_from=resumed_from)

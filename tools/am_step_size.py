"""How far should one AM step go? A line search on one batch, against the step Adam takes.

At the start of a stage (fine ≡ base) the config's first AM step sees one batch: n_traj memoryless-SDE
trajectories, their terminal gradient (the stage's first variation / η, as the loop builds it), the lean adjoint
and the loss timesteps. Holding that batch fixed, the AM loss is a function of the trainable parameters alone,
L(θ). This tool measures it along two directions from θ₀:
- ``gradient``: −∇L/‖∇L‖ (steepest descent);
- ``adam``: Adam's first update after the norm clip, −g_c/(|g_c| + ε) (element-wise: ±1 wherever the gradient is
  not tiny), the step every run of this project takes first; its length is lr·‖that vector‖.
Along each unit direction u it evaluates L(θ₀ + s·u) at s = S/10 and S (S = the Adam step's length at the config's
lr), fits L(s) = L₀ + a·s + b·s² with the exact slope a = ⟨∇L, u⟩, and prints the loss-minimising length
s* = −a/(2b) and the ratio S/s* (how many times too long the Adam step is along its own direction). Both
curvature estimates are printed; they agree when L is quadratic over [0, S] (the AM loss is quadratic in the
velocity; the network is not linear in θ).

    python tools/am_step_size.py -c fdc_demo_cpu --seed 0

One core, a few minutes (a fit sample, one batch with one backward pass, four forward-only loss evaluations).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import torch


def line_search(config: str, seed: int, lr: float | None = None) -> dict[str, Any]:
    """Slopes, curvatures and loss-minimising step lengths along the gradient and Adam's first update (units of
    the trainable parameters' Euclidean norm) on the config's first AM batch of stage 1 for ``seed``."""
    from fdc_mol.commands.finetune import load_finetune_config
    from fdc_mol.fdc.adjoint_matching import am_loss_for_trajectory, lean_adjoint, timestep_subset
    from fdc_mol.fdc.flow import per_sample_sqnorm
    from fdc_mol.fdc.loop import stage_seed, stage_terminal_grad
    from fdc_mol.molecular.job import FinetuneJob

    cfg = load_finetune_config(config, run_dir="runs/am_step_size", seed=seed)
    cfg = cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"executor": "local:1"})})
    lr = float(cfg.lr if lr is None else lr)
    job = FinetuneJob(cfg)
    fine = job.flow
    base = fine.copy_frozen()
    eta = cfg.kl_weight if cfg.algorithm == "am" else cfg.mirror_eta
    torch.manual_seed(stage_seed(seed, 1))
    fitted = job.objective.fit(job.fit_context(base, base, 1, None))
    gen = torch.Generator().manual_seed(stage_seed(seed, 1) + 17)
    traj = fine.sample(cfg.am.n_traj, cfg.am.steps, memoryless=True, record=True, generator=gen)
    g = torch.nan_to_num(stage_terminal_grad(fitted, eta, base)(traj.x1, traj))
    idx = timestep_subset(cfg.am.steps, cfg.am.final_frac, cfg.am.random_frac, gen)
    adj, v_base = lean_adjoint(base, traj, g, v_base_steps=idx)
    params = [p for p in fine.parameters() if p.requires_grad]

    def loss() -> float:
        with torch.no_grad():
            return float(am_loss_for_trajectory(fine, traj, adj, v_base, idx))

    loss0 = am_loss_for_trajectory(fine, traj, adj, v_base, idx)
    loss0.backward()
    grad = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    gnorm = math.sqrt(sum(float(t.pow(2).sum()) for t in grad))
    clip = min(1.0, (cfg.am.grad_clip_norm or math.inf) / gnorm)
    adam = [-(clip * t) / ((clip * t).abs() + 1e-8) for t in grad]  # Adam's first update / lr (β bias-corrected)
    adam_len = math.sqrt(sum(float(t.pow(2).sum()) for t in adam))
    S = lr * adam_len
    theta0 = [p.detach().clone() for p in params]
    out: dict[str, Any] = {"config": config, "seed": seed, "lr": lr, "n_traj": traj.n, "n_params": sum(
        t.numel() for t in grad), "loss0": float(loss0.detach()), "grad_norm": gnorm, "adam_step_length": S,
        "n_signal": int((per_sample_sqnorm(g, traj) > 0).sum())}
    for name, d in (("gradient", [-t for t in grad]), ("adam", adam)):
        dn = math.sqrt(sum(float(t.pow(2).sum()) for t in d))
        u = [t / dn for t in d]
        slope = sum(float((a * b).sum()) for a, b in zip(grad, u))
        res: dict[str, Any] = {"slope": slope, "cos_with_gradient": -slope / gnorm}
        for frac in (0.1, 1.0):
            s = frac * S
            with torch.no_grad():
                for p, t0, ui in zip(params, theta0, u):
                    p.copy_(t0 + s * ui)
            ls = loss()
            curv = (ls - out["loss0"] - slope * s) / s**2
            res[f"loss_at_{frac:g}S"] = ls
            res[f"curvature_{frac:g}S"] = curv
            res[f"s_star_{frac:g}S"] = -slope / (2 * curv) if curv > 0 else math.inf
            res[f"S_over_s_star_{frac:g}S"] = S / res[f"s_star_{frac:g}S"]
        with torch.no_grad():
            for p, t0 in zip(params, theta0):
                p.copy_(t0)
        out[name] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", default="fdc_demo_cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=None, help="the Adam lr whose first step is measured (default: config)")
    ap.add_argument("--out", help="also write the figures as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    res = line_search(args.config, args.seed, args.lr)
    print(f"{res['config']} seed {res['seed']}: {res['n_traj']} trajectories ({res['n_signal']} with signal), "
          f"{res['n_params']} trainable parameters; L0 = {res['loss0']:.6g}, |grad L| = {res['grad_norm']:.4g}; "
          f"Adam's first step at lr {res['lr']:g}: length S = {res['adam_step_length']:.4g}")
    for name in ("gradient", "adam"):
        r = res[name]
        print(f"  along {name:8s}: cos with -grad {r['cos_with_gradient']:.3f}; L(S/10) = {r['loss_at_0.1S']:.6g}, "
              f"L(S) = {r['loss_at_1S']:.6g}; s* = {r['s_star_0.1S']:.3g} (from S/10), {r['s_star_1S']:.3g} "
              f"(from S); S/s* = {r['S_over_s_star_0.1S']:.3g}, {r['S_over_s_star_1S']:.3g}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()

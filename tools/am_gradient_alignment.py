"""Does a reward tail ask the network for a different geometry change than the bulk? Per-molecule AM gradients.

At the pre-trained model (fine ≡ base) the adjoint-matching loss's parameter gradient is linear in the
per-molecule weights of the terminal gradient: with ∇g(x₁ⁱ) = wᵢ ∇r(x₁ⁱ), the step's gradient is
(1/n) Σᵢ wᵢ Gᵢ, where Gᵢ is molecule i's gradient with unit weight (the lean adjoint is linear in its terminal
value, and the loss's gradient at v_fine = v_base is linear in the adjoint). Plain AM weights every scored
molecule by 1/α; FDC on SQ_β weights the tail (r ≥ q_β) by 1/(η(1−β)) and the rest by 0. So one batch of
trajectories, scored once, with one backward pass per scored molecule, gives both methods' first-step gradients
and how noisy each is.

Printed (and written as JSON with ``--out``), for the upper tail (SQ_β: r >= q_β) and the lower tail (CVaR of
the worst 1 − β: r <= q_{1−β}), each against the other scored molecules ("bulk"):
- cos(g_AM, g_FDC) on the batch, and cos(tail mean, bulk mean) of the Gᵢ with a bootstrap 95 % interval;
- split-half cosines: half the tail against the other half (the tail's own reliability at that size) and
  against as many bulk molecules; equal values mean the tail asks for the bulk's direction;
- per-molecule signal-to-noise ρ = ‖μ‖²/E‖Gᵢ − μ‖² (unbiased ‖μ‖² from the pairwise inner products), and the
  expected cosine between one step's gradient over m molecules and the mean direction, √(mρ/(1 + mρ)), at the
  m of the effect protocol (FDC: tail molecules per step; AM: scored molecules per step).

    python tools/am_gradient_alignment.py -c fdc_effect_cpu -n 192 --seed 0 --out docs/results/am_alignment.json

Runs on one core in a few minutes for n = 192 (sampling, xTB with gradients, one adjoint pass, one backward
per scored molecule). Positions-only trainable parameters unless the config says ``trainable: all``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fdc_mol.commands.finetune import load_finetune_config
from fdc_mol.fdc.adjoint_matching import _sample_rows, lean_adjoint, timestep_subset
from fdc_mol.fdc.flow import per_sample_sqnorm
from fdc_mol.fdc.gradient_alignment import (
    expected_step_cosine,
    gram_cosine,
    mean_weights,
    per_sample_am_gradients,
    signal_to_noise,
)
from fdc_mol.molecular.flowmol_flow import FlowMolFlow
from fdc_mol.molecular.reward_oracle import reward_oracle
from fdc_mol.rewards import make_molecular_reward
from flowmol_ext import load_pretrained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", default="fdc_effect_cpu", help="finetune config (model, reward, am, utility)")
    ap.add_argument("-n", "--n-traj", type=int, default=192, help="trajectories in the batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", help="override the config's model")
    ap.add_argument("--trainable", choices=["positions", "all"], help="override the config's trainable parameters")
    ap.add_argument("--fdc-tail-per-step", type=float, help="tail molecules per AM step in the protocol "
                    "(default: this batch's tail fraction × am.n_traj)")
    ap.add_argument("--am-scored-per-step", type=float, help="scored molecules per AM step (default: this "
                    "batch's scored fraction × am.n_traj)")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_finetune_config(args.config, **({"model": args.model} if args.model else {}))
    if args.trainable:
        cfg = cfg.model_copy(update={"trainable": args.trainable})
    t0 = time.perf_counter()
    flow = FlowMolFlow(load_pretrained(cfg.model), sampler=cfg.sampler, n_atoms=cfg.n_atoms, trainable=cfg.trainable)
    base = flow.copy_frozen()
    reward = make_molecular_reward(cfg.reward)
    oracle = reward_oracle(getattr(reward, "for_training", lambda: reward)(),
                           grad_clip_per_atom=cfg.reward.grad_clip_per_atom)
    gen = torch.Generator().manual_seed(args.seed)
    traj = flow.sample(args.n_traj, cfg.am.steps, memoryless=True, record=True, generator=gen)
    r, grad = oracle(traj.x1.detach(), traj)
    r = r.numpy().astype(np.float64)
    scored = np.isfinite(r)
    beta = cfg.utility.beta
    q = float(np.quantile(r[scored], beta))
    tail = scored & (r >= q)
    print(f"{args.n_traj} trajectories ({cfg.am.steps} steps, memoryless SDE): {scored.sum()} scored, "
          f"{tail.sum()} in the tail r >= q_{beta} = {q:.4f} Eh ({time.perf_counter() - t0:.0f} s)")
    keep = torch.as_tensor(scored)
    g = grad * _sample_rows(traj, keep).unsqueeze(-1).to(grad.dtype)
    idx = timestep_subset(cfg.am.steps, cfg.am.final_frac, cfg.am.random_frac, torch.Generator().manual_seed(args.seed))
    adj, v_base = lean_adjoint(base, traj, g, v_base_steps=idx)
    G, rows_scored = per_sample_am_gradients(flow, traj, adj, v_base, idx)
    if len(rows_scored) != int(scored.sum()):
        raise SystemExit(f"{int(scored.sum())} scored molecules but {len(rows_scored)} with a non-zero adjoint")
    print(f"per-molecule gradients: {G.shape[0]} x {G.shape[1]} parameters ({time.perf_counter() - t0:.0f} s)")

    lam_fdc = 1.0 / (cfg.mirror_eta * (1.0 - beta))
    alpha = cfg.kl_weight if cfg.kl_weight > 0 else 0.0045
    K = G @ G.T  # every cosine below is between weighted sums of the rows of G
    m_all = K.shape[0]
    w_am = np.full(m_all, 1.0 / alpha / args.n_traj)
    rng = np.random.default_rng(args.seed)
    frac_scored = scored.mean()
    m_am = args.am_scored_per_step or frac_scored * cfg.am.n_traj
    mu2_a, noise_a = signal_to_noise(K)
    rho_a = mu2_a / noise_a
    res: dict = {
        "config": args.config, "model": cfg.model, "seed": args.seed, "n_traj": args.n_traj, "steps": cfg.am.steps,
        "trainable": cfg.trainable, "n_parameters": int(G.shape[1]), "n_scored": int(scored.sum()), "beta": beta,
        "rho_scored": rho_a, "m_am_per_step": float(m_am), "expected_cos_am_step": expected_step_cosine(rho_a, m_am),
    }
    print(f"signal-to-noise per molecule, all scored: rho = {rho_a:.4f}; expected cos(step gradient, mean "
          f"direction) for AM with {m_am:.1f} scored per step = {res['expected_cos_am_step']:.3f}")
    rs = r[rows_scored]
    q_lo = float(np.quantile(rs, 1.0 - beta))
    # upper: SQ_β's first variation weights r >= q_β; lower: CVaR's (the worst 1 − β) weights r <= q_{1−β}.
    for name, in_tail in (("upper", rs >= q), ("lower", rs <= q_lo)):
        ti, bi = np.flatnonzero(in_tail), np.flatnonzero(~in_tail)
        w_fdc = np.where(in_tail, lam_fdc / args.n_traj, 0.0)
        boot = [gram_cosine(K, mean_weights(m_all, rng.choice(ti, len(ti))),
                            mean_weights(m_all, rng.choice(bi, len(bi)))) for _ in range(args.n_boot)]
        h = len(ti) // 2
        halves, cross = [], []
        for _ in range(1000):  # split-half: the tail against itself, and against as many bulk molecules
            pt, pb = rng.permutation(ti), rng.permutation(bi)
            halves.append(gram_cosine(K, mean_weights(m_all, pt[:h]), mean_weights(m_all, pt[h:2 * h])))
            cross.append(gram_cosine(K, mean_weights(m_all, pt[:h]), mean_weights(m_all, pb[:h])))
        mu2_t, noise_t = signal_to_noise(K[np.ix_(ti, ti)])
        rho_t = mu2_t / noise_t
        m_fdc = args.fdc_tail_per_step or in_tail.mean() * frac_scored * cfg.am.n_traj
        lo, hi = np.percentile(boot, [2.5, 97.5])
        row = {"n_tail": int(in_tail.sum()), "threshold": q if name == "upper" else q_lo,
               "cos_g_am_g_fdc": gram_cosine(K, w_am, w_fdc),
               "cos_tail_mean_bulk_mean": gram_cosine(K, mean_weights(m_all, ti), mean_weights(m_all, bi)),
               "cos_tail_bulk_lo": float(lo), "cos_tail_bulk_hi": float(hi),
               "split_half_cos_tail": float(np.mean(halves)), "half_tail_vs_half_bulk_cos": float(np.mean(cross)),
               "rho_tail": rho_t, "m_fdc_per_step": float(m_fdc), "expected_cos_fdc_step":
               expected_step_cosine(rho_t, m_fdc)}
        res[name] = row
        print(f"[{name} tail: {len(ti)} molecules, r {'>=' if name == 'upper' else '<='} {row['threshold']:.4f} Eh] "
              f"cos(g_AM, g_FDC) = {row['cos_g_am_g_fdc']:.3f}; cos(tail mean, bulk mean) = "
              f"{row['cos_tail_mean_bulk_mean']:.3f} [{lo:.3f}, {hi:.3f}]; split-half {h} vs {h}: tail/tail "
              f"{row['split_half_cos_tail']:.3f}, tail/bulk {row['half_tail_vs_half_bulk_cos']:.3f}; rho = "
              f"{rho_t:.4f}; expected cos of an FDC step with {m_fdc:.1f} tail molecules = "
              f"{row['expected_cos_fdc_step']:.3f}")
    # Per-molecule normalisation of the terminal gradient (∇r/‖∇r‖) scales Gᵢ by 1/‖∇rᵢ‖ (linearity), so its
    # signal-to-noise follows from K without new backward passes.
    gnorm = per_sample_sqnorm(g, traj).sqrt().double().numpy()[rows_scored]
    Kn = K / np.outer(gnorm, gnorm)
    up = np.flatnonzero(rs >= q)
    rho_n = signal_to_noise(Kn)
    rho_nt = signal_to_noise(Kn[np.ix_(up, up)])
    res["normalised"] = {"rho_scored": rho_n[0] / rho_n[1], "rho_upper_tail": rho_nt[0] / rho_nt[1],
                         "expected_cos_am_step": expected_step_cosine(rho_n[0] / rho_n[1], m_am),
                         "expected_cos_fdc_step": expected_step_cosine(rho_nt[0] / rho_nt[1],
                                                                       res["upper"]["m_fdc_per_step"]),
                         "grad_norm_median": float(np.median(gnorm)), "grad_norm_max": float(gnorm.max())}
    print(f"with ∇r normalised per molecule (‖∇r‖ median {np.median(gnorm):.3f}, max {gnorm.max():.3f} Eh/Å): "
          f"rho all scored {res['normalised']['rho_scored']:.4f}, "
          f"upper tail {res['normalised']['rho_upper_tail']:.4f}; "
          f"expected step cos AM {res['normalised']['expected_cos_am_step']:.3f}, "
          f"FDC {res['normalised']['expected_cos_fdc_step']:.3f}")
    res["seconds"] = time.perf_counter() - t0
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
        # the Gram matrix and rewards, to recompute any weighting's cosines without the backward passes
        np.savez_compressed(args.out.with_suffix(".npz"), gram=K, rewards=rs, grad_norms=gnorm, q_beta=q)
        print(f"wrote {args.out} and {args.out.with_suffix('.npz')}")


if __name__ == "__main__":
    main()

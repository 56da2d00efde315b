"""``fdc-mol demo``: the main job on the shipped checkpoint, on CPU, in minutes.

Runs the shipped config ``fdc_demo_cpu`` (``fdc_mol/configs/fdc_demo_cpu.yaml``, the only copy) and prints the
pre-trained model against FDC under common random numbers (same sizes, noise and CTMC draws), with 95 %
bootstrap intervals and the paired per-molecule difference, and where the SDF files are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Run FDC on the shipped QM9 model (config fdc_demo_cpu; CPU, under 10 minutes) and print the result."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="fdc_demo_cpu", help="config name or file (default: fdc_demo_cpu)")


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from fdc_mol.commands.finetune import format_finetune_table, load_finetune_config, run_finetune

    torch.set_num_threads(2)
    t0 = time.time()
    cfg = load_finetune_config(args.config, run_dir=args.run_dir, seed=args.seed)
    rows = run_finetune(cfg, print_table=False)
    print()
    print(f"FDC demo ({cfg.model}): {cfg.K} outer iteration{'s' if cfg.K != 1 else ''} x "
          f"{cfg.am_steps_per_iteration} adjoint-matching steps "
          f"of {cfg.am.n_traj} trajectories, {cfg.utility.kind} (β = {cfg.utility.beta}) of the "
          f"{cfg.reward.kind} reward ({cfg.reward.level}); "
          f"{cfg.evaluation.n_molecules or cfg.n_fit} molecules per row, seed {cfg.seed}")
    print(format_finetune_table([rows[0], rows[-1]], cfg))
    last = rows[-1]
    for s in cfg.evaluation.samplers[1:]:
        print(f"{s} sampler beside it: SQ_β {rows[0].get(f'{s}_sq_beta', float('nan')):.4g} -> "
              f"{last.get(f'{s}_sq_beta', float('nan')):.4g}, validity {rows[0].get(f'{s}_validity', float('nan')):.3f}"
              f" -> {last.get(f'{s}_validity', float('nan')):.3f}")
    run_dir = Path(cfg.run_dir)
    print(f"\nFDC molecules with rewards (SDF): {run_dir / 'samples' / f'iteration_{cfg.K:03d}.sdf'}")
    print(f"pre-trained molecules (SDF):       {run_dir / 'samples' / 'iteration_000.sdf'}")
    print(f"metrics: {run_dir / 'metrics.csv'}   plots: {run_dir / 'plots.png'}")
    print(f"demo wall time: {time.time() - t0:.0f} s")
    return 0

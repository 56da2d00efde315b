"""``fdc-mol demo``: the main job on the shipped checkpoint, on CPU, in minutes.

Fine-tunes the shipped ``qm9_small`` model with FDC toward molecules of low GFN1-xTB energy
(novelty-seeking super-quantile of r = −E), then prints pre-trained vs FDC and where the SDF is.
The settings are ``configs/fdc_demo_cpu.yaml`` (a test keeps the two identical).
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Run FDC on the shipped QM9 model toward low xTB energy (CPU, about 10 minutes) and print the result."

DEMO_CONFIG = {
    "run_dir": "runs/demo",
    "seed": 0,
    "model": "qm9_small",
    "device": "cpu",
    "method": "fdc",
    "K": 2,
    "am_steps_per_iteration": 2,
    "lr": 1.0e-4,
    "eta": 0.01,
    "alpha": 0.0,
    "utility": {"kind": "superquantile", "beta": 0.75},
    "novelty_kde_weight": 0.0,
    "n_fit": 64,
    "sample_steps": 100,
    "trainable": "positions",
    "am": {"n_traj": 16, "steps": 50, "final_frac": 0.25, "random_frac": 0.25, "lct": None, "grad_clip_norm": 1.0},
    "sampler": {"stochasticity": 30.0, "temperature": 0.05, "hc_thresh": 0.9},
    "reward": {"method": "gfn1", "engine": "tblite", "executor": "local:2", "timeout_s": 30.0, "cache_dir": None},
    "data_dir": "data/qm9",
    "write_sdf": True,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from fdc_mol.commands.finetune import run_finetune
    from fdc_mol.config import FinetuneConfig
    from fdc_mol.report import format_table

    torch.set_num_threads(2)
    t0 = time.time()
    cfg = FinetuneConfig.model_validate({**DEMO_CONFIG, "run_dir": str(args.run_dir), "seed": args.seed})
    rows = run_finetune(cfg, print_table=False)
    first, last = rows[0], rows[-1]
    print()
    print(f"FDC demo: {cfg.K} outer iterations x {cfg.am_steps_per_iteration} adjoint-matching steps, "
          f"novelty-seeking SQ_β (β = {cfg.utility.beta}) of r = −E(GFN1-xTB), {cfg.n_fit} samples per row")
    print(format_table(["model", "E[r] (Eh)", "SQ_β (Eh)", "validity", "mol. stability", "mean atoms"],
                       [["pre-trained", first["mean_reward"], first["sq_beta"], first["validity"],
                         first["molecule_stability"], first["mean_n_atoms"]],
                        ["FDC", last["mean_reward"], last["sq_beta"], last["validity"],
                         last["molecule_stability"], last["mean_n_atoms"]]]))
    sdf = Path(cfg.run_dir) / "samples" / f"iteration_{cfg.K:03d}.sdf"
    print(f"\nFDC molecules with energies (SDF): {sdf}")
    print(f"pre-trained molecules (SDF):       {Path(cfg.run_dir) / 'samples' / 'iteration_000.sdf'}")
    print(f"metrics: {Path(cfg.run_dir) / 'metrics.csv'}   plots: {Path(cfg.run_dir) / 'plots.png'}")
    print(f"demo wall time: {time.time() - t0:.0f} s")
    return 0

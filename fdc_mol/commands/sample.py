"""``fdc-mol sample``: sample 3D molecules from a model and write them to SDF."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Sample unconditional 3D molecules from a model (registry name, model dir or official checkpoint) to SDF."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default="qm9_small", help="registry name, model directory, or official .ckpt")
    p.add_argument("-n", "--n-molecules", type=int, default=100)
    p.add_argument("-o", "--output", type=Path, required=True, help="output SDF path")
    p.add_argument("--steps", type=int, default=100, help="integration steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sde", action="store_true", help="memoryless SDE for positions instead of the Euler ODE")
    p.add_argument("--compile", action="store_true", help="run the network under torch.compile (~1.9x faster "
                   "sampling on CPU after a one-off compilation of minutes, cached on disk)")
    p.add_argument("--stochasticity", type=float, default=30.0, help="CTMC re-masking rate eta")
    p.add_argument("--temperature", type=float, default=0.05, help="CTMC temperature")
    p.add_argument("--hc-thresh", type=float, default=0.9, help="purity-sampling threshold (0 disables)")
    p.add_argument("--n-atoms", type=int, help="fixed molecule size (default: drawn from the training histogram)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N, mps (default auto: cuda if available)")


def run(args: argparse.Namespace) -> int:
    from fdc_mol.io import write_sdf
    from fdc_mol.runlog import start_run
    from flowmol_ext import load_pretrained
    from flowmol_ext.config import check_device
    from flowmol_ext.io_utils import check_writable_dir
    from flowmol_ext.model.sampler import SamplerConfig, sample_molecules

    device = check_device(args.device, "--device")
    if args.n_molecules < 1:
        raise ValueError(f"-n/--n-molecules must be >= 1, got {args.n_molecules}")
    if args.n_atoms is not None and args.n_atoms < 1:
        raise ValueError(f"--n-atoms must be >= 1, got {args.n_atoms}")
    for option, value, ok, rule in (
        ("--steps", args.steps, args.steps >= 1, ">= 1"),
        ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
        ("--stochasticity", args.stochasticity, args.stochasticity >= 0, ">= 0"),
        ("--temperature", args.temperature, args.temperature > 0, "> 0"),
        ("--hc-thresh", args.hc_thresh, 0 <= args.hc_thresh <= 1, "in [0, 1]"),
    ):
        if not ok:
            raise ValueError(f"{option} must be {rule}, got {value}")
    cfg = SamplerConfig(steps=args.steps, position_sampler="sde" if args.sde else "ode",
                        stochasticity=args.stochasticity, temperature=args.temperature, hc_thresh=args.hc_thresh,
                        batch_size=args.batch_size)
    if args.output.is_dir():
        raise ValueError(f"-o/--output {args.output} is a folder; give an SDF file path")
    check_writable_dir(args.output.parent, "-o/--output")  # before sampling, not after
    start_run("sample", seed=args.seed, config={"model": str(args.model), "n": args.n_molecules,
                                                 "sampler": cfg.model_dump(), "compile": args.compile}, device=device)
    model = load_pretrained(args.model, device=device)
    if args.compile:
        model.set_compile(True)
    mols = sample_molecules(model, args.n_molecules, cfg, n_atoms=args.n_atoms, seed=args.seed, device=device)
    props = [{"sample_index": i, "model": str(args.model), "steps": args.steps, "seed": args.seed}
             for i in range(len(mols))]
    write_sdf(args.output, mols, props)
    print(f"wrote {len(mols)} molecules to {args.output}")
    return 0

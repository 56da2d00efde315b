"""``fdc-mol finetune``: FDC (or the plain adjoint-matching baseline) on a pretrained FlowMol model."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Fine-tune a pretrained generator with FDC (or plain adjoint matching) toward low xTB energy; resumable."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", type=Path, required=True, help="configs/fdc_novelty_energy.yaml, ...")
    p.add_argument("--run-dir", type=Path, help="override run_dir")
    p.add_argument("--seed", type=int, help="override seed")
    p.add_argument("--model", help="override model (registry name, model dir, official checkpoint)")
    p.add_argument("--device", help="override device (cpu, cuda, auto)")


def load_finetune_config(args: argparse.Namespace):  # noqa: ANN201
    from fdc_mol.config import FinetuneConfig
    from flowmol_ext.config import load_config

    over = {k: (str(v) if isinstance(v, Path) else v) for k, v in
            (("run_dir", args.run_dir), ("seed", args.seed), ("model", args.model), ("device", args.device))
            if v is not None}
    return load_config(FinetuneConfig, args.config, over)


def run_finetune(cfg, *, print_table: bool = True) -> list[dict]:  # noqa: ANN001
    """Run or resume ``cfg`` in its run directory; refuse a run directory that holds another config."""
    import yaml

    from fdc_mol.fdc.molecular import MolecularFDC
    from fdc_mol.report import format_table
    from fdc_mol.runlog import start_run
    from flowmol_ext.config import dump_config

    run_dir = Path(cfg.run_dir)
    saved = run_dir / "config.yaml"
    if saved.is_file():
        old = yaml.safe_load(saved.read_text())
        if old != cfg.model_dump(mode="json"):
            raise ValueError(f"{run_dir} holds a run with a different config ({saved}); choose another run_dir "
                             "or delete it")
    start_run(f"finetune ({cfg.method})", seed=cfg.seed, config=cfg, device=cfg.device, run_dir=run_dir)
    dump_config(cfg, saved)
    job = MolecularFDC(cfg)
    try:
        rows = job.run()
    finally:
        close = getattr(job.reward, "close", None)
        if close:
            close()
    if print_table:
        print(format_table(["iteration", "E[r] (Eh)", f"SQ_β (β={cfg.utility.beta})", "validity", "mol. stab.",
                            "uniq.", "novelty", "atoms", "E/atom (Eh)"],
                           [[r["iteration"], r["mean_reward"], r["sq_beta"], r["validity"], r["molecule_stability"],
                             r["uniqueness"], r["novelty"], r["mean_n_atoms"], r["mean_energy_per_atom"]]
                            for r in rows]))
        print(f"run directory: {run_dir}  (metrics.csv, plots.png, samples/iteration_*.sdf, model/)")
    return rows


def run(args: argparse.Namespace) -> int:
    run_finetune(load_finetune_config(args))
    return 0

"""``fdc-mol pretrain``: train the FlowMol generator on processed QM9 with PyTorch Lightning."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Pretrain the FlowMol-style generator on QM9 (Lightning; resumable; multi-GPU via Lightning strategies)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", type=Path, help="YAML config (configs/flowmol_qm9_small.yaml, ...)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint (uses RUN_DIR/config.yaml)")
    p.add_argument("--run-dir", type=Path, help="override train.run_dir")
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument("--max-time", help="override train.max_time (DD:HH:MM:SS)")
    p.add_argument("--data-dir", type=Path, help="override data.data_dir")
    p.add_argument("--accelerator", help="override train.accelerator (cpu, gpu, auto)")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument("--init-from", help="start from these weights (e.g. qm9_small) instead of a random init")
    p.add_argument("--snapshot-every", type=int, default=0,
                   help="also export a model directory every N steps under RUN_DIR/snapshots (learning curves)")


def _resume_run_dir(resume: Path) -> str:
    """The run_dir to use for ``--resume RESUME``: the saved spelling when it names the same folder
    (relative vs absolute, symlinks), so that resuming never rewrites the run's config; else RESUME."""
    import yaml

    try:
        saved = (yaml.safe_load((resume / "config.yaml").read_text()) or {}).get("train", {}).get("run_dir")
    except (OSError, yaml.YAMLError, AttributeError):
        saved = None
    if saved and Path(saved).resolve() == resume.resolve():
        return str(saved)
    return str(resume)


def run(args: argparse.Namespace) -> int:
    from fdc_mol.runlog import start_run
    from flowmol_ext.config import load_config
    from flowmol_ext.lightning import PretrainConfig, check_pretrain_config, pretrain

    if args.resume is None and args.config is None:
        raise ValueError("give a config with -c/--config, or --resume RUN_DIR")
    overrides: dict = {"train": {}, "data": {}}
    if args.run_dir is not None:
        overrides["train"]["run_dir"] = str(args.run_dir)
    if args.resume is not None:
        overrides["train"]["run_dir"] = _resume_run_dir(args.resume)
    for key, val in (("max_steps", args.max_steps), ("max_time", args.max_time),
                     ("accelerator", args.accelerator), ("seed", args.seed), ("init_from", args.init_from)):
        if val is not None:
            overrides["train"][key] = val
    if args.data_dir is not None:
        overrides["data"]["data_dir"] = str(args.data_dir)
    if args.resume is not None and not args.resume.is_dir():
        raise FileNotFoundError(f"--resume {args.resume}: no such run directory")
    cfg_path = args.config if args.config is not None else args.resume / "config.yaml"
    cfg = load_config(PretrainConfig, cfg_path, overrides)
    check_pretrain_config(cfg)  # accelerator, data, writable run dir: before anything is written
    start_run("pretrain", seed=cfg.train.seed, config=cfg, device=None, run_dir=Path(cfg.train.run_dir))
    run_dir = pretrain(cfg, resume=args.resume is not None, snapshot_every_n_steps=args.snapshot_every)
    print(f"pretraining finished; model directory: {run_dir / 'model_last'}  (load with "
          f"flowmol_ext.load_pretrained('{run_dir / 'model_last'}'))")
    return 0

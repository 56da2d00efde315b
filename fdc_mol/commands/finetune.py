"""``fdc-mol finetune``: FDC (or the plain adjoint-matching baseline) on a pretrained FlowMol model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = "Fine-tune a pretrained generator with FDC (or plain adjoint matching) toward a reward; resumable."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True,
                   help="a YAML file, or the name of a shipped config (fdc_demo_cpu, fdc_novelty_energy, am_energy, "
                        "...; see fdc_mol/configs)")
    p.add_argument("--run-dir", type=Path, help="override run_dir")
    p.add_argument("--seed", type=int, help="override seed")
    p.add_argument("--model", help="override model (registry name, model dir, official checkpoint)")
    p.add_argument("--device", help="override device (cpu, cuda, auto)")


def load_finetune_config(config: str | Path, **overrides: Any):  # noqa: ANN201 - FinetuneConfig
    """The FinetuneConfig of a file or shipped name, with non-None overrides (run_dir, seed, model, device)."""
    from fdc_mol.config import FinetuneConfig, config_path
    from flowmol_ext.config import load_config

    over = {k: (str(v) if isinstance(v, Path) else v) for k, v in overrides.items() if v is not None}
    return load_config(FinetuneConfig, config_path(config), over)


def _same_run(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Equal configs, with run_dir compared as resolved paths (relative vs absolute spelling). The saved config
    is read through today's schema first, so a run saved before a key was added (with its default) resumes."""
    import warnings

    from fdc_mol.config import FinetuneConfig

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old = FinetuneConfig.model_validate(old).model_dump(mode="json")
    except Exception:  # noqa: BLE001 - a saved config today's schema rejects is compared as saved (and differs)
        pass
    a, b = dict(old), dict(new)
    ra, rb = Path(str(a.pop("run_dir", ""))).resolve(), Path(str(b.pop("run_dir", ""))).resolve()
    return a == b and ra == rb


def run_finetune(cfg, *, print_table: bool = True, model: Any = None, reward: Any = None) -> list[dict]:  # noqa: ANN001
    """Run or resume ``cfg`` in its run directory; refuse a run directory that holds another config."""
    from flowmol_ext.config import check_device
    from flowmol_ext.io_utils import check_writable_dir, run_dir_lock

    run_dir = Path(cfg.run_dir)
    check_device(cfg.device, "device")  # before any output: no run directory for an impossible device
    check_writable_dir(run_dir, "run_dir")
    with run_dir_lock(run_dir):  # a second run into the same directory would write the same files
        return _run_finetune_locked(cfg, run_dir, print_table, model, reward)


def _run_finetune_locked(cfg, run_dir: Path, print_table: bool, model: Any, reward: Any) -> list[dict]:  # noqa: ANN001
    import yaml

    from fdc_mol.molecular.job import FinetuneJob
    from fdc_mol.runlog import start_run
    from flowmol_ext.config import dump_config

    saved = run_dir / "config.yaml"
    if saved.is_file():
        old = yaml.safe_load(saved.read_text())
        if not _same_run(old, cfg.model_dump(mode="json")):
            raise ValueError(f"{run_dir} holds a run with a different config ({saved}); choose another run_dir "
                             "or delete it")
    start_run(f"finetune ({cfg.algorithm})", seed=cfg.seed, config=cfg, device=cfg.device, run_dir=run_dir)
    dump_config(cfg, saved)
    with FinetuneJob(cfg, model=model, reward=reward) as job:
        rows = job.run()
    if print_table:
        print(format_finetune_table(rows, cfg))
        print(f"run directory: {run_dir}  (metrics.csv, plots.png, samples/iteration_*.sdf, model/)")
    return rows


def _ci(row: dict[str, Any], key: str) -> str:
    v, lo, hi = row.get(key), row.get(f"{key}_lo"), row.get(f"{key}_hi")
    if v is None or lo is None or hi is None:
        return "" if v is None else f"{v:.4g}"
    return f"{v:.4g} [{lo:.4g}, {hi:.4g}]"


def format_finetune_table(rows: list[dict[str, Any]], cfg: Any) -> str:
    """Iterations with 95 % bootstrap intervals and the paired difference to iteration 0 (primary sampler)."""
    from fdc_mol.report import format_table

    sampler = cfg.evaluation.samplers[0]
    head = ["iteration", "E[r] (Eh) [95% CI]", f"SQ_β (β={cfg.utility.beta}) [95% CI]",
            "Δr, same molecules [95% CI] (n)", "Δr, unchanged graphs (n)", "validity", "mol. stab.", "uniq.",
            "novelty", "comp. TV"]
    body = []
    for r in rows:
        first = r["iteration"] == 0
        fixed = "" if "fixed_graph_delta" not in r or first else \
            f"{_ci(r, 'fixed_graph_delta')} ({int(r.get('n_fixed_graph', 0))})"
        paired = "" if "paired_delta" not in r or first else \
            f"{r['paired_delta']:.4g} ({int(r.get('n_paired', 0))})"
        body.append([r["iteration"], _ci(r, "mean_reward"), _ci(r, "sq_beta"), fixed, paired, r.get("validity"),
                     r.get("molecule_stability"), r.get("uniqueness"), r.get("novelty"), r.get("composition_tv")])
    return (f"sampler: {sampler} (common random numbers); reward: {cfg.reward.kind} ({cfg.reward.level}); Δr = the "
            "iteration's reward minus iteration 0's: 'same molecules' re-integrates iteration 0's molecules with the "
            "current positions network, 'unchanged graphs' pairs the new samples whose bond graph did not change\n"
            + format_table(head, body))


def run(args: argparse.Namespace) -> int:
    cfg = load_finetune_config(args.config, run_dir=args.run_dir, seed=args.seed, model=args.model,
                               device=args.device)
    run_finetune(cfg)
    return 0

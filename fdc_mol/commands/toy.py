"""``fdc-mol toy <setting>``: the paper's 2-D illustrative settings, FDC vs the adjoint-matching baseline."""

from __future__ import annotations

import argparse

HELP = "run the 2-D illustrative settings (cvar, sq, w1, entropy, all): FDC vs adjoint matching, table and plots"

PAPER = {
    "cvar": "paper (5 seeds): worst-1% cost pre 256.8±8.2, AM 225.3±78.9, FDC 90.0±0.05 (lower is better)",
    "sq": "paper (5 seeds): top-1% reward pre 59.6±7.5, AM 56.7±2.7, FDC 452.5±250.0 (higher is better)",
    "w1": "paper (5 seeds): E[r] pre 29.5, AM 35.08±0.04, FDC-A 35.38±0.04; W1^A AM 4.68, FDC-A 1.92±0.03; "
    "delta% AM 100, FDC-A 288±15",
    "entropy": "paper (1 run): MC entropy pre 6.78, FDC a=0.5 7.00, FDC a=0 7.14",
}
KEYS = {
    "cvar": ["worst1_cost", "mean_cost"],
    "sq": ["top1_reward", "mean_reward"],
    "w1": ["mean_reward", "w1_A", "delta_pct"],
    "entropy": ["hist_entropy", "nll_entropy", "nll_pre_exact", "kde_entropy", "kl_pre", "on_ring"]
    + [f"mode{i}" for i in range(8)],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("setting", choices=["cvar", "sq", "w1", "entropy", "all"])
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..seeds-1)")
    parser.add_argument("--out", default="runs/toy", help="output directory (tables, plots, checkpoints)")
    parser.add_argument("--config", default=None, help="YAML ToyConfig for a single setting (default: built-in)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets (smoke test; numbers not meaningful)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (YAML value), e.g. --set alpha=0 --set K=10; repeatable",
    )


def _overrides(items: list[str]) -> dict:
    """Parse ``KEY=VALUE`` strings (VALUE as YAML) into a dict."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _fmt(vals: list[float]) -> str:
    """mean ± sample std (ddof 1) of the values; '–' when there are none."""
    import numpy as np

    a = np.asarray(vals, dtype=float)
    if a.size == 0:
        return "–"
    return f"{a.mean():.3f} ± {a.std(ddof=1) if a.size > 1 else 0.0:.3f}"


def run(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    import torch

    from fdc_mol.runlog import start_run
    from fdc_mol.toy.plots import plot_setting
    from fdc_mol.toy.settings import SETTINGS, default_config, landscape, run_setting
    from flowmol_ext.config import load_config
    from flowmol_ext.io_utils import atomic_write_text

    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    torch.set_num_threads(1)
    settings = list(SETTINGS) if args.setting == "all" else [args.setting]
    if args.config and len(settings) > 1:
        raise ValueError("--config applies to a single setting, not 'all'")
    out = Path(args.out)
    lines = ["| setting | metric | pre-trained | AM | FDC | paper |", "|---|---|---|---|---|---|"]
    summary: dict = {}
    for s in settings:
        from fdc_mol.toy.settings import ToyConfig

        cfg = load_config(ToyConfig, args.config) if args.config else default_config(s)
        if cfg.setting != s:
            raise ValueError(f"config {args.config} is for setting {cfg.setting!r}, not {s!r}")
        if args.set:
            cfg = ToyConfig(**{**cfg.model_dump(), **_overrides(args.set)})
        if args.quick:
            cfg = cfg.model_copy(
                update={
                    "K": min(cfg.K, 3),
                    "steps_per_iter": 2,
                    "n_fit": 200,
                    "n_eval": 300,
                    "n_traj": 8,
                    "steps": 8,
                    "critic_steps": 5,
                    "n_ll": min(cfg.n_ll, 50),
                    "ll_steps": 20,
                }
            )
        sdir = out / s
        start_run(f"toy {s}", seed=0, config=cfg, run_dir=sdir)
        per: dict = {"pre": [], "am": [], "fdc": []}
        secs: dict = {"am": [], "fdc": []}
        for seed in range(args.seeds):
            t0 = time.time()
            res = run_setting(cfg, seed, run_dir=sdir)
            for m in per:
                if m in res["metrics"]:
                    per[m].append(res["metrics"][m])
            for m in secs:
                if m in res["seconds"]:
                    secs[m].append(res["seconds"][m])
            torch.save({m: x[:3000].clone() for m, x in res["samples"].items()}, sdir / f"{s}_samples_seed{seed}.pt")
            if seed == 0:
                plot_setting(
                    s,
                    landscape(s),
                    res["samples"],
                    sdir / f"{s}_samples.png",
                    title=f"{s}: samples over the landscape (seed 0)",
                )
            print(
                f"[{s}] seed {seed}: "
                + json.dumps(res["metrics"])
                + f" ({time.time() - t0:.0f}s)",
                flush=True,
            )
        summary[s] = {"config": cfg.model_dump(), "per_seed": per, "seconds": secs}
        for key in KEYS[s]:
            if not any(key in d for m in per for d in per[m]):
                continue
            row = [_fmt([d[key] for d in per[m] if key in d]) for m in ("pre", "am", "fdc")]
            lines.append(f"| {s} | {key} | " + " | ".join(row) + f" | {PAPER[s] if key == KEYS[s][0] else ''} |")
        lines.append(f"| {s} | seconds/run | – | {_fmt(secs['am'])} | {_fmt(secs['fdc'])} | |")
    table = "\n".join(lines)
    print(table)
    atomic_write_text(out / "toy_table.md", table + "\n")
    atomic_write_text(out / "toy_summary.json", json.dumps(summary, indent=1, default=float))
    return 0

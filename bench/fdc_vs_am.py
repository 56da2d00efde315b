"""FDC vs the plain adjoint-matching baseline vs the pre-trained model, over several seeds.

Runs ``configs/fdc_demo_cpu.yaml`` and ``configs/am_demo_cpu.yaml`` (equal numbers of gradient steps)
for each seed into ``--out/{fdc,am}_s{seed}`` (resumable: finished stages are reused), then prints
mean ± std over seeds of E[r], SQ_β, validity, molecule stability and energy per atom. The pre-trained
row is iteration 0 (identical in both runs of a seed: same seed, same sizes).

    python bench/fdc_vs_am.py --seeds 0 1 2 --out runs/compare
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import time
from pathlib import Path

import numpy as np

from fdc_mol.commands.finetune import run_finetune
from fdc_mol.config import FinetuneConfig
from fdc_mol.report import format_table
from flowmol_ext.config import load_config

COLS = [("mean_reward", "E[r] (Eh)"), ("sq_beta", "SQ_β (Eh)"), ("validity", "validity"),
        ("molecule_stability", "mol. stab."), ("mean_energy_per_atom", "E/atom (Eh)"),
        ("reward_fail_rate", "NaN rate")]


def mean_std(vals: list[float]) -> str:
    v = np.array([x for x in vals if not math.isnan(x)])
    if v.size == 0:
        return "n/a"
    return f"{v.mean():.4g} ± {v.std(ddof=1) if v.size > 1 else 0.0:.2g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/compare"))
    ap.add_argument("--fdc-config", default="configs/fdc_demo_cpu.yaml")
    ap.add_argument("--am-config", default="configs/am_demo_cpu.yaml")
    ap.add_argument("--only", choices=["FDC", "AM"], help="run one method (e.g. FDC and AM in two processes)")
    ap.add_argument("--summarize", action="store_true", help="only print the table from finished run dirs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.time()
    methods = [(n, p) for n, p in (("FDC", args.fdc_config), ("AM", args.am_config)) if args.only in (None, n)]
    for seed in [] if args.summarize else args.seeds:
        for name, path in methods:
            run_dir = str(args.out / f"{name.lower()}_s{seed}")
            cfg = load_config(FinetuneConfig, path, {"seed": seed, "run_dir": run_dir})
            rows = run_finetune(cfg, print_table=False)
            print(f"[{time.time() - t0:.0f} s] seed {seed} {name}: " +
                  ", ".join(f"{k}={rows[-1][k]:.4g}" for k, _ in COLS), flush=True)
    results: dict[str, list[dict]] = {"pre-trained": [], "AM": [], "FDC": []}
    final_iteration = {"FDC": load_config(FinetuneConfig, args.fdc_config).K,
                       "AM": load_config(FinetuneConfig, args.am_config).K}
    for seed in args.seeds:
        for name in ("FDC", "AM"):
            path = args.out / f"{name.lower()}_s{seed}" / "metrics.csv"
            if not path.is_file():
                continue
            with open(path) as fh:
                rows = [{k: (int(v) if k == "iteration" else float(v)) for k, v in r.items()}
                        for r in csv.DictReader(fh)]
            if rows[-1]["iteration"] != final_iteration[name]:
                continue  # unfinished run
            results[name].append(rows[-1])
            if name == "FDC":
                results["pre-trained"].append(rows[0])
    steps = load_config(FinetuneConfig, args.fdc_config)
    print(f"\n{len(results['FDC'])} FDC and {len(results['AM'])} AM runs (seeds {args.seeds}); "
          f"FDC: K={steps.K} x {steps.am_steps_per_iteration} AM steps; "
          f"AM: same number of steps; {steps.n_fit} samples per evaluation; total {time.time() - t0:.0f} s")
    print(format_table(["model", *[c for _, c in COLS]],
                       [[name, *[mean_std([r[k] for r in rows]) for k, _ in COLS]] for name, rows in results.items()]))


if __name__ == "__main__":
    main()

"""Usage: python docs/results/gap_constrained/fixed_graph_columns.py RUN_DIR

Fixed-graph change of every reward column (gap and the constraint E_cc) after each stage of a finished run:
iteration 0's ODE molecules (the job's CRN draws) re-integrated with stage k's positions network and scored again."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from fdc_mol.config import FinetuneConfig
from fdc_mol.molecular.flowmol_flow import FlowMolFlow
from fdc_mol.molecular.job import FinetuneJob
from fdc_mol.molecular.reward_oracle import molecules_of
from fdc_mol.molecular.statistics import paired_difference
from flowmol_ext import load_pretrained
from flowmol_ext.config import load_config


def main(run: Path) -> None:
    torch.set_num_threads(1)
    cfg = load_config(FinetuneConfig, run / "config.yaml", overrides={"run_dir": f"/tmp/fg_eval_{run.name}",
                                                                      "data_dir": None})
    job = FinetuneJob(cfg)
    ref = job.sample_evaluation(job.flow, "ode", record=True)
    res0 = job.reward(molecules_of(ref), with_grad=False)
    print(f"{run}: iteration 0: {int(res0.ok.sum())} of {len(res0)} scored; "
          f"gap mean {np.nanmean(res0.extras['gap']):.3f} eV, E_cc mean {np.nanmean(res0.extras['energy_cc']):.4f} Eh")
    for k in range(1, cfg.K + 1):
        model = load_pretrained(str(run / "stages" / f"stage_{k:03d}" / "model"), device="cpu")
        flow = FlowMolFlow(model, sampler=cfg.sampler, n_atoms=cfg.n_atoms, trainable=cfg.trainable)
        res = job.reward(molecules_of(ref, flow.replay_positions(ref)), with_grad=False)
        both = res0.ok & res.ok
        out = []
        for col in ("gap", "energy_cc"):
            a, b = np.where(both, res.extras[col], np.nan), np.where(both, res0.extras[col], np.nan)
            d = paired_difference(a, b, None, 1000, seed=0)
            out.append(f"Δ{col} {d.value:+.4f} [{d.low:+.4f}, {d.high:+.4f}] (n {d.n})")
        print(f"  stage {k}: " + "; ".join(out))
    job.reward.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

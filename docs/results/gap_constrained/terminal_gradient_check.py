"""Usage: python docs/results/gap_constrained/terminal_gradient_check.py CONFIG.yaml

Checks the direction of the log-barrier terminal gradient on real fit samples (SDE, training gate): a small step
x + eps * grad(dF) must lower the constrained energy E_cc and raise the gap. Prints the mean changes."""

from __future__ import annotations

import sys

import numpy as np
import torch

from fdc_mol.config import FinetuneConfig
from fdc_mol.molecular.job import FinetuneJob, make_utility
from fdc_mol.molecular.reward_oracle import molecules_of
from flowmol_ext.config import load_config


def main(config: str) -> None:
    torch.set_num_threads(1)
    cfg = load_config(FinetuneConfig, config, overrides={"run_dir": "/tmp/dircheck", "data_dir": None,
                      "n_fit": 24, "reward": {"executor": "serial"}})
    job = FinetuneJob(cfg)
    ctx = job.fit_context(job.flow, job.flow, 1, None)
    util = make_utility(cfg)
    f = util.fit(ctx)
    print({k: v for k, v in f.info.items() if isinstance(v, (int, float))})
    g = f.grad(ctx.x, ctx.traj)
    x = ctx.x
    r0 = job.train_reward(molecules_of(ctx.traj, x), with_grad=False)
    for eps in (1e-3, 3e-3):
        r1 = job.train_reward(molecules_of(ctx.traj, x + eps * g), with_grad=False)
        ok = r0.ok & r1.ok
        print(eps, "dE_cc", np.mean(r1.extras["energy_cc"][ok] - r0.extras["energy_cc"][ok]),
              "dgap", np.mean(r1.extras["gap"][ok] - r0.extras["gap"][ok]), ok.sum())
    job.reward.close()

if __name__ == "__main__":
    main(sys.argv[1])

"""The memoryless SDE beside the ODE for the 3-seed FDC-vs-AM comparison.

Each final model of ``fdc-mol compare -c fdc_demo_cpu -c am_demo_cpu --seeds S --out RUNS`` and the pre-trained
model are sampled with the SDE on the run's evaluation sizes and sampling seed (common random numbers); prints SQ_β
(β = 0.75) with a bootstrap 95 % CI, validity, molecule stability, and the SQ difference over CRN-index pairs finite
in both (graphs may differ). Usage: ``python tools/sde_crn_eval.py RUNS SEED OUT.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from fdc_mol.commands.finetune import load_finetune_config
from fdc_mol.molecular.job import FinetuneJob
from fdc_mol.molecular.reward_oracle import molecules_of
from fdc_mol.molecular.statistics import bootstrap, paired_bootstrap, superquantile
from flowmol_ext.metrics import evaluate_molecules
from flowmol_ext.pretrained import load_model_dir


def sq(v: np.ndarray) -> float:
    return superquantile(v, 0.75)


def main() -> None:
    root, seed, out_path = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    job = FinetuneJob(load_finetune_config("fdc_demo_cpu", run_dir=root / f"fdc_demo_cpu_s{seed}", seed=seed))
    flows = {"pre-trained": job.flow}
    for name in ("fdc_demo_cpu", "am_demo_cpu"):
        fine = job.flow.copy_frozen()
        fine.model.load_state_dict(load_model_dir(root / f"{name}_s{seed}" / "model").state_dict())
        flows[name] = fine
    out: dict = {}
    rewards = {}
    for name, flow in flows.items():
        mols = molecules_of(job.sample_evaluation(flow, "sde"))
        rewards[name] = np.asarray(job.reward(mols, with_grad=False).value, np.float64)
        met = evaluate_molecules(mols)
        ci = bootstrap(rewards[name], sq, 1000, seed=seed)
        out[name] = {"sq": [ci.value, ci.low, ci.high, ci.n], "validity": met["validity"],
                     "mol_stab": met["molecule_stability"]}
    for a, b in (("fdc_demo_cpu", "pre-trained"), ("am_demo_cpu", "pre-trained"), ("fdc_demo_cpu", "am_demo_cpu")):
        d = paired_bootstrap(rewards[a], rewards[b], sq, 1000, seed=seed)
        out[f"{a}-{b}"] = [d.value, d.low, d.high, d.n]
    job.reward.close()
    out_path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
